"""The toy base's premises, measured against their gates (mpi.toy_base.GATES) on held-out scenes and unseen policies.

    python benchmarks/bench_toy_base_skills.py                       # the shipped toy-small base
    python benchmarks/bench_toy_base_skills.py --base PATH           # a base built elsewhere
    python benchmarks/bench_toy_base_skills.py --checkpoint DIR.ckpt # a build still running (its last checkpoint)
    python benchmarks/bench_toy_base_skills.py --random-init         # the same toy before pretraining

Prints, with one CPU thread so the numbers repeat exactly:
- existence: "Is there a <value> object in the image?" accuracy for each of the 15 attribute values (16 items each,
  yes and no alternating, 1-4 objects) and the share of "yes" answers (a model that ignores the image scores 50%);
- describe: the share of exact descriptions ("colors: red, blue. shapes: cube. ...") of 1-4-object scenes;
- following unseen random compact policies in context, N=2 and N=4 (48 each, one uniformly drawn outcome per item:
  chance 25% and 6.25%), the parse rate, and the share of CoTs that visit exactly the gold section ids;
- each gate, met or not;
- where a policy CoT goes wrong: teacher-forced (the gold CoT so far in the prompt), the share of right next tokens
  for each decision a CoT makes: the description, the next section id, the condition copied after an internal id,
  the yes/no check against the description, the case copied after a leaf id; and again with each policy's section
  lines shuffled (`mpi.toy_base.shuffle_sections`, the same tree): a base that finds a section by its id does not
  care, one that finds it by where its line sits does (`--no-decisions` skips both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


DECISIONS = ("describe", "next id", "condition copy", "yes/no check", "case copy")


def decision_kind(token: str, previous: str, in_description: bool) -> str:
    """Which CoT decision a target token is: 'colors: red. ...' -> describe, '#1.2' -> next id, the word after an
    internal id -> condition copy, 'yes'/'no' -> yes/no check, 'Case k' after an id -> case copy, else other."""
    import re

    word, after_id = token.strip(), re.fullmatch(r"#[\d.]+", previous.strip()) is not None
    if in_description:
        return "describe"
    if re.fullmatch(r"#[\d.]+", word):
        return "next id"
    if after_id:
        return "case copy" if word.startswith("Case") else "condition copy"
    return "yes/no check" if word in ("yes", "no") else "other"


def cot_decision_accuracy(model, processor, items, batch_size: int = 8) -> dict[str, float]:
    """Teacher-forced share of right next tokens per CoT decision (`decision_kind`) on in-context policy items."""
    import torch

    from mpi.toy_base import encode_examples

    tok, hits = processor.tokenizer, {}
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = encode_examples(processor, chunk, model.config.image_token_id)
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        predicted, target = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
        for row in range(len(chunk)):
            in_description, previous = True, ""
            for pos in (target[row] != -100).nonzero().flatten().tolist():
                token = tok.decode([int(target[row, pos])])
                kind = decision_kind(token, previous, in_description)
                hits.setdefault(kind, []).append(float(predicted[row, pos] == target[row, pos]))
                in_description = in_description and token != "\n"  # the description is the CoT's first line
                previous = token
    return {k: sum(hits[k]) / len(hits[k]) for k in DECISIONS if k in hits}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="a toy base directory (default: the shipped toy-small-s0)")
    p.add_argument("--checkpoint", default=None, help="a running build's checkpoint folder (<base dir>.ckpt)")
    p.add_argument("--random-init", action="store_true", help="measure the random-init toy the base starts from")
    p.add_argument("--toy", default=None, help="with --checkpoint: the toy directory the build started from (its "
                   "tokenizer; default: the toy this checkout builds)")
    p.add_argument("--exists-per-value", type=int, default=16)
    p.add_argument("--describe", type=int, default=64)
    p.add_argument("--policies", type=int, default=48, help="unseen random policies per depth")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    p.add_argument("--no-decisions", action="store_true", help="skip the teacher-forced CoT decision accuracies")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from mpi.modeling import load_model_and_processor
    from mpi.toy import build_toy
    from mpi.toy_base import SHIPPED_ROOT, skills_line, toy_base_config, toy_base_skills

    cfg = toy_base_config("toy")
    if args.checkpoint or args.random_init:
        toy = args.toy or str(build_toy(cfg.model, seed=cfg.seed))
        model, processor = load_model_and_processor(toy, quantization=None, lora=None, seed=cfg.seed,
                                                    device="cpu", trainable=False)
        where = "random init"
        if args.checkpoint:
            state = torch.load(Path(args.checkpoint) / "state.pt", map_location="cpu", weights_only=False)
            model.load_state_dict(state["model"])
            where = f"checkpoint at step {state['step']} ({state['seconds'] / 60:.0f} min)"
    else:
        base = Path(args.base) if args.base else SHIPPED_ROOT / f"{cfg.model}-s{cfg.seed}"
        model, processor = load_model_and_processor(str(base), quantization=None, lora=None, device="cpu",
                                                    trainable=False)
        where = str(base)
    model.eval()
    t0 = time.perf_counter()
    s = toy_base_skills(model, processor, cfg, exists_per_value=args.exists_per_value, n_describe=args.describe,
                        policies_per_depth=args.policies)
    print(f"toy base: {where}; measured in {time.perf_counter() - t0:.0f} s")
    print("existence per value: " + ", ".join(f"{v} {100 * a:.0f}" for v, a in s["exists"].items())
          + f"  (yes rate {100 * s['exists_yes_rate']:.0f}%)")
    for d in (2, 4):
        print(f"N={d}: {100 * s[f'policy_N{d}']:.1f}% (chance {100 * s[f'policy_N{d}_chance']:.1f}%), parsed "
              f"{100 * s[f'policy_N{d}_parsed']:.0f}%, sections exact {100 * s[f'policy_N{d}_sections_exact']:.0f}%")
        print("   e.g. " + json.dumps(s[f"policy_N{d}_examples"][0]["prediction"]))
    print("describe e.g. " + json.dumps(s["describe_examples"][0]))
    print(skills_line(s))
    for name, g in s["gates"].items():
        print(f"gate {name:15s} {100 * g['value']:5.1f}%  >= {100 * g['gate']:.0f}%  {'met' if g['met'] else 'NOT met'}")
    if not args.no_decisions:
        import random

        from mpi.toy_base import policy_items, shuffle_sections

        rng = random.Random(7)
        for d in (2, 4):
            items = policy_items(cfg.model, args.policies, seed=cfg.seed, depths=(d,),
                                 n_objects=(cfg.min_objects, cfg.max_objects), world=cfg.world,
                                 policy_format=cfg.policy_format)
            shuffled = [{**i, "policy_text": shuffle_sections(rng, i["policy_text"])} for i in items]
            for name, its in (("in order", items), ("lines shuffled", shuffled)):
                acc = cot_decision_accuracy(model, processor, its)
                s[f"decisions_N{d}" + ("" if its is items else "_shuffled")] = acc
                print(f"N={d} CoT decisions, teacher-forced, {name}: "
                      + ", ".join(f"{k} {100 * v:.0f}%" for k, v in acc.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
