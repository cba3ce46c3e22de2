"""What the RL stages of a finished run did: PoRo's premise, the validation curve and the kept checkpoint.

    python benchmarks/rl_diagnostics.py runs/toy            # or any run directory of `python -m mpi`

For every RL stage (stages/<dataset>/seed<k>/<chain>/work/metrics.jsonl) it prints
- own and guided reward over the first K training steps (PoRo's premise: the guided half, sampled WITH the
  policy in context, must earn more than the own half, or it adds samples without better answers),
- the validation sampled accuracy at step 0 and at the kept (best smoothed) step, and that step,
- and per chain kind the mean over seeds, with a paired bootstrap 95% interval for guided - own (the steps of
  each seed resampled, own and guided of one step together: they answered the same prompts), and, where a run has
  both, for the guided half with the right policy minus the wrong-policy control's (paired by seed and step).
Numbers only, read from the logs: nothing is recomputed but the intervals.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mpi.report import paired_bootstrap  # noqa: E402


def stage_summary(metrics_path: Path, first: int) -> dict:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "own/reward_mean" in r][:first]
    val = [r for r in rows if "val/sampled_accuracy" in r]
    out = {"own_by_step": {r["step"]: r["own/reward_mean"] for r in train},
           "guided_by_step": {r["step"]: r["guided/reward_mean"] for r in train if "guided/reward_mean" in r},
           "own": statistics.mean(r["own/reward_mean"] for r in train) if train else None,
           "guided": (statistics.mean(r["guided/reward_mean"] for r in train)
                      if train and "guided/reward_mean" in train[0] else None)}
    if val:
        best_step = int(val[-1].get("val/best_step", val[-1]["step"]))
        kept = next((r for r in val if r["step"] == best_step), val[-1])
        out.update(val_start=val[0]["val/sampled_accuracy"], val_kept=kept["val/sampled_accuracy"],
                   val_last=val[-1]["val/sampled_accuracy"], best_step=best_step)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--first", type=int, default=10, help="training steps over which own/guided rewards are averaged")
    args = p.parse_args()
    by_kind: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for run_dir in args.run_dirs:
        for path in sorted(run_dir.glob("stages/*/seed*/*/work/metrics.jsonl")):
            chain = path.parent.parent.name
            if not any(s in chain.split("+")[-1] for s in ("grpo", "dapo")):
                continue
            s = stage_summary(path, args.first)
            key, seed = path.parents[3].name, path.parents[2].name
            by_kind[(key, chain)][f"{run_dir}/{seed}"] = s
            premise = (f"guided - own {s['guided'] - s['own']:+.3f} (own {s['own']:.3f}, guided {s['guided']:.3f})"
                       if s.get("guided") is not None else f"own {s['own']:.3f}")
            val = (f" | val {s['val_start']:.3f} -> kept step {s['best_step']} {s['val_kept']:.3f} (last {s['val_last']:.3f})"
                   if "val_start" in s else "")
            print(f"{key} {seed} {chain}: first {args.first} steps {premise}{val}")
    print("\nmeans over seeds")
    for (key, chain), by_seed in sorted(by_kind.items()):
        rows = list(by_seed.values())
        line = f"{key} {chain} ({len(rows)} seeds): own {statistics.mean(r['own'] for r in rows):.3f}"
        if all(r.get("guided") is not None for r in rows):
            line += f", guided - own {_interval(by_seed, chain, 'guided', by_seed, chain, 'own')}"
        if all("val_start" in r for r in rows):
            line += (f", val {statistics.mean(r['val_start'] for r in rows):.3f} -> kept "
                     f"{statistics.mean(r['val_kept'] for r in rows):.3f}, kept steps {[r['best_step'] for r in rows]}")
        print(line)
        wrong = by_kind.get((key, chain + "-wrong"))
        if wrong and all(r.get("guided") is not None for r in rows + list(wrong.values())):
            print(f"{key} guided half, right - wrong policy: {_interval(by_seed, chain, 'guided', wrong, chain + '-wrong', 'guided')}")


def _interval(a: dict, a_name: str, a_half: str, b: dict, b_name: str, b_half: str) -> str:
    """Mean over seeds of (a's half - b's half) over the first steps, with its paired bootstrap 95% interval."""
    r = paired_bootstrap({s: v[f"{a_half}_by_step"] for s, v in a.items()},
                         {s: v[f"{b_half}_by_step"] for s, v in b.items()}, names=(a_name, b_name))
    return f"{r['diff']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] ({r['n_seeds']} seeds, {r['n_items']} steps)"


if __name__ == "__main__":
    main()
