"""Data construction speed: scene rendering and dataset building, in items per second.

    python benchmarks/bench_data.py                 # quick: rendering at 56/112/224 px, 1K-item builds
    python benchmarks/bench_data.py --paper         # also the paper-size ClevrPolicy train split (one N, 20K)

Numbers are measured here, in this run; nothing is hard-coded. The paper-size target is < 5 minutes
on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bench_render(n: int = 200) -> None:
    from mpi.data.clevr import make_rng
    from mpi.data.build import png_bytes
    from mpi.data.scenes import render_scene, sample_scene, warm_sprites

    t = time.perf_counter()
    warm_sprites()
    print(f"sprite cache warm-up: {time.perf_counter() - t:.2f} s (once per process)")
    for size in (56, 112, 224):
        rng = make_rng(0, "bench", size)
        t = time.perf_counter()
        scenes = [sample_scene(rng, size) for _ in range(n)]
        t_sample = time.perf_counter() - t
        t = time.perf_counter()
        images = [render_scene(s, size) for s in scenes]
        t_render = time.perf_counter() - t
        t = time.perf_counter()
        for im in images:
            png_bytes(im)
        t_png = time.perf_counter() - t
        print(f"{size:>3} px: sample {n / t_sample:8.0f} scenes/s | render {n / t_render:6.0f} images/s | "
              f"PNG {n / t_png:6.0f} images/s")


def bench_build(n_items: int, depth: int, image_size: int, num_proc: int, label: str) -> float:
    from mpi.data import build_clevr_policy, get_data_config

    n_policies = 10 if n_items >= 10_000 else 1
    cfg = get_data_config("paper", n_policies=n_policies, n_train_per_policy=n_items // n_policies,
                          depths=(depth,), image_size=image_size, num_proc=num_proc)
    t = time.perf_counter()
    ds = build_clevr_policy(cfg, split="train")
    dt = time.perf_counter() - t
    print(f"{label}: {len(ds)} items, N={depth}, {image_size} px, {num_proc} proc: {dt:6.1f} s "
          f"= {len(ds) / dt:5.0f} items/s")
    return dt


def bench_gta(n: int = 451) -> None:
    from mpi.data import build_gta_policy, get_data_config

    cfg = get_data_config("paper", n_gta_train=n, num_proc=1)
    t = time.perf_counter()
    ds = build_gta_policy(cfg, "train")
    dt = time.perf_counter() - t
    print(f"GTAPolicy train: {len(ds)} items, 224 px: {dt:.1f} s = {len(ds) / dt:.0f} items/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--paper", action="store_true", help="build the paper-size ClevrPolicy train split (20K, one N)")
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    print(f"cpu cores: {os.cpu_count()}")
    bench_render()
    for proc in sorted({1, args.num_proc}):
        bench_build(1000, args.depth, 224, proc, "ClevrPolicy 1K")
    bench_gta()
    if args.paper:
        dt = bench_build(20_000, args.depth, 224, args.num_proc, "ClevrPolicy paper-size train")
        print(f"paper-size target (< 300 s): {'met' if dt < 300 else 'NOT met'} ({dt:.0f} s)")


if __name__ == "__main__":
    main()
