"""`python -m mpi --preset colab-t4 --dry-run`: the whole run, resolved and checked, in seconds, offline.

Prints what `python -m mpi` would do with the same arguments, and stops before anything is heavy:

    plan          every stage in order (data, toy base, cost, training chains, evaluations)
    model         the architecture numbers the memory estimate uses (from a config, never from weights),
                  and whether a hub checkpoint is in the local cache (no network is touched)
    data          each dataset key's DataConfig, validated, with its split sizes
    stages        each training stage's resolved config: SupervisedConfig (VM-CPT, SFT), GRPOConfig (RL),
                  checked by the stage module's own validation; the evaluation options
    memory        mpi.scale.memory's expected peak per stage against the device the run is for (this machine's
                  GPU, else the preset's target GPU: a T4 for colab-t4, 8 x 80 GB for paper)
    time          the estimated wall time of every stage and in total on that device (mpi.wall_time: tokens per
                  stage x a throughput table whose sources it names; the CPU's for toy and tiny)

Exit 0 when everything checks out; otherwise each problem is printed with the field to change and how
(exit 2, as the pipeline's other argument errors). No weights are loaded and nothing is written: a toy
model that is not built yet is described from its spec.

    python -m mpi --preset paper --dry-run
    python -m mpi.dry_run --preset paper --gpu a100-80 --num-processes 8    # another target
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mpi.methods import METHODS, RL_STAGES, SUPERVISED_STAGES, memory_stage, training_chains

# Where each preset is meant to run when this machine has no GPU: (mpi.scale.memory.KNOWN_GPUS key, processes).
TARGET_DEVICES: dict[str, tuple[str, int]] = {"colab-t4": ("t4", 1), "paper": ("h100", 8)}


@dataclass
class Problem:
    """One thing that would make the run fail: the field to change, what is wrong, and the fix."""

    field: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}\n    fix: {self.fix}"


@dataclass
class DryRunReport:
    lines: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)  # stage names in run order
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage kind -> resolved config
    data: dict[str, dict[str, Any]] = field(default_factory=dict)  # dataset key -> DataConfig + sizes
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)  # "cpt" / "sft" / "rl" -> estimate
    wall_time: Any = None  # mpi.wall_time.Estimate
    device: str = ""
    seconds: float = 0.0

    def say(self, text: str = "") -> None:
        self.lines.append(text)

    def problem(self, field_name: str, message: str, fix: str) -> None:
        new = Problem(field_name, message, fix)
        if new not in self.problems:  # one bad data_preset fails every dataset key alike: say it once
            self.problems.append(new)


def _wrap(prefix: str, values: dict[str, Any]) -> str:
    body = ", ".join(f"{k}={v!r}" for k, v in values.items())
    return textwrap.fill(body, width=116, initial_indent=prefix, subsequent_indent=" " * len(prefix))


def _field_of(message: str, default: str) -> str:
    """The config field a stage module's error message names ('DataConfig.image_size must be ...')."""
    match = re.search(r"\b(DataConfig|GRPOConfig|SupervisedConfig)\.(\w+)", message)
    if match:
        return f"{match.group(1)}.{match.group(2)}"
    match = re.search(r"\b(\w+)=", message)
    return match.group(1) if match else default


# =========================================================================== sections


def stage_names(plan) -> list[str]:
    """Every stage `mpi.pipeline.run` would run for `plan`, in its order."""
    from mpi.toy import is_toy

    names = [f"data/{key}" for key in plan.dataset_keys]
    if is_toy(plan.cfg.model):
        names.append("toy_base")
    names += [f"cost/{key}" for key in plan.dataset_keys]
    for seed in plan.seeds:
        for key in plan.dataset_keys:
            names += [f"train/{key}/seed{seed}/{'+'.join(c)}" for c in training_chains(plan.methods)]
            names += [f"eval/{key}/seed{seed}/{m}" for m in plan.methods]
    return names


