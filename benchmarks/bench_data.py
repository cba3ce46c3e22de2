"""Data construction: scene statistics of the splits, and speed (items per second).

    python benchmarks/bench_data.py                 # quick: scene statistics (small N=2/4, paper-like N=2/4/6
                                                    #   at 200 train scenes per policy), rendering, 1K-item builds
    python benchmarks/bench_data.py --stats-only    # only the scene statistics
    python benchmarks/bench_data.py --paper         # also the paper-size statistics (2K per policy) and the
                                                    #   paper-size ClevrPolicy train split build (one N, 20K)

Scene statistics, per preset and N: the object-count histogram and color marginals (%) of the
balanced training split next to the unbalanced sampler's (balanced=False) and the untilted
conditional (plain rejection sampling per outcome, `match_natural=False`), the largest gap to the
natural statistics (percentage points), and the share of test / override items whose object set
is unseen in training under the same policy, with the rule (the default) and without it
(`test_unseen_objects=False`). Numbers are measured here, in this run; nothing is hard-coded.
The paper-size target is < 5 minutes on a 2-core machine.
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


def _pct(d: dict) -> str:
    return " ".join(f"{k}:{100 * v:.1f}" for k, v in d.items())


def bench_scene_stats(preset: str, depths: tuple[int, ...], n_train: int | None = None,
                      n_test: int | None = None) -> None:
    from mpi.data import get_data_config
    from mpi.data.build import clevr_split_records
    from mpi.data.clevr import (clevr_policies, item_object_lists, max_share_gap, natural_scene_statistics,
                                scene_statistics, split_overlap)

    sizes = {k: v for k, v in (("n_train_per_policy", n_train), ("n_test", n_test)) if v is not None}
    cfg = get_data_config(preset, **sizes)
    natural = natural_scene_statistics(cfg.n_objects)
    print(f"\n== scene statistics: preset {preset!r}, {cfg.n_policies} policies x {cfg.n_train_per_policy} train, "
          f"{cfg.n_test} test per N, {cfg.n_objects[0]}-{cfg.n_objects[1]} objects ==")
    print(f"natural sampler (by construction): objects {_pct(natural['n_objects'])} | every color "
          f"{100 / len(natural['color']):.1f}%")
    for depth in depths:
        t = time.perf_counter()
        train = clevr_split_records(cfg, "train", depth)
        t_train = time.perf_counter() - t
        t = time.perf_counter()
        test = clevr_split_records(cfg, "test", depth)
        override = clevr_split_records(cfg, "override", depth)
        t_eval = time.perf_counter() - t
        plain = get_data_config(preset, test_unseen_objects=False, **sizes)
        test_plain = clevr_split_records(plain, "test", depth)
        override_plain = clevr_split_records(plain, "override", depth)
        unbalanced = clevr_split_records(get_data_config(preset, balanced=False, **sizes), "train", depth)
        untilted = [{"policy_name": p.name, "scene": {"objects": o}}
                    for p in clevr_policies(depth, cfg.n_policies, cfg.seed, kinds=cfg.condition_kinds)
                    for _, o in item_object_lists(p, cfg.n_train_per_policy, split="train", seed=cfg.seed,
                                                  n_objects=cfg.n_objects, match_natural=False)[0]]
        print(f"-- N={depth}: train {len(train)} items in {t_train:.1f} s, test+override "
              f"{len(test) + len(override)} in {t_eval:.1f} s (objects, layout and CoT; no rendering)")
        for label, recs in (("balanced (default)", train), ("unbalanced sampler", unbalanced),
                            ("untilted rejection", untilted)):
            st = scene_statistics(recs)
            gap = max_share_gap(st, natural)
            print(f"   {label:<19} objects {_pct(st['n_objects'])}")
            print(f"   {'':<19} colors  {_pct(st['color'])}")
            print(f"   {'':<19} gray {100 * st['color']['gray']:.1f}% | 1-object {100 * st['n_objects'].get(1, 0):.1f}%"
                  f" | largest gap to natural (pp): " + ", ".join(f"{k} {100 * v:.1f}" for k, v in gap.items()))
        st_test = scene_statistics(test)
        print(f"   test split objects {_pct(st_test['n_objects'])} (unseen rule on)")
        for name, with_rule, without in (("test", test, test_plain), ("override", override, override_plain)):
            on, off = split_overlap(train, with_rule), split_overlap(train, without)
            print(f"   {name:<8} object set unseen in training: {100 * on['unseen_share']:.1f}% "
                  f"(without the rule: {100 * off['unseen_share']:.1f}%)")


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
    ap.add_argument("--stats-only", action="store_true", help="only the scene statistics")
    ap.add_argument("--stats-train", type=int, default=200, help="paper-like statistics: train scenes per policy")
    args = ap.parse_args()
    print(f"cpu cores: {os.cpu_count()}")
    bench_scene_stats("small", (2, 4))
    if args.paper:
        bench_scene_stats("paper", (2, 4, 6))
    else:
        bench_scene_stats("paper", (2, 4, 6), n_train=args.stats_train, n_test=args.stats_train)
    if args.stats_only:
        return
    bench_render()
    for proc in sorted({1, args.num_proc}):
        bench_build(1000, args.depth, 224, proc, "ClevrPolicy 1K")
    bench_gta()
    if args.paper:
        dt = bench_build(20_000, args.depth, 224, args.num_proc, "ClevrPolicy paper-size train")
        print(f"paper-size target (< 300 s): {'met' if dt < 300 else 'NOT met'} ({dt:.0f} s)")


if __name__ == "__main__":
    main()
