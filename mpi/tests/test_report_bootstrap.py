"""The paired bootstrap of the report: per-item scores kept in done.json, the interval, and the report row."""

import json
import random

import numpy as np
import pytest

from mpi.evaluate import strip_for_json
from mpi.report import PAIRED_COMPARISONS, collect, markdown, paired_bootstrap


def _by_seed(*per_seed_scores):
    """seed k -> {f"item-{i}": score} from one list of scores per seed."""
    return {k: {f"item-{i}": float(v) for i, v in enumerate(scores)} for k, scores in enumerate(per_seed_scores)}


def _quantile(sorted_vals, q):
    """Linear-interpolation percentile (numpy's default), written out by hand."""
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (pos - lo) * (sorted_vals[hi] - sorted_vals[lo])


def _slow_paired(a_by_seed, b_by_seed, n_resamples, seed, alpha=0.05, paired=True):
    """An independent route: plain loops and `random`. paired=False draws a's and b's items separately
    (what an unpaired bootstrap does), to show how much pairing narrows the interval."""
    rng = random.Random(seed)
    seeds = [s for s in a_by_seed if set(a_by_seed[s]) & set(b_by_seed.get(s, {}))]
    stats = []
    for _ in range(n_resamples):
        per_seed = []
        for s in seeds:
            ids = [i for i in a_by_seed[s] if i in b_by_seed[s]]
            draw_a = [rng.choice(ids) for _ in ids]
            draw_b = draw_a if paired else [rng.choice(ids) for _ in ids]
            mean_a = sum(a_by_seed[s][i] for i in draw_a) / len(ids)
            mean_b = sum(b_by_seed[s][i] for i in draw_b) / len(ids)
            per_seed.append(mean_a - mean_b)
        stats.append(sum(per_seed) / len(per_seed))
    stats.sort()
    return _quantile(stats, alpha / 2), _quantile(stats, 1 - alpha / 2)


# ----------------------------------------------------------------------------------- paired_bootstrap


def test_identical_methods_give_zero_and_a_zero_width_interval():
    rng = np.random.default_rng(3)
    a = _by_seed(*(rng.integers(0, 2, 50) for _ in range(3)))
    r = paired_bootstrap(a, {s: dict(v) for s, v in a.items()})
    assert (r["diff"], r["low"], r["high"]) == (0.0, 0.0, 0.0)
    assert (r["n_items"], r["n_seeds"]) == (150, 3)


def test_hand_case_one_seed_four_items():
    # a - b per item = [1, 0, 1, 0]: diff 0.5. A resample's mean is 0 when all 4 draws hit a 0 item,
    # probability (1/2)^4 = 6.25% > 2.5%, so the 2.5% percentile is exactly 0; likewise 1 for 97.5%.
    r = paired_bootstrap(_by_seed([1, 1, 1, 0]), _by_seed([0, 1, 0, 0]))
    assert r["diff"] == 0.5
    assert r["low"] <= 0.5 <= r["high"] and -1 <= r["low"] and r["high"] <= 1
    assert (r["low"], r["high"]) == (0.0, 1.0)
    assert (r["n_items"], r["n_seeds"]) == (4, 1)


def test_diff_is_the_mean_of_per_seed_differences_not_pooled():
    # seed 0: 2 items, diff 1.0; seed 1: 6 items, diff 0.0. Mean over seeds 0.5; pooled would be 2/8 = 0.25.
    a = {0: {"x": 1.0, "y": 1.0}, 1: {f"i{k}": 1.0 for k in range(6)}}
    b = {0: {"x": 0.0, "y": 0.0}, 1: {f"i{k}": 1.0 for k in range(6)}}
    assert paired_bootstrap(a, b)["diff"] == 0.5


def test_pairs_by_seed_and_id_and_names_the_methods_without_overlap():
    # b lacks item-3 on seed 0 and has an extra item: only the 3 shared ids count
    a = {0: {"item-0": 1.0, "item-1": 1.0, "item-2": 0.0, "item-3": 1.0}}
    b = {0: {"item-0": 0.0, "item-1": 1.0, "item-2": 0.0, "extra": 1.0}}
    r = paired_bootstrap(a, b)
    assert r["n_items"] == 3 and r["n_unpaired"] == 2
    assert r["diff"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="trimpi-grpo and cot-sft share no"):
        paired_bootstrap({0: {"p": 1.0}}, {1: {"p": 1.0}}, names=("trimpi-grpo", "cot-sft"))


def test_matches_a_slow_loop_and_pairing_narrows_the_interval():
    # Items of very different difficulty (b right on about half), a = b plus 3 items fixed per seed: the
    # per-item difference has little spread (sd of the statistic ~0.022 paired, ~0.068 unpaired), so the
    # paired interval is about a third as wide as an unpaired one.
    rng = np.random.default_rng(0)
    b_scores = [rng.integers(0, 2, n).astype(float) for n in (60, 50)]
    a_scores = []
    for s in b_scores:
        a = s.copy()
        a[np.flatnonzero(s == 0)[:3]] = 1.0
        a_scores.append(a)
    a, b = _by_seed(*a_scores), _by_seed(*b_scores)
    n = 2000
    r = paired_bootstrap(a, b, n_resamples=n, seed=1)
    expected = (3 / 60 + 3 / 50) / 2
    assert r["diff"] == pytest.approx(expected)
    low, high = _slow_paired(a, b, n, seed=2)
    # the two routes use different random streams: the tolerance is several Monte Carlo errors of a 2.5%
    # percentile with 2000 resamples (about 0.07 x the statistic's sd ~0.022, i.e. ~0.0016)
    assert r["low"] == pytest.approx(low, abs=0.008)
    assert r["high"] == pytest.approx(high, abs=0.008)
    u_low, u_high = _slow_paired(a, b, 1000, seed=3, paired=False)
    assert (r["high"] - r["low"]) < 0.5 * (u_high - u_low)
    assert r["low"] > 0 and u_low < 0  # pairing is what makes the gain visible at all