def model_facts_offline(name: str, seed: int = 0):
    """mpi.scale.memory.ModelFacts without loading (or building) weights: a built toy's config.json, an unbuilt toy's
    spec, a directory's config.json, a cached hub config, else the published numbers in KNOWN_MODELS."""
    from mpi.scale.memory import KNOWN_MODELS, ModelFacts, facts_from_config
    from mpi.toy import TOY_SPECS, is_toy, toy_path

    if is_toy(name):
        built = toy_path(name, seed) / "config.json"
        if built.exists():
            return facts_from_config(json.loads(built.read_text()), name), f"toy, built at {built.parent}"
        s = TOY_SPECS[name]
        facts = ModelFacts(name, s.vocab_size, s.hidden_size, s.intermediate_size, s.num_hidden_layers,
                           s.num_attention_heads, s.num_key_value_heads, False, s.vision_depth, s.vision_hidden_size,
                           s.vision_intermediate_size, patch_size=s.patch_size, merge_size=s.merge_size)
        return facts, "toy, not built yet (built offline, in seconds, by the first stage that needs it)"
    if (Path(name) / "config.json").exists():
        return facts_from_config(json.loads((Path(name) / "config.json").read_text()), name), f"local directory {name}"
    cached = None
    try:
        from huggingface_hub import try_to_load_from_cache  # a file lookup in the cache, no request

        hit = try_to_load_from_cache(name, "config.json")
        cached = hit if isinstance(hit, str) else None
    except ImportError:  # pragma: no cover
        pass
    if cached:
        return facts_from_config(json.loads(Path(cached).read_text()), name), f"hub id, in the local cache ({cached})"
    if name in KNOWN_MODELS:
        where = ("hub id, NOT in the local cache: the first stage downloads it (with HF_HUB_OFFLINE=1 it would "
                 f"stop; download it once with `huggingface-cli download {name}`)")
        return KNOWN_MODELS[name], where
    raise ValueError(f"no architecture numbers for {name!r} offline")


def check_data(plan, rep: DryRunReport) -> None:
    from mpi.data import DATA_PRESETS, split_item_counts
    from mpi.pipeline import data_config

    rep.say("data")
    for key in plan.dataset_keys:
        try:
            dcfg = data_config(plan.cfg, key)
        except (ValueError, TypeError) as err:
            text = str(err)
            if "unknown data preset" in text:
                rep.problem("RunConfig.data_preset", text,
                            f"--set data_preset=<one of {', '.join(DATA_PRESETS)}> (or add the preset to "
                            "mpi/data/build.py's DATA_PRESETS)")
            else:
                name = _field_of(text, "data")
                short = name.split(".")[-1]
                rep.problem(name, f"dataset {key}: {text}",
                            f"--set {short}=<valid value>" if short in {f.name for f in dataclasses.fields(plan.cfg)}
                            else f"--set 'data={{\"{short}\": <valid value>}}'")
            continue
        sizes = split_item_counts(dcfg, "gta" if key == "gta" else "clevr")
        rep.data[key] = {"config": dataclasses.asdict(dcfg), "sizes": sizes}
        shown = {k: getattr(dcfg, k) for k in ("name", "n_policies", "n_train_per_policy", "n_test", "depths",
                                               "variant", "image_size", "n_objects", "seed")}
        if key == "gta":
            shown = {k: getattr(dcfg, k) for k in ("name", "n_gta_train", "n_gta_test", "image_size", "seed")}
        rep.say(_wrap(f"  {key:<12} ", {**shown, **{f"{s}_items": n for s, n in sizes.items()}}))
        limit = plan.opts.get("eval_limit")
        if limit is not None and sizes["test"] < limit:
            rep.say(f"  note: {key} has {sizes['test']} test items, fewer than eval_limit={limit}: all are evaluated")
        for split, n in sizes.items():
            if n < 1:
                rep.problem("data", f"dataset {key}: the {split} split would be empty",
                            "raise n_train_per_policy / n_test / n_gta_* (--set 'data={...}')")


def check_stages(plan, rep: DryRunReport, device_type: str) -> None:
    from mpi.pipeline import stage_config

    rep.say("training stages (resolved configs)")
    kinds = []
    for chain in training_chains(plan.methods):
        if chain[-1] not in kinds:
            kinds.append(chain[-1])
    seed = plan.seeds[0]
    for stage in kinds:
        if stage in SUPERVISED_STAGES:
            from mpi.supervised import check_config

            try:
                sup = stage_config(plan, stage, seed)
                # the plain knobs and whether 4-bit can run on the device the run is for
                check_config(sup, device_type=device_type)
            except (ValueError, TypeError) as err:
                name = "cpt" if stage == "cpt" else "sft"
                rep.problem(f"{stage} (SupervisedConfig)", str(err),
                            "fix the RunConfig field it names (--set field=value), or the per-stage override "
                            f"(--set '{name}={{\"field\": value}}')")
                continue
            rep.configs[stage] = sup.to_dict()
            rep.say(_wrap(f"  {stage:<11} SupervisedConfig ", sup.to_dict()))
        elif stage in RL_STAGES:
            try:  # what train_stage trains with, the preset's and the user's RL overrides included
                gcfg = stage_config(plan, stage, seed, plan.dataset_keys[0])  # rl_epochs: steps of the first dataset
            except (ValueError, TypeError) as err:
                rep.problem(f"{stage} (GRPOConfig)", str(err),
                            "fix the RunConfig field it names (rl_steps, num_generations, max_completion_length, "
                            "prompts_per_step, ...: --set field=value) or --set 'grpo={\"field\": value}'")
                continue
            rep.configs[stage] = gcfg.to_dict()
            rep.say(_wrap(f"  {stage:<11} GRPOConfig ", gcfg.to_dict()))
    opts = dict(plan.opts)
    rep.configs["eval"] = opts
    rep.say(_wrap("  evaluation  ", opts))
    for name in ("eval_batch_size", "eval_max_new_tokens", "prefill_items"):
        value = opts.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            rep.problem(name, f"must be an integer >= 1, got {value!r}", f"--set {name}=<integer >= 1>")
    for name in ("eval_limit", "eval_side_limit"):
        value = opts.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            rep.problem(name, f"must be an integer >= 1 or null (all items), got {value!r}", f"--set {name}=null")


