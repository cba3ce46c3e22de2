"""What a toy base sees: its general skills broken down by objects per scene and by attribute.

    python benchmarks/bench_toy_base_skills.py                          # the shipped toy-small base
    python benchmarks/bench_toy_base_skills.py --base PATH --items 64

For 1, 2, 3 and 4 objects per scene (fresh scenes from their own random stream, greedy decoding, one
CPU thread so the numbers repeat exactly):

- exists: "Is there a <value> object?" accuracy, and the share of "no" answers (a model that always says
  "no" scores the share of "no" items, whatever it sees);
- count: "How many <value> objects are there?" accuracy;
- describe (1 and 3 objects): per attribute, the Jaccard overlap of the listed values with the true ones.

Measured on the shipped v4 base (64 items per cell, 48 for describe): exists 46.9 / 62.5 / 46.9 / 50.0% on
1 / 2 / 3 / 4 objects, with "no" for every item; count 54.7 / 42.2 / 26.6 / 29.7%; describe on 1 object
colors 0.99, shapes 0.33, sizes 0.86, materials 0.41; on 3 objects 0.92 / 0.63 / 0.92 / 0.84. The v3 base
(before the zoom curriculum, `--base` on its weights from git): exists the same (all "no"), count 62.5 / 39.1 /
34.4 / 17.2%, describe colors 0.58 on 1 object and 0.50 on 3 (shapes 0.36 / 0.66).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def jaccard_by_attribute(prediction: str, answer: str) -> dict[str, float]:
    """'colors: red, blue. shapes: cube.' vs the target, per attribute: |P & T| / |P | T|."""
    def parse(text: str) -> dict[str, set[str]]:
        out = {}
        for part in text.split("."):
            if ":" in part:
                key, values = part.split(":", 1)
                out[key.strip()] = {v.strip() for v in values.split(",") if v.strip()}
        return out

    pred, true = parse(prediction), parse(answer)
    return {k: len(pred.get(k, set()) & t) / len(pred.get(k, set()) | t) for k, t in true.items()}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="a toy base directory (default: the shipped toy-small-s0)")
    p.add_argument("--items", type=int, default=64, help="items per (task, objects) cell; describe uses 3/4 of it")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from mpi.evaluate import generate_texts
    from mpi.modeling import load_model_and_processor
    from mpi.rewards import normalize_answer
    from mpi.toy_base import SHIPPED_ROOT, _image_size, _skill_builder, render, skill_example

    base = args.base or str(SHIPPED_ROOT / "toy-small-s0")
    model, processor = load_model_and_processor(base, quantization=None, lora=None, trainable=False)
    size = _image_size("toy-small")

    def answers(task: str, n: int, k: int, max_new_tokens: int):
        rng = random.Random(f"bench-skills/{task}/{n}")
        items = [render(skill_example(rng, task, size, n, n, index=i), size) for i in range(k)]
        texts = generate_texts(model, processor, items, batch_size=16, max_new_tokens=max_new_tokens,
                               build_messages=_skill_builder)
        return items, texts

    print(f"toy base {base}")
    for task in ("exists", "count"):
        for n in (1, 2, 3, 4):
            items, texts = answers(task, n, args.items, 4)
            acc = sum(normalize_answer(t) == normalize_answer(i["answer"]) for i, t in zip(items, texts)) / len(items)
            extra = (f" | 'no' answers {100 * sum(normalize_answer(t) == 'no' for t in texts) / len(texts):.0f}%"
                     if task == "exists" else "")
            print(f"{task:8s} {n} objects: accuracy {100 * acc:5.1f}%{extra}")
    for n in (1, 3):
        items, texts = answers("describe", n, 3 * args.items // 4, 40)
        scores: dict[str, list[float]] = {}
        for i, t in zip(items, texts):
            for k, v in jaccard_by_attribute(t, i["answer"]).items():
                scores.setdefault(k, []).append(v)
        print(f"describe {n} objects: " + ", ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in scores.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
