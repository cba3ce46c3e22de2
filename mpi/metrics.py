"""Metrics: one CSV row and one JSON line per step, and `plot_metrics` to draw them.

Both files are appended to (a resumed run continues the same log); `MetricsLogger(..., resume_step=k)`
first drops rows past step k so a run resumed from a checkpoint at step k never shows duplicates.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from mpi.atomic import atomic_write_text


MAX_PROGRESS_LINES = 50  # printed lines per training stage unless log_every says otherwise


def progress_every(log_every: int | None, total_steps: int | None) -> int:
    """Steps between two printed progress lines: log_every, else at most MAX_PROGRESS_LINES lines."""
    if log_every:
        return max(1, int(log_every))
    return max(1, math.ceil((total_steps or 1) / MAX_PROGRESS_LINES))


class MetricsLogger:
    def __init__(self, out_dir: str | os.PathLike, *, resume_step: int | None = None, echo: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.out_dir / "metrics.jsonl"
        self.csv_path = self.out_dir / "metrics.csv"
        self.echo = echo
        self.rows: list[dict[str, Any]] = read_metrics(self.jsonl_path) if self.jsonl_path.exists() else []
        if resume_step is not None:
            self.rows = [r for r in self.rows if r.get("step", 0) <= resume_step]
        elif self.rows:
            # A fresh (non-resumed) run into an existing directory starts a fresh log.
            self.rows = []
        self._rewrite()

    def log(self, step: int, **metrics: Any) -> dict[str, Any]:
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self.rows.append(row)
        with self.jsonl_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        self._write_csv()
        if self.echo:
            print(format_row(row))
        return row

    def _rewrite(self) -> None:
        atomic_write_text(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self._write_csv()

    def _write_csv(self) -> None:
        # Columns can appear later (e.g. eval metrics every K steps), so the CSV is rewritten whole.
        columns: list[str] = []
        for row in self.rows:
            columns.extend(k for k in row if k not in columns)
        lines: list[str] = []

        class _Sink:
            def write(self, s: str) -> None:
                lines.append(s)

        writer = csv.DictWriter(_Sink(), fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.csv_path, "".join(lines))


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    return value


def format_row(row: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    """One printed line per step: 'step 12 | loss 1.234 | reward 0.500 ...'."""
    parts = [f"step {row['step']:>4}"]
    for key in keys or [k for k in row if k != "step"]:
        value = row.get(key)
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        elif isinstance(value, (int, str)):
            parts.append(f"{key} {value}")
    return " | ".join(parts)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (or of the metrics.jsonl inside a directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics log at {path}: pass the run directory or its metrics.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_metrics(source: str | os.PathLike | list[dict[str, Any]], keys: Iterable[str] | None = None,
                 out_png: str | os.PathLike | None = None, smooth: int = 1, title: str | None = None):
    """One panel per metric against step. `smooth` > 1 overlays a running mean of that window."""
    import matplotlib.pyplot as plt  # headless machines fall back to Agg on their own

    rows = source if isinstance(source, list) else read_metrics(source)
    if keys is None:
        keys = [k for k in rows[0] if k != "step" and isinstance(rows[0][k], (int, float))] if rows else []
    keys = list(keys)
    if not keys:
        raise ValueError("plot_metrics: no numeric metric to plot; pass keys=[...] naming logged metrics")
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if not points:
            ax.set_title(f"{key} (not logged)")
            continue
        steps, values = zip(*points)
        ax.plot(steps, values, alpha=0.4 if smooth > 1 else 1.0, label=key)
        if smooth > 1 and len(values) >= smooth:
            run = [sum(values[max(0, i - smooth + 1): i + 1]) / len(values[max(0, i - smooth + 1): i + 1]) for i in range(len(values))]
            ax.plot(steps, run, label=f"mean of {smooth}")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if out_png is not None:
        fig.savefig(out_png, dpi=100)
    return fig


# =========================================================================== RL: sample tables, validation curve


def _thumbnail_b64(image, size: int = 96) -> str:
    img = image.copy()
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_sample_table(out_dir: str | Path, step: int, ro, max_groups: int = 2) -> Path:
    """samples/step_XXXXXX.html (image, query, each completion, its origin and reward) and .jsonl."""
    G2 = ro.completion_ids.shape[0] // ro.num_groups
    records, rows_html = [], []
    for g, item in enumerate(ro.items[:max_groups]):
        images = item.get("images") or []
        thumb = f'<img src="data:image/png;base64,{_thumbnail_b64(images[0])}"/>' if images else ""
        for k in range(G2):
            r = g * G2 + k
            rec = {"step": step, "id": item.get("id"), "origin": "guided" if bool(ro.guided[r]) else "own",
                   "answer": item.get("answer"), "completion": ro.texts[r],
                   **{key: float(v[r]) for key, v in ro.rewards.items()}}
            records.append(rec)
            rows_html.append(
                f"<tr><td>{thumb if k == 0 else ''}</td><td>{html.escape(str(item.get('query', '')))[:200] if k == 0 else ''}"
                f"</td><td>{rec['origin']}</td><td><pre>{html.escape(rec['completion'])}</pre></td>"
                f"<td>{html.escape(str(rec['answer']))}</td><td>{rec['reward']:.2f}</td></tr>")
    table = ("<table><tr><th>image</th><th>query</th><th>origin</th><th>completion</th><th>gold</th><th>reward</th></tr>"
             + "".join(rows_html) + "</table>")
    base = Path(out_dir) / "samples" / f"step_{step:06d}"
    atomic_write_text(base.with_suffix(".jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    return atomic_write_text(base.with_suffix(".html"), table)


def plot_validation(run_dir: str | Path, out_png: str | Path | None = None):
    """The validation curve and the own / guided training rewards of a run (reads its metrics.jsonl)."""
    rows = read_metrics(run_dir)
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k.startswith("val/") and "reward" not in k]
    keys += [k for k in ("own/reward_mean", "guided/reward_mean", "all/zero_std_frac", "guidance/guided_group_frac")
             if any(k in r for r in rows)]
    return plot_metrics(rows, keys, out_png=out_png, title=str(run_dir))


# =========================================================================== RL: metrics per origin (own / guided)


def origin_metrics(ro, adv: torch.Tensor, loss_mask: torch.Tensor, token_stats: dict, group_size: int,
                   cfg) -> dict[str, float]:
    """Reward, accuracy, advantage, KL, entropy, clipping, lengths, ratios: for all rows and per origin."""
    import numpy as np
    import torch

    from mpi.grpo import masked_mean

    out: dict[str, float] = {}
    lengths = ro.eos_mask.sum(1).float()
    origins = [("all", torch.ones_like(ro.guided))] + [("own", ~ro.guided)] + ([("guided", ro.guided)] if ro.guided.any() else [])
    for name, sel in origins:
        if not sel.any():
            continue
        rows_mask = loss_mask * sel.unsqueeze(1)
        eos_rows = ro.eos_mask * sel.unsqueeze(1)
        r = ro.rewards["reward"][sel]
        out[f"{name}/reward_mean"] = float(r.mean())
        out[f"{name}/reward_std"] = float(r.std(unbiased=False))
        out[f"{name}/accuracy"] = float(ro.rewards["accuracy"][sel].mean())
        if "format" in ro.rewards:
            out[f"{name}/format"] = float(ro.rewards["format"][sel].mean())
        out[f"{name}/advantage_mean"] = float(adv[sel].mean())
        out[f"{name}/completion_length"] = float(lengths[sel].mean())
        out[f"{name}/truncated_frac"] = float(ro.truncated[sel].float().mean())
        out[f"{name}/entropy"] = masked_mean(token_stats["entropy"], eos_rows)
        out[f"{name}/clip_low_frac"] = masked_mean(token_stats["clip_low"], rows_mask)
        out[f"{name}/clip_high_frac"] = masked_mean(token_stats["clip_high"], rows_mask)
        out[f"{name}/ratio_mean"] = masked_mean(token_stats["ratio"], rows_mask)
        out[f"{name}/ratio_max"] = float(token_stats["ratio"][rows_mask.bool()].max()) if rows_mask.any() else math.nan
        if cfg.beta > 0:
            out[f"{name}/kl"] = masked_mean(token_stats["kl"], rows_mask)
        # groups whose rows of this origin all got the same reward (among the groups that have such rows:
        # with adaptive_guidance the pattern differs from group to group)
        per_group, sel_groups = ro.rewards["reward"].view(-1, group_size), sel.view(-1, group_size)
        flat = [float(per_group[g][sel_groups[g]].max() - per_group[g][sel_groups[g]].min()) <= 1e-6
                for g in range(per_group.shape[0]) if sel_groups[g].any()]
        out[f"{name}/zero_std_frac"] = float(np.mean(flat))
    return out


def behaviour_ratio_metrics(old_logp: torch.Tensor, behaviour: torch.Tensor, eos_mask: torch.Tensor,
                            guided: torch.Tensor, cap: float) -> dict[str, float]:
    """How far pi_old(o|q) / pi_old(o|q,P) is from 1 on the guided responses (1 = no mismatch)."""
    mask = eos_mask[guided].bool()
    log_ratio = (old_logp[guided] - behaviour[guided])
    tok = log_ratio[mask]
    if tok.numel() == 0:
        return {}
    seq = (log_ratio * mask).sum(1)
    return {
        "guided/is_ratio_mean": float(tok.exp().mean()),
        "guided/is_ratio_min": float(tok.exp().min()),
        "guided/is_ratio_max": float(tok.exp().max()),
        "guided/is_log_ratio_mean": float(tok.mean()),
        "guided/is_seq_log_ratio_mean": float(seq.mean()),
        "guided/is_capped_frac": float((tok.exp() > cap).float().mean()),
    }
