"""`python -m mpi`: the command-line entry point.

    python -m mpi                       the end-to-end pipeline (mpi.pipeline) on the toy preset
    python -m mpi --dry-run             the plan, every stage's resolved config and the memory check (mpi.dry_run)
    python -m mpi report runs/toy       redraw a run's report (mpi.report)
    python -m mpi toy-base              the toy base only: the shipped one, else built once and cached (mpi.toy_base)
    python -m mpi toy-base --rebuild    train the toy base again on this machine (20-40 min on 2 CPU cores)
    python -m mpi smoke                 build the toy VLM, one forward and one generate (mpi.modeling.smoke)

The arguments are the pipeline's (`mpi.pipeline.build_parser`); this module only dispatches, so that the
pipeline never imports the commands built on top of it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mpi import pipeline


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = pipeline.build_parser().parse_args(argv)
    try:
        if args.command == "smoke":
            from mpi.modeling import smoke

            smoke()
            return 0
        if args.command == "report":
            if not args.run_dir:
                raise pipeline.PipelineError("report needs the run directory: python -m mpi report runs/toy")
            from mpi.report import write_report

            write_report(Path(args.run_dir))
            print(f"report: {Path(args.run_dir) / 'report.md'}")
            return 0
        cfg = pipeline.config_from_args(args)
        if args.command == "toy-base":
            from mpi.toy_base import build_toy_base, ship_toy_base

            plan = pipeline.make_plan(cfg, name=args.name)
            base_cfg = pipeline.toy_base_cfg(plan)
            if args.dry_run:  # a build is an hour of CPU: say what would happen, train nothing
                from mpi.toy_base import toy_base_path

                path = toy_base_path(base_cfg, shipped=not args.rebuild)
                ready = (path / "toy_base.json").exists() and not args.rebuild
                print(f"toy base config: {base_cfg.to_dict()}")
                plan_text = "ready: nothing to train" if ready else f"would train {base_cfg.steps} steps"
                print(f"toy base: {path} ({plan_text})")
                return 0
            print(build_toy_base(base_cfg, overwrite=args.rebuild, device=cfg.device))
            if args.ship:
                print(f"shipped: {ship_toy_base(base_cfg, device=cfg.device)}")
            return 0
        methods = args.methods or (tuple(pipeline.METHODS) if args.all else
                                   tuple(pipeline.TABLE_METHODS) if args.table else None)
        seeds = args.seeds or ([0, 1, 2] if args.all or args.table else None)
        plan = pipeline.make_plan(cfg, name=args.name, methods=methods, seeds=seeds)
        if args.dry_run:  # the plan, resolved configs and memory preflight; nothing loaded
            from mpi.dry_run import dry_run

            return dry_run(plan)
        pipeline.quiet_library_bars()
        procs = pipeline.processes()
        if procs.main:
            print(f"run {plan.run_dir} | preset {cfg.preset} | model {cfg.model} | methods {', '.join(plan.methods)} | "
                  f"datasets {', '.join(plan.dataset_keys)} | seeds {', '.join(map(str, plan.seeds))}"
                  + (f" | {procs.world} processes" if procs.world > 1 else ""))
        pipeline.run(plan)
        return 0
    except pipeline.PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
