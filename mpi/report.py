"""The paper's table for a run directory: report.md, metrics.json and the plots.

    metrics = write_report("runs/toy")       # reads every finished stage, writes report.md + metrics.json + *.png
    summary = collect(Path("runs/toy"))      # the numbers only

Every number comes from the stages' done.json files; a method or seed that has not run yet is left
out (and the table says how many seeds each cell averages).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mpi.atomic import atomic_write_json, atomic_write_text
from mpi.evaluate import mean_and_spread
from mpi.methods import METHOD_LABELS, METHODS

# The paired comparisons the report draws, as (label, method_a, method_b): the row shows a - b with a
# paired bootstrap 95% interval. None involves the in-context baseline, so all pair policy-free scores.
PAIRED_COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("GRPO − SFT", "cot-sft-grpo", "cot-sft"),
    ("RL − SFT after VM-CPT", "vmcpt-cot-sft-grpo", "vmcpt-cot-sft"),
    ("PoRo − GRPO", "trimpi-grpo", "vmcpt-cot-sft-grpo"),
    ("PoRo − SFT", "trimpi-grpo", "vmcpt-cot-sft"),
    ("PoRo − wrong policy", "trimpi-grpo", "trimpi-grpo-wrong"),
    ("PoRo − adaptive guidance", "trimpi-grpo", "trimpi-grpo-adaptive"),
)
# the view whose per-item scores the comparisons pair (the trained methods' headline)
PAIRED_VIEW = "policy_free"

METRICS = {
    "accuracy": "accuracy (headline)",
    "policy_free": "policy-free accuracy",
    "with_policy": "policy in context",
    "override": "override (new policy in context)",
    "referral": "referral (0-10)",
    "forgetting": "general skills",
}


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _method_order() -> list[str]:
    return list(METHODS)


def _labels() -> dict[str, str]:
    return METHOD_LABELS


def seed_metrics(done: dict[str, Any]) -> dict[str, float | None]:
    """The scalar metrics of one eval stage (one method, dataset and seed)."""
    forgetting = done.get("forgetting") or {}
    # referral is read where the method reasons: with the policy in context for the in-context baseline
    mode = "with_policy" if done.get("method") == "in-context" else "policy_free"
    return {
        "accuracy": done.get("accuracy"),
        "policy_free": done["policy_free"]["accuracy"],
        "with_policy": done["with_policy"]["accuracy"],
        "override": done["override"]["accuracy"],
        "referral": (done[mode].get("referral") or {}).get("score"),
        "referral_with_policy": (done["with_policy"].get("referral") or {}).get("score"),
        "parsed_rate": done["policy_free"].get("parsed_rate"),
        "forgetting": forgetting.get("accuracy"),
    }


def paired_bootstrap(a_by_seed: Mapping[Any, Mapping[Any, float]], b_by_seed: Mapping[Any, Mapping[Any, float]],
                     n_resamples: int = 10000, seed: int = 0, alpha: float = 0.05,
                     names: tuple[str, str] = ("a", "b")) -> dict[str, Any]:
    """Paired bootstrap of (a - b): each argument maps seed -> {item_id: score}.

    Items are paired by (seed, id) present in both. The statistic is the mean over seeds of
    (mean_a - mean_b) on that seed's paired items, so every seed weighs the same, as in the table's mean
    over seeds. Each resample draws, within each seed, that seed's paired items with replacement, the
    SAME draws for a and b (which is what makes it paired: item difficulty cancels in a - b); the
    interval is the (alpha/2, 1 - alpha/2) percentile of the resampled statistics. Deterministic in `seed`.

    Returns {"diff", "low", "high", "n_items", "n_seeds", "seeds", "n_unpaired"} (fractions, not points;
    n_unpaired counts the items of either side that had no partner and were left out).
    """
    if n_resamples < 1:
        raise ValueError(f"paired_bootstrap: n_resamples must be >= 1, got {n_resamples}")
    if not 0 < alpha < 1:
        raise ValueError(f"paired_bootstrap: alpha must be in (0, 1), got {alpha}")
    diffs: list[np.ndarray] = []
    seeds: list[Any] = []
    n_unpaired = 0
    for s in sorted(set(a_by_seed) | set(b_by_seed), key=str):
        a, b = a_by_seed.get(s) or {}, b_by_seed.get(s) or {}
        common = [i for i in a if i in b]
        n_unpaired += len(a) + len(b) - 2 * len(common)
        if common:
            diffs.append(np.array([float(a[i]) - float(b[i]) for i in common], dtype=np.float64))
            seeds.append(s)
    if not diffs:
        raise ValueError(f"paired_bootstrap: {names[0]} and {names[1]} share no (seed, item id); they must be "
                         f"evaluated on the same seeds and test items (a seeds {sorted(a_by_seed, key=str)}, "
                         f"b seeds {sorted(b_by_seed, key=str)})")
    rng = np.random.default_rng(seed)
    stats = np.zeros(n_resamples, dtype=np.float64)
    for d in diffs:
        n = len(d)
        # a chunk of resamples at a time keeps the (resamples x items) index array near 4M entries
        chunk = max(1, 4_000_000 // n)
        for start in range(0, n_resamples, chunk):
            stop = min(n_resamples, start + chunk)
            idx = rng.integers(0, n, size=(stop - start, n))
            stats[start:stop] += d[idx].mean(axis=1)
    stats /= len(diffs)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return {"diff": float(np.mean([d.mean() for d in diffs])), "low": float(low), "high": float(high),
            "n_items": int(sum(len(d) for d in diffs)), "n_seeds": len(diffs), "seeds": seeds,
            "n_unpaired": int(n_unpaired)}


def _item_scores(done: dict[str, Any]) -> dict[Any, float] | None:
    """{item id: score} of the paired view, or None for a done.json written before item_scores existed."""
    rows = (done.get(PAIRED_VIEW) or {}).get("item_scores")
    if rows is None:
        return None
    scores = {i: float(score) for i, score in rows}
    if len(scores) != len(rows):
        # duplicate ids would pair the wrong items; leave this seed out rather than report a wrong interval
        return None
    return scores


def paired_differences(item_scores: dict[str, dict[str, dict[str, dict[Any, float] | None]]],
                       comparisons: Sequence[tuple[str, str, str]] = PAIRED_COMPARISONS,
                       n_resamples: int = 10000, seed: int = 0) -> list[dict[str, Any]]:
    """One entry per comparison whose two methods have an eval on some dataset key:
    {"label", "a", "b", "by_key": {key: paired_bootstrap(...) or {"missing": why}}}."""
    out = []
    for label, a, b in comparisons:
        by_key: dict[str, dict[str, Any]] = {}
        for key, methods in sorted(item_scores.items()):
            if a not in methods or b not in methods:
                continue
            sa = {s: v for s, v in methods[a].items() if v is not None}
            sb = {s: v for s, v in methods[b].items() if v is not None}
            if not sa or not sb:
                by_key[key] = {"missing": "no per-item scores (done.json predates item_scores, or duplicate "
                                          "item ids); re-run the eval stage of "
                                          + " and ".join(m for m, v in ((a, sa), (b, sb)) if not v)}
                continue
            try:
                by_key[key] = paired_bootstrap(sa, sb, n_resamples=n_resamples, seed=seed, names=(a, b))
            except ValueError as e:
                by_key[key] = {"missing": str(e)}
        if by_key:
            out.append({"label": label, "a": a, "b": b, "by_key": by_key})
    return out


def collect(run_dir: Path) -> dict[str, Any]:
    """Everything the report shows, as plain data (plus "item_scores", which write_report leaves out of
    metrics.json: the done.json files already hold them)."""
    run_dir = Path(run_dir)
    run = _load(run_dir / "run.json") or {}
    per_seed: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    item_scores: dict[str, dict[str, dict[str, dict[Any, float] | None]]] = {}
    for done_path in sorted((run_dir / "eval").glob("*/seed*/*/done.json")):
        method, seed_dir, key = done_path.parent.name, done_path.parent.parent.name, done_path.parent.parent.parent.name
        done = json.loads(done_path.read_text())
        per_seed.setdefault(key, {}).setdefault(method, {})[seed_dir[4:]] = seed_metrics(done)
        item_scores.setdefault(key, {}).setdefault(method, {})[seed_dir[4:]] = _item_scores(done)
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for key, methods in per_seed.items():
        for method, seeds in methods.items():
            names = next(iter(seeds.values())).keys()
            summary.setdefault(key, {})[method] = {
                name: mean_and_spread([s[name] for s in seeds.values() if s.get(name) is not None]) for name in names}
            summary[key][method]["seeds"] = sorted(int(s) for s in seeds)
    data = {}
    for done_path in sorted((run_dir / "data").glob("*/done.json")):
        data[done_path.parent.name] = json.loads(done_path.read_text())
    cost = {}
    for done_path in sorted((run_dir / "cost").glob("*/done.json")):
        cost[done_path.parent.name] = json.loads(done_path.read_text())
    return {"run": run, "per_seed": per_seed, "summary": summary, "data": data, "cost": cost,
            "paired": paired_differences(item_scores), "item_scores": item_scores,
            "toy_base": _load(run_dir / "toy_base.json"), "timings": _load(run_dir / "timings.json") or {}}


# =========================================================================== markdown


def _fmt(stat: dict[str, Any] | None, pct: bool = True) -> str:
    if not stat or stat.get("n", 0) == 0 or stat["mean"] is None or math.isnan(stat["mean"]):
        return "–"
    scale = 100 if pct else 1
    text = f"{scale * stat['mean']:.1f}"
    if stat["n"] > 1:
        text += f" ± {scale * stat['std']:.1f}"
    return text


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _signed_points(x: float) -> str:
    """A fraction as signed points with a true minus sign: 0.035 -> '+3.5', -0.01 -> '−1.0'."""
    v = round(100 * x, 1)
    v = 0.0 if v == 0 else v  # no '-0.0'
    return f"{v:+.1f}".replace("-", "−")


def _fmt_paired(cell: dict[str, Any] | None) -> str:
    if not cell or "missing" in cell:
        return "–"
    return f"{_signed_points(cell['diff'])} [{_signed_points(cell['low'])}, {_signed_points(cell['high'])}]"


def _paired_section(paired: list[dict[str, Any]], keys: list[str]) -> list[str]:
    labels = _labels()
    lines = ["## Paired differences (bootstrap 95% interval)", ""]
    rows = [[f"{p['label']} ({labels.get(p['a'], p['a'])} − {labels.get(p['b'], p['b'])})"]
            + [_fmt_paired(p["by_key"].get(k)) for k in keys] for p in paired]
    lines.append(_table(["comparison"] + keys, rows))
    lines.append("")
    lines.append("Points of policy-free accuracy, a − b: the mean over seeds of the per-seed difference on the "
                 "test items both methods answered, with a paired bootstrap 95% interval (items resampled "
                 "within each seed, the same draws for both methods).")
    missing = sorted({f"{p['label']} on {k}: {c['missing']}" for p in paired for k, c in p["by_key"].items()
                      if "missing" in c})
    lines += [f"- – {m}" for m in missing]
    lines.append("")
    return lines


def _methods_present(summary: dict[str, Any]) -> list[str]:
    present = {m for key in summary.values() for m in key}
    return [m for m in _method_order() if m in present]


def reading(summary: dict[str, Any], chance: dict[str, float]) -> list[str]:
    """What the table says about the paper's ordering, computed from the numbers (never assumed)."""
    out = []
    for key, methods in sorted(summary.items()):
        acc = {m: v["accuracy"]["mean"] for m, v in methods.items() if v["accuracy"]["n"]}
        if not acc:
            continue
        best = max(acc, key=acc.get)
        line = f"- **{key}**: best method {_labels().get(best, best)} at {100 * acc[best]:.1f}%"
        if key in chance:
            line += f" (chance line {100 * chance[key]:.1f}%)"
        trimpi = [m for m in ("trimpi-dapo", "trimpi-grpo") if m in acc]
        if trimpi:
            t = max(trimpi, key=acc.get)
            comparisons = []
            for other in ("cot-sft", "in-context"):
                if other in acc:
                    sign = ">" if acc[t] > acc[other] else "<" if acc[t] < acc[other] else "="
                    comparisons.append(f"{_labels()[t]} {100 * acc[t]:.1f} {sign} {_labels()[other]} {100 * acc[other]:.1f}")
            if key in chance:
                margin = acc[t] - chance[key]
                comparisons.append(f"{'above' if margin > 0.05 else 'NOT clearly above'} the chance line "
                                   f"({100 * margin:+.1f} points)")
            holds = all(acc[t] > acc[o] for o in ("cot-sft", "in-context") if o in acc) and \
                (key not in chance or acc[t] > chance[key] + 0.05)
            line += ". " + "; ".join(comparisons) + (". The paper's ordering holds here." if holds else
                                                      ". The paper's ordering does NOT hold here.")
        out.append(line)
    return out