def target_device(plan, gpu: str | None = None, num_processes: int | None = None):
    """(DeviceInfo, processes, how it was chosen): this machine's GPU; else the preset's target GPU."""
    from mpi.device import DeviceInfo, describe_device, get_device
    from mpi.scale.memory import KNOWN_GPUS

    def known(key: str) -> DeviceInfo:
        name, total, bf16 = KNOWN_GPUS[key]
        return DeviceInfo(type="cuda", name=name, bf16_supported=bf16,
                          compute_capability=(8, 0) if bf16 else (7, 5), total_memory_gb=total)

    if gpu:
        return known(gpu), num_processes or 1, f"--gpu {gpu}"
    here = describe_device(get_device(plan.cfg.device))
    if here.type == "cuda":
        return here, num_processes or 1, "this machine"
    if plan.cfg.preset in TARGET_DEVICES:
        key, procs = TARGET_DEVICES[plan.cfg.preset]
        return known(key), num_processes or procs, f"the {plan.cfg.preset} preset's target (no GPU here)"
    return here, num_processes or 1, "this machine"


def check_memory(plan, rep: DryRunReport, facts, device_info, processes: int) -> None:
    import torch

    from mpi.device import pick_dtype
    from mpi.scale.memory import MemoryTooLarge, available_gib, check_fits, estimate_peak_memory, knobs_from_config
    from mpi.pipeline import per_process_config

    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[pick_dtype(device_info)]
    cfg = per_process_config(plan.cfg, processes)  # the pipeline's per-process share of the global batch
    kinds = []
    for chain in training_chains(plan.methods):
        kind = memory_stage(chain[-1])
        if kind not in kinds:
            kinds.append(kind)
    avail = available_gib(device_info)
    rep.say(f"memory (mpi.scale.memory estimate, {dtype}, {processes} process(es); {rep.device} offers "
            f"{'?' if avail is None else f'{avail:.1f}'} GiB per process)")
    for kind in kinds:
        try:
            knobs = knobs_from_config(cfg, dtype=dtype, num_processes=processes)
            est = estimate_peak_memory(facts, kind, knobs=knobs)
        except (ValueError, TypeError) as err:
            rep.problem(f"memory ({kind})", str(err), "change the field it names (--set field=value)")
            continue
        rep.memory[kind] = est.as_dict()
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(est.parts.items(), key=lambda kv: -kv[1]))
        try:
            check_fits(est, device_info, facts=facts)
            verdict = "fits"
        except MemoryTooLarge as err:
            verdict = "DOES NOT FIT"
            knobs_text = "\n".join(ln.strip() for ln in str(err).splitlines()
                                   if ("GiB  (" in ln and ln.startswith("  ")) or ln.startswith("Together"))
            rep.problem(f"memory ({kind})", str(err).splitlines()[0],
                        "turn one of these RunConfig knobs (--set field=value), or split the prompts over more "
                        "processes (accelerate launch; check with python -m mpi.dry_run --num-processes N):\n      "
                        + knobs_text.replace("\n", "\n      "))
        rep.say(f"  {kind:<4} {est.peak_gib:7.2f} GiB peak ({est.phase}) {verdict}: {parts}")


