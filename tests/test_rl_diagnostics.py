"""benchmarks/rl_diagnostics.py reads PoRo's premise from a run's logs: guided - own by hand, and its interval."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _diagnostics():
    spec = importlib.util.spec_from_file_location("rl_diagnostics", ROOT / "benchmarks" / "rl_diagnostics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(run: Path, seed: int, chain: str, rewards: list[tuple[float, float]]) -> None:
    work = run / "stages" / "clevr-T-N2" / f"seed{seed}" / chain / "work"
    work.mkdir(parents=True)
    rows = [{"step": 0, "val/sampled_accuracy": 0.5, "val/best_step": 0.0}]
    rows += [{"step": i + 1, "own/reward_mean": own, "guided/reward_mean": guided}
             for i, (own, guided) in enumerate(rewards)]
    (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_guided_minus_own_and_right_minus_wrong_with_intervals(tmp_path, monkeypatch, capsys):
    # seed 0: guided - own = +0.2, +0.4 (mean +0.3); seed 1: +0.1, +0.1 (mean +0.1) -> mean over seeds +0.2
    _write(tmp_path, 0, "cpt+cot-sft+poro-grpo", [(0.1, 0.3), (0.2, 0.6)])
    _write(tmp_path, 1, "cpt+cot-sft+poro-grpo", [(0.5, 0.6), (0.3, 0.4)])
    # the control's guided half: 0.1 lower than the right policy's at every step -> right - wrong = +0.1, interval a point
    _write(tmp_path, 0, "cpt+cot-sft+poro-grpo-wrong", [(0.1, 0.2), (0.2, 0.5)])
    _write(tmp_path, 1, "cpt+cot-sft+poro-grpo-wrong", [(0.5, 0.5), (0.3, 0.3)])
    monkeypatch.setattr("sys.argv", ["rl_diagnostics.py", str(tmp_path), "--first", "2"])
    _diagnostics().main()
    out = capsys.readouterr().out
    poro = next(line for line in out.splitlines() if line.startswith("clevr-T-N2 cpt+cot-sft+poro-grpo (2 seeds)"))
    assert "guided - own +0.200 [" in poro and "(2 seeds, 4 steps)" in poro
    low, high = (float(x) for x in poro.split("guided - own +0.200 [")[1].split("]")[0].split(", "))
    # a resample draws seed 0's two steps from (+0.2, +0.4): a quarter of the draws give (+0.2 + 0.1) / 2, a quarter
    # (+0.4 + 0.1) / 2, so the 2.5% and 97.5% points are those two
    assert (low, high) == (0.15, 0.25)
    assert "guided half, right - wrong policy: +0.100 [+0.100, +0.100] (2 seeds, 4 steps)" in out