def test_deterministic_and_seeded():
    # (not timed: a wall-clock bound fails on a loaded machine; speed belongs in benchmarks/)
    rng = np.random.default_rng(5)
    a = _by_seed(*(rng.integers(0, 2, 200) for _ in range(3)))
    b = _by_seed(*(rng.integers(0, 2, 200) for _ in range(3)))
    r1 = paired_bootstrap(a, b)
    assert paired_bootstrap(a, b) == r1
    assert paired_bootstrap(a, b, seed=1) != r1  # the seed is really used


# ----------------------------------------------------------------------------------- strip_for_json


def test_strip_for_json_keeps_every_items_score():
    n = 30  # more than keep_predictions=20, so item_scores must not be truncated with the examples
    result = {"accuracy": 0.5, "n": n, "ids": [f"clevr-{k:05d}" for k in range(n)],
              "predictions": [f"\\boxed{{{k}}}" for k in range(n)],
              "per_item": [{"score": (k % 3) / 2, "parsed": True} for k in range(n)]}  # 0, 0.5, 1 (GTA-like)
    out = strip_for_json(result)
    assert out["item_scores"] == [[f"clevr-{k:05d}", (k % 3) / 2] for k in range(n)]
    assert "per_item" not in out and "ids" not in out and "predictions" not in out
    assert len(out["examples"]) == 20 and out["accuracy"] == 0.5
    assert json.loads(json.dumps(out)) == out
    with pytest.raises(ValueError, match="ids"):
        strip_for_json({**result, "ids": result["ids"][:5]})


# ----------------------------------------------------------------------------------- collect + markdown


def _done(method, seed, scores, with_item_scores=True):
    pf = {"accuracy": sum(scores) / len(scores), "parsed_rate": 1.0}
    if with_item_scores:
        pf["item_scores"] = [[f"q{i}", float(v)] for i, v in enumerate(scores)]
    return {"method": method, "seed": seed, "accuracy": pf["accuracy"], "policy_free": pf,
            "with_policy": {"accuracy": 0.9}, "override": {"accuracy": 0.1}}


def _write(run_dir, key, seed, method, done):
    path = run_dir / "eval" / key / f"seed{seed}" / method / "done.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(done))


def test_collect_and_markdown_show_the_paired_row(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"config": {"preset": "toy", "model": "toy-tiny"}}))
    sft = {0: [0, 1, 0, 1, 0, 0, 1, 0, 0, 0], 1: [1, 0, 0, 1, 0, 0, 0, 1, 0, 0]}
    grpo = {0: [1, 1, 0, 1, 1, 0, 1, 0, 0, 0], 1: [1, 0, 1, 1, 0, 0, 0, 1, 1, 0]}  # +2 items on each seed
    for seed in (0, 1):
        _write(tmp_path, "clevr", seed, "cot-sft", _done("cot-sft", seed, sft[seed]))
        _write(tmp_path, "clevr", seed, "cot-sft-grpo", _done("cot-sft-grpo", seed, grpo[seed]))
        # an old done.json without item_scores: its comparison is skipped, not a crash
        _write(tmp_path, "gta", seed, "cot-sft", _done("cot-sft", seed, sft[seed], with_item_scores=False))
        _write(tmp_path, "gta", seed, "cot-sft-grpo", _done("cot-sft-grpo", seed, grpo[seed]))
    data = collect(tmp_path)
    [row] = data["paired"]  # only GRPO − SFT has both methods
    assert (row["label"], row["a"], row["b"]) == ("GRPO − SFT", "cot-sft-grpo", "cot-sft")
    cell = row["by_key"]["clevr"]
    assert cell["diff"] == pytest.approx(0.2) and cell["n_items"] == 20 and cell["n_seeds"] == 2
    assert "missing" in row["by_key"]["gta"] and "cot-sft" in row["by_key"]["gta"]["missing"]
    text = markdown(data)
    assert "## Paired differences (bootstrap 95% interval)" in text
    assert text.index("## Accuracy") < text.index("## Paired differences") < text.index("## policy-free accuracy")
    # the cell is exactly the bootstrap of the raw scores (seeds as collect names them, from "seed<k>")
    as_map = lambda per_seed: {str(k): {f"q{i}": float(v) for i, v in enumerate(x)} for k, x in per_seed.items()}  # noqa: E731
    assert cell == paired_bootstrap(as_map(grpo), as_map(sft))
    fmt = lambda x: f"{round(100 * x, 1) + 0.0:+.1f}".replace("-", "−")  # noqa: E731
    line = next(ln for ln in text.splitlines() if ln.startswith("| GRPO − SFT"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:] == [f"+20.0 [{fmt(cell['low'])}, {fmt(cell['high'])}]", "–"]  # columns clevr, gta
    # the accuracy table keeps mean ± std: GRPO is 50% on both seeds, SFT 30% on both
    assert "| CoT SFT + GRPO | 50.0 ± 0.0 |" in text and "| CoT SFT | 30.0 ± 0.0 |" in text


def test_comparisons_are_the_issues():
    labels = {label: (a, b) for label, a, b in PAIRED_COMPARISONS}
    assert labels["GRPO − SFT"] == ("cot-sft-grpo", "cot-sft")
    assert labels["PoRo − GRPO"] == ("trimpi-grpo", "vmcpt-cot-sft-grpo")
    assert labels["PoRo − wrong policy"] == ("trimpi-grpo", "trimpi-grpo-wrong")
