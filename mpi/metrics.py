"""Metrics: one CSV row and one JSON line per step, and `plot_metrics` to draw them.

Both files are appended to (a resumed run continues the same log); `MetricsLogger(..., resume_step=k)`
first drops rows past step k so a run resumed from a checkpoint at step k never shows duplicates.
"""

from __future__ import annotations

import csv
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

