"""The toy base's premises, measured against their gates (mpi.toy_base.GATES) on held-out scenes and unseen policies.

    python benchmarks/bench_toy_base_skills.py                       # the shipped toy-small base
    python benchmarks/bench_toy_base_skills.py --base PATH           # a base built elsewhere
    python benchmarks/bench_toy_base_skills.py --checkpoint DIR.ckpt # a build still running (its last checkpoint)
    python benchmarks/bench_toy_base_skills.py --random-init         # the same toy before pretraining
    python benchmarks/bench_toy_base_skills.py --random-init --lookup-circuit  # ... with the look-up circuit set

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
  care, one that finds it by where its line sits does (`--no-decisions` skips both);
- how the base copies (`copy_probes`, teacher-forced, text only): the repeat drill at 12 and 24 words (its training
  range is 6-24) and at 40 and 60; a window of 6 words repeated from a random place in a list (after the window's
  first word, every word is the one that followed the previous one in the list: a copy by content, not by offset);
  and the word that follows a section id in the look-up drill, in order and shuffled (`--no-decisions` skips it).
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


def teacher_forced_hits(model, processor, items, kind, batch_size: int = 8) -> dict[str, float]:
    """Share of right next tokens on the assistant turn, grouped by `kind(item, answer_tokens, j)` (None = skip)."""
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
            positions = (target[row] != -100).nonzero().flatten().tolist()
            tokens = [tok.decode([int(target[row, p])]) for p in positions]
            for j, pos in enumerate(positions):
                group = kind(chunk[row], tokens, j)
                if group is not None:
                    hits.setdefault(group, []).append(float(predicted[row, pos] == target[row, pos]))
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def cot_decision_accuracy(model, processor, items, batch_size: int = 8) -> dict[str, float]:
    """Teacher-forced share of right next tokens per CoT decision (`decision_kind`) on in-context policy items."""

    def kind(item, tokens, j):  # the description is the CoT's first line
        return decision_kind(tokens[j], tokens[j - 1] if j else "", "\n" not in tokens[:j])

    hits = teacher_forced_hits(model, processor, items, kind, batch_size)
    return {k: hits[k] for k in DECISIONS if k in hits}


def copy_probes(model, processor, n: int = 32) -> dict[str, float]:
    """Does the base copy by offset (the token n places back) or by content (the token after the previous
    occurrence of the current one)? Teacher-forced, text-only items from their own random stream."""
    import random
    import re

    from mpi.data.scenes import ATTRIBUTES
    from mpi.toy import COMPACT_TOKENS
    from mpi.toy_base import lookup_example

    words = [w for w in COMPACT_TOKENS if not w.startswith(" ")] + [v for vs in ATTRIBUTES.values() for v in vs]
    words = [w for w in words if " " not in w]  # one token per word, so a word's successor is one token
    out = {}

    def answer_words(item, tokens, j):  # every word of the answer, not the end of the turn
        return "all" if tokens[j].strip() and tokens[j] != "<|im_end|>" else None

    def after_first(item, tokens, j):  # the window's first word cannot be predicted; the rest follow by content
        return "all" if j > 0 and tokens[j].strip() and tokens[j] != "<|im_end|>" else None

    for length in (12, 24, 40, 60):
        rngs = [random.Random(f"copy-probe-repeat-{length}-{i}") for i in range(n)]
        items = [{"task": "repeat", "question": "Repeat: " + " ".join(seq), "answer": " ".join(seq), "images": [],
                  "index": i} for i, seq in enumerate(r.sample(words, length) for r in rngs)]
        out[f"repeat_{length}"] = teacher_forced_hits(model, processor, items, answer_words).get("all", 0.0)
    items = []
    for i in range(n):
        r = random.Random(f"copy-probe-window-{i}")
        seq = r.sample(words, 24)
        k = r.randrange(len(seq) - 6)
        items.append({"task": "repeat", "question": "Repeat: " + " ".join(seq), "answer": " ".join(seq[k:k + 6]),
                      "images": [], "index": i})
    out["window_by_content"] = teacher_forced_hits(model, processor, items, after_first).get("all", 0.0)

    def after_id(item, tokens, j):
        return "content" if j > 0 and re.fullmatch(r"#[\d.]+", tokens[j - 1].strip()) else None

    for depth in (2, 4):
        for shuffled in (False, True):
            items = [lookup_example(random.Random(f"copy-probe-lookup-{depth}-{i}"), depth, index=i, shuffled=shuffled)
                     for i in range(n)]
            key = f"lookup_N{depth}" + ("_shuffled" if shuffled else "")
            out[key] = teacher_forced_hits(model, processor, items, after_id).get("content", 0.0)
    return out


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
    p.add_argument("--lookup-circuit", action="store_true", help="with --random-init: set the look-up circuit "
                   "(mpi.toy_circuit) in the random-init toy first, as a build with lookup_circuit starts")
    p.add_argument("--exists-evidence", action="store_true", help="with --checkpoint or --random-init: ask existence "
                   "evidence first, as a build with exists_evidence does (a --base reads its own recipe)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from mpi.modeling import load_model_and_processor
    from mpi.toy import build_toy
    from mpi.toy_base import SHIPPED_ROOT, skills_line, toy_base_config, toy_base_skills

    cfg = toy_base_config("toy", exists_evidence=args.exists_evidence)
    if args.checkpoint or args.random_init:
        toy = args.toy or str(build_toy(cfg.model, seed=cfg.seed))
        model, processor = load_model_and_processor(toy, quantization=None, lora=None, seed=cfg.seed,
                                                    device="cpu", trainable=False)
        where = "random init"
        if args.random_init and args.lookup_circuit:
            from mpi.toy_base import circuit_calibration_text
            from mpi.toy_circuit import install_lookup_circuit

            install_lookup_circuit(model, processor.tokenizer, circuit_calibration_text())
            where = "random init with the look-up circuit"
        if args.checkpoint:
            state = torch.load(Path(args.checkpoint) / "state.pt", map_location="cpu", weights_only=False)
            model.load_state_dict(state["model"])
            where = f"checkpoint at step {state['step']} ({state['seconds'] / 60:.0f} min)"
    else:
        base = Path(args.base) if args.base else SHIPPED_ROOT / f"{cfg.model}-s{cfg.seed}"
        if (base / "toy_base.json").exists():  # measured as its own recipe asks (e.g. existence evidence first)
            recorded = json.loads((base / "toy_base.json").read_text())["config"]
            cfg = toy_base_config("toy", **{**recorded, "policy_depths": tuple(recorded["policy_depths"])})
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
        c = s["copy_probes"] = copy_probes(model, processor)
        print(f"copying, teacher-forced: repeat 12 / 24 / 40 / 60 words {100 * c['repeat_12']:.0f}% / "
              f"{100 * c['repeat_24']:.0f}% / {100 * c['repeat_40']:.0f}% / {100 * c['repeat_60']:.0f}% (trained 6-24); "
              f"a window from a random place, by content {100 * c['window_by_content']:.0f}%; the word after an id in "
              f"look-ups N=2 {100 * c['lookup_N2']:.0f}% (shuffled {100 * c['lookup_N2_shuffled']:.0f}%), "
              f"N=4 {100 * c['lookup_N4']:.0f}% (shuffled {100 * c['lookup_N4_shuffled']:.0f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