def markdown(data: dict[str, Any], wall_seconds: float | None = None) -> str:
    summary, run = data["summary"], data["run"]
    cfg = run.get("config", {})
    keys = sorted(summary)
    methods = _methods_present(summary)
    labels = _labels()
    chance = {k: v.get("chance") for k, v in data["data"].items() if v.get("chance") is not None}
    seeds = sorted({s for k in summary.values() for m in k.values() for s in m["seeds"]})
    lines = [f"# MPI results: {Path(cfg.get('out_dir', 'runs')) / run.get('name', '')}".rstrip("/"), ""]
    lines.append(f"Preset **{cfg.get('preset')}**, model `{cfg.get('model')}`, seeds {seeds}. "
                 "Cells are mean ± sample std over seeds (in %). Headline accuracy is policy-free for trained "
                 "methods and with the policy in the prompt for the in-context baseline.")
    lines.append("")
    lines.append("## Accuracy (the paper's table)")
    lines.append("")
    rows = [[labels.get(m, m)] + [_fmt(summary[k].get(m, {}).get("accuracy")) for k in keys] for m in methods]
    rows.append(["chance (majority answer per policy)"] + [f"{100 * chance[k]:.1f}" if k in chance else "–" for k in keys])
    lines.append(_table(["method"] + keys, rows))
    lines.append("")
    lines += reading(summary, chance)
    lines.append("")
    if data.get("paired"):
        lines += _paired_section(data["paired"], keys)
    for metric in ("policy_free", "with_policy", "override", "referral", "forgetting"):
        lines.append(f"## {METRICS[metric]}")
        lines.append("")
        pct = metric != "referral"
        rows = [[labels.get(m, m)] + [_fmt(summary[k].get(m, {}).get(metric), pct=pct) for k in keys] for m in methods]
        lines.append(_table(["method"] + keys, rows))
        if metric == "forgetting":
            lines.append("")
            lines.append("The in-context row is the base model itself (no training): the forgetting baseline.")
        lines.append("")
    if data["cost"]:
        lines.append("## Cost of the policy in the prompt")
        lines.append("")
        rows = []
        for k, c in sorted(data["cost"].items()):
            t = c["tokens"].get(k) or next(iter(c["tokens"].values()))
            p = c["prefill"]
            mem = p.get("memory_saving")
            rows.append([k, f"{t['with_policy']:.0f}", f"{t['without_policy']:.0f}", f"{100 * t['saved']:.1f}%",
                         f"{1000 * p['with_policy']['prefill_seconds']:.1f}", f"{1000 * p['without_policy']['prefill_seconds']:.1f}",
                         f"{100 * p['prefill_saving']:.1f}%", f"{100 * mem:.1f}%" if mem is not None else "–", p["device"]])
        lines.append(_table(["dataset", "tokens with policy", "without", "tokens saved", "prefill ms with",
                             "without", "prefill saved", "peak memory saved", "device"], rows))
        lines.append("")
        lines.append("The paper reports up to 93.9% of prompt tokens and 85.7% of prefill time saved (Qwen2.5-VL-7B, N=6).")
        lines.append("")
    if data.get("toy_base"):
        tb = data["toy_base"]
        lines.append("## Toy base")
        lines.append("")
        skills = ""
        if tb.get("skills"):
            from mpi.toy_base import skills_line

            skills = f" Premises: {skills_line(tb['skills'])}."
        lines.append(f"`{tb.get('path', '')}`: trained {tb.get('train_seconds', 0) / 60:.1f} min "
                     f"({tb['config']['steps']} steps). General skills {100 * tb['general_skill']['accuracy']:.1f}% "
                     f"(random init {100 * tb['general_skill_random_init']['accuracy']:.1f}%), per task "
                     + ", ".join(f"{k} {100 * v:.0f}%" for k, v in tb["general_skill"]["per_task"].items())
                     + "." + skills)
        lines.append("")
    if data["timings"]:
        lines.append("## Wall time per stage")
        lines.append("")
        rows = [[stage, f"{t['seconds']:.1f}", "skipped (done)" if t.get("skipped_last_run") else ""]
                for stage, t in data["timings"].items()]
        lines.append(_table(["stage", "seconds", "last run"], rows))
        if wall_seconds is not None:
            lines.append("")
            lines.append(f"This invocation took {wall_seconds / 60:.1f} min.")
        lines.append("")
    return "\n".join(lines) + "\n"