def check_wall_time(plan, rep: DryRunReport, facts, device_info, processes: int) -> None:
    """The estimated wall time per stage and in total (mpi.wall_time), and the prompts that cannot fit
    max_length (a policy longer than the sequence: VM-CPT and RL would refuse it mid-run)."""
    from mpi.wall_time import estimate_plan

    if any(not p.field.startswith("memory") for p in rep.problems):  # it reads the same configs: a broken one is named
        return
    est = estimate_plan(plan, facts, device_info, rep.stages, processes)
    rep.wall_time = est
    for line in est.lines():
        rep.say(line)
    from mpi.pipeline import data_config
    from mpi.wall_time import item_tokens

    for key in plan.dataset_keys:
        dcfg = data_config(plan.cfg, key)
        policy_px = dcfg.policy_image_size or max(28, dcfg.image_size // 2)
        s = item_tokens(dcfg, "gta" if key == "gta" else "clevr", facts.image_tokens(plan.cfg.image_size),
                        facts.image_tokens(policy_px))
        longest = int(s["policy_prompt"] + s["response"])
        shows_policy = plan.cfg.sft_policy_in_context_frac > 0 or any(
            c[0] == "cpt" or "poro" in c[-1] for c in training_chains(plan.methods))
        if shows_policy and longest > plan.cfg.max_length:
            rep.problem("RunConfig.max_length", f"dataset {key}: an item with its policy in context is ~{longest} "
                        f"tokens on average (policy ~{s['policy']:.0f}), longer than max_length={plan.cfg.max_length}: "
                        "VM-CPT and PolicyRollout refuse such items rather than cut them",
                        f"--set max_length={int(longest * 1.25) // 64 * 64 + 64} (check memory again), or leave this "
                        "depth out (--depths)")


# =========================================================================== entry points


def plan_report(plan, *, gpu: str | None = None, num_processes: int | None = None) -> DryRunReport:
    """Everything the dry run prints and finds, as data (the tests read it)."""
    t0 = time.perf_counter()
    rep = DryRunReport()
    cfg = plan.cfg
    rep.stages = stage_names(plan)
    rep.say(f"dry run: {plan.run_dir} | preset {cfg.preset} | model {cfg.model} | quantization {cfg.quantization} | "
            f"seeds {', '.join(map(str, plan.seeds))}")
    rep.say(f"plan ({len(rep.stages)} stages; finished ones would be skipped)")
    for name in rep.stages:
        method = name.rsplit("/", 1)[-1] if name.startswith("eval/") else None
        chain = f"  <- {' -> '.join(METHODS[method]) or 'the base model'}" if method else ""
        rep.say(f"  {name}{chain}")

    try:
        facts, where = model_facts_offline(cfg.model, cfg.seed)
    except ValueError as err:
        rep.problem("RunConfig.model", str(err),
                    "use a toy name (toy-tiny, toy-small), a directory with config.json, or one of "
                    "mpi.scale.memory.KNOWN_MODELS")
        facts, where = None, None
    if facts is not None:
        rep.say(f"model {cfg.model}: {where}")
        rep.say(f"  {facts.num_layers} layers, hidden {facts.hidden_size}, {facts.num_heads}/{facts.num_kv_heads} "
                f"heads, vocab {facts.vocab_size:,}, {facts.total_params() / 1e9:.3f} B parameters; "
                f"{facts.image_tokens(cfg.image_size)} tokens per {cfg.image_size}px image")
        if facts.image_tokens(cfg.image_size) + 96 > cfg.max_length:
            rep.problem("RunConfig.max_length", f"{cfg.max_length} tokens cannot hold one {cfg.image_size}px image "
                        f"({facts.image_tokens(cfg.image_size)} tokens) and a query",
                        f"--set max_length={2 * (facts.image_tokens(cfg.image_size) + 96)} or a smaller image_size")

    device_info, processes, chosen = target_device(plan, gpu, num_processes)
    rep.device = f"{device_info.name or device_info.type} ({chosen})"
    check_data(plan, rep)
    check_stages(plan, rep, device_info.type)
    if facts is not None:
        check_memory(plan, rep, facts, device_info, processes)
        check_wall_time(plan, rep, facts, device_info, processes)
    rep.seconds = time.perf_counter() - t0
    return rep


def dry_run(plan, *, gpu: str | None = None, num_processes: int | None = None,
            log: Callable[[str], None] = print) -> int:
    """Print the plan, the resolved configs and the memory preflight of `plan`; 0 if all is well, else 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub; never wait for it
    rep = plan_report(plan, gpu=gpu, num_processes=num_processes)
    for line in rep.lines:
        log(line)
    if rep.problems:
        print(f"error: the dry run found {len(rep.problems)} problem(s):", file=sys.stderr)
        for p in rep.problems:
            print(f"  - {p}", file=sys.stderr)
        return 2
    log(f"dry run OK in {rep.seconds:.1f}s: nothing was loaded or written")
    return 0


def main(argv: list[str] | None = None) -> int:
    """python -m mpi.dry_run [--gpu t4] [--num-processes 8] <python -m mpi arguments>"""
    import argparse

    from mpi.scale.memory import KNOWN_GPUS
    from mpi.pipeline import PipelineError, build_parser, config_from_args, make_plan

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--gpu", choices=sorted(KNOWN_GPUS), default=None)
    pre.add_argument("--num-processes", type=int, default=None)
    ours, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args([a for a in rest if a != "--dry-run"])
    try:
        cfg = config_from_args(args)
        plan = make_plan(cfg, name=args.name, methods=args.methods or None, seeds=args.seeds or None)
    except (PipelineError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return dry_run(plan, gpu=ours.gpu, num_processes=ours.num_processes)


if __name__ == "__main__":
    raise SystemExit(main())