# =========================================================================== plots


def plot_accuracy(data: dict[str, Any], metric: str = "accuracy", out_png: Path | None = None, title: str | None = None):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    summary = data["summary"]
    keys = sorted(summary)
    methods = _methods_present(summary)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(methods) * max(1, len(keys))), 3.6))
    width = 0.8 / max(1, len(keys))
    x = np.arange(len(methods))
    chance = {k: v.get("chance") for k, v in data["data"].items()}
    for j, key in enumerate(keys):
        stats = [summary[key].get(m, {}).get(metric) or {"mean": float("nan"), "std": 0.0} for m in methods]
        means = [100 * s["mean"] for s in stats]
        errs = [100 * (s.get("std") or 0.0) for s in stats]
        bars = ax.bar(x + j * width - 0.4 + width / 2, means, width, yerr=errs, capsize=3, label=key)
        if chance.get(key) is not None and metric != "forgetting":
            ax.axhline(100 * chance[key], color=bars.patches[0].get_facecolor(), ls="--", lw=1,
                       label=f"chance {key}")
    ax.set_xticks(x)
    ax.set_xticklabels([_labels().get(m, m) for m in methods], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(title or METRICS.get(metric, metric))
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    if out_png is not None:
        fig.savefig(out_png, dpi=100)
    return fig


def plot_cost(data: dict[str, Any], out_png: Path | None = None):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cost = data["cost"]
    keys = sorted(cost)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, (what, unit) in zip(axes, (("tokens", "prompt tokens"), ("prefill", "prefill ms"))):
        with_p, without = [], []
        for k in keys:
            if what == "tokens":
                t = cost[k]["tokens"].get(k) or next(iter(cost[k]["tokens"].values()))
                with_p.append(t["with_policy"])
                without.append(t["without_policy"])
            else:
                p = cost[k]["prefill"]
                with_p.append(1000 * p["with_policy"]["prefill_seconds"])
                without.append(1000 * p["without_policy"]["prefill_seconds"])
        xs = range(len(keys))
        ax.bar([x - 0.2 for x in xs], with_p, 0.4, label="policy in prompt")
        ax.bar([x + 0.2 for x in xs], without, 0.4, label="policy internalized")
        for x, a, b in zip(xs, with_p, without):
            ax.text(x, max(a, b), f"saves {100 * (1 - b / a):.0f}%", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(keys)
        ax.set_ylabel(unit)
        ax.legend(fontsize=7)
    fig.suptitle("what dropping the policy saves")
    fig.tight_layout()
    if out_png is not None:
        fig.savefig(out_png, dpi=100)
    return fig


def write_report(run_dir: str | Path, wall_seconds: float | None = None) -> dict[str, Any]:
    """Write report.md, metrics.json and the PNG plots of a run; return the collected metrics."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no run.json); run `python -m mpi` first")
    data = collect(run_dir)
    data["run"]["name"] = run_dir.name
    # metrics.json keeps the paired intervals ("paired"), not the per-item scores they came from
    atomic_write_json(run_dir / "metrics.json", {k: v for k, v in data.items() if k != "item_scores"})
    atomic_write_text(run_dir / "report.md", markdown(data, wall_seconds))
    plots = []
    if data["summary"]:
        for metric in ("accuracy", "override", "forgetting"):
            fig = plot_accuracy(data, metric, run_dir / f"{metric}.png")
            plt.close(fig)
            plots.append(f"{metric}.png")
    if data["cost"]:
        fig = plot_cost(data, run_dir / "cost.png")
        plt.close(fig)
        plots.append("cost.png")
    if plots:
        text = (run_dir / "report.md").read_text() + "## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots) + "\n"
        atomic_write_text(run_dir / "report.md", text)
    data["plots"] = plots
    return data
