"""`python -m mpi`: data -> toy base (cached) -> every method -> evaluation -> the paper's table.

    python -m mpi                                   # toy preset: in-context vs CoT SFT vs TriMPI, ClevrPolicy N=2
    python -m mpi --all                             # every method, seeds 0 1 2
    python -m mpi --table                           # the RL comparison: 7 methods x seeds 0 1 2 x N = 2, 4
    python -m mpi --preset tiny --name ci           # CI-sized, a minute or two
    python -m mpi --methods cot-sft,trimpi-dapo --datasets clevr,gta --seeds 0,1
    python -m mpi report runs/toy                   # redraw report.md and the plots of a run

Every stage writes its directory atomically with a `done.json`; a rerun skips finished stages, so an
interrupted run continues where it stopped. A training stage works in `<chain>.partial/` and checkpoints
there every `save_every` steps (`--set save_every=K`, default 10): killed mid-way (a Colab disconnect), it
resumes from its last checkpoint on rerun and ends with the weights of an uninterrupted run; finished, the
directory gets its done.json and is renamed into place. Each training stage prints one bar and a line every
`log_every` steps (default: at most 50 lines per stage); the table is printed at the end.

Under `accelerate launch` (e.g. `accelerate launch --config_file configs/accelerate/ddp_cpu_2proc.yaml -m mpi
--preset tiny`, with ACCELERATE_USE_CPU=1 on CPUs) the main process builds the data, evaluates and writes the
report and every done marker; all processes train each stage data parallel. RunConfig.batch_size (x
grad_accum_steps) is the global batch, split over the processes, so W processes take the same steps as one.

An unknown `--set` name (neither a RunConfig field nor a knob of EXTRA_KNOBS) is an error listing the valid
ones. Layout of `runs/<name>/`:

    run.json                     the config (a rerun with a different config needs a new --name)
    data/<dataset>/<split>/      the datasets (clevr-T-N2, gta, ...)
    stages/<dataset>/seed<k>/<chain>/   one trained adapter per training chain (cpt, cpt+cot-sft, ...)
    stages/<dataset>/seed<k>/<chain>.partial/   a training stage under way (checkpoints; resumed on rerun)
    eval/<dataset>/seed<k>/<method>/    results.json per method
    cost/<dataset>/              tokens and prefill with and without the policy
    report.md, metrics.json, *.png

Training chains share prefixes: CoT SFT, CoT SFT + GRPO and CoT SFT + DAPO start from one CoT SFT
adapter; VM-CPT + CoT SFT and both TriMPI runs share the VM-CPT and the SFT stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mpi.atomic import atomic_directory, atomic_write_json
from mpi.engine import save_model
from mpi.integrity import MANIFEST_KEY, file_manifest, stage_damage
from mpi.config import BOOKKEEPING_FIELDS, PRESETS, RunConfig, get_config
# The methods, their chains and the stage kinds live in mpi.methods (the report and the dry run read them
# too); notebooks and tests read them as pipeline.METHODS, pipeline.DEFAULT_METHODS as well.
from mpi.methods import (DEFAULT_METHODS, METHODS, RL_STAGES, SUPERVISED_STAGES, TABLE_METHODS, memory_stage,
                         training_chains)


# Evaluation knobs per preset (RunConfig.extra overrides them by the same names).
# toy: the headline accuracy on all 200 test items (the first 64 and all 200 differ by 14 points on one model);
# policy back in context and override on the first 64 (eval_side_limit), to keep the laptop run short.
EVAL_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(eval_limit=8, eval_batch_size=8, eval_max_new_tokens=24, prefill_items=2, toy_base="tiny"),
    # A compact ClevrPolicy CoT is up to 53 (N=2) / 65 (N=4) toy tokens: answers must fit (RunConfig.max_completion_length).
    "toy": dict(eval_limit=200, eval_side_limit=64, eval_batch_size=16, eval_max_new_tokens=96, prefill_items=8,
                toy_base="toy"),
    # colab-t4 is sized to one Colab session (mpi.wall_time's estimate): the headline on 100 test items, the side
    # views on 32, 8 answers per generate call (decoding on a T4 costs about the same for 4 or 8 rows); 256 new
    # tokens hold an N=2 answer (~95 tokens) with room.
    "colab-t4": dict(eval_limit=100, eval_side_limit=32, eval_batch_size=8, eval_max_new_tokens=256, prefill_items=8,
                     toy_base=None),
    "paper": dict(eval_limit=None, eval_batch_size=8, eval_max_new_tokens=1024, prefill_items=16, toy_base=None),
}

# GRPOConfig fields each preset sets for its RL stages (`stage_config`; RunConfig.extra["grpo"] overrides them).
RL_PRESETS: dict[str, dict[str, Any]] = {
    # Proves the path in seconds: DAPO's dynamic sampling retries twice, not 20 times (a model that learned
    # nothing gives only all-equal groups); validation every step, but keep_best off (toy-tiny scores 0 on every
    # validation item, so the best step would be the start). The IS log off: the sampler's log-probs it reads
    # differ by ~1e-7 between two runs of one stage, and the notebook = CLI test compares metrics exactly.
    "tiny": dict(max_resample_tries=2, eval_every=1, eval_samples=1, log_behaviour_ratio=False),
    # Temperature 0.7: at 1.0 a quarter of the toy's samples lost the answer format (format reward 0.74 vs 0.98).
    # A warm-up for the fresh Adam, a cosine, and the validation split's sampled accuracy every 10 steps
    # (2 answers per item, smoothed): the stage keeps its best checkpoint, the start included. The IS log off
    # as on tiny.
    "toy": dict(log_behaviour_ratio=False, temperature=0.7, warmup_steps=3, lr_scheduler_type="cosine",
                eval_every=10, eval_samples=2, keep_best=True),
    # The GPU presets: the same schedule and best-validation checkpoint. colab-t4 is sized to one Colab session
    # (mpi.wall_time's estimate): validation every 20 of its 60 steps, one answer per validation item. paper:
    # validated every 50 steps (32 validation items x 3 answers on a 3B model cost about 3 RL steps).
    "colab-t4": dict(warmup_steps=5, lr_scheduler_type="cosine", eval_every=20, eval_samples=1, keep_best=True),
    "paper": dict(warmup_steps=10, lr_scheduler_type="cosine", eval_every=50, eval_samples=2, keep_best=True),
}


class PipelineError(ValueError):
    """A bad argument or a run directory that does not match the requested config."""


# Every RunConfig.extra key the pipeline (and the stages it calls) reads. Anything else is a typo: refused,
# with the valid names, instead of being filed away silently (`--set rl_setps=60`).
EXTRA_KNOBS: dict[str, str] = {
    "eval_limit": "test items for a method's headline accuracy (null: all)",
    "eval_side_limit": "test items for the other views (policy in context, override); default eval_limit",
    "eval_batch_size": "prompts per generate() call in evaluation",
    "eval_max_new_tokens": "decoding budget per evaluated answer",
    "prefill_items": "test items whose prefill time is measured (cost table)",
    "toy_base": "toy-base preset (tiny, toy, toy-copy) a toy model starts from",
    "toy_base_seed": "seed of the toy base (default 0)",
    "toy_base_overrides": "dict of mpi.toy_base.ToyBaseConfig fields",
    "grpo": "dict of mpi.poro.GRPOConfig fields for the RL stages",
    "rl_learning_rates": "list: train each RL stage at every rate, keep the best on the validation split",
    "cpt": "dict of mpi.supervised.SupervisedConfig fields for VM-CPT",
    "sft": "dict of mpi.supervised.SupervisedConfig fields for the SFT stages",
    "data": "dict of mpi.data.DataConfig fields",
    "data_seed": "seed of the generated datasets (default 0)",
    "variant": "ClevrPolicy variant of the dataset keys (default T)",
}
# The dict-valued knobs and the dataclass whose fields they may name.
NESTED_KNOBS: dict[str, tuple[str, str]] = {
    "grpo": ("mpi.poro", "GRPOConfig"), "cpt": ("mpi.supervised", "SupervisedConfig"),
    "sft": ("mpi.supervised", "SupervisedConfig"), "data": ("mpi.data.build", "DataConfig"),
    "toy_base_overrides": ("mpi.toy_base", "ToyBaseConfig"),
}


def run_config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(RunConfig) if f.name != "extra"]


def known_extra_knobs() -> dict[str, str]:
    """EXTRA_KNOBS plus the memory estimate's knobs (mpi.scale.memory.MemoryKnobs fields that are not RunConfig's)."""
    from mpi.scale.memory import MemoryKnobs

    knobs = dict(EXTRA_KNOBS)
    run_fields = set(run_config_fields())
    for f in dataclasses.fields(MemoryKnobs):
        if f.name not in run_fields:
            knobs.setdefault(f.name, "memory estimate (mpi.scale.memory.MemoryKnobs)")
    return knobs


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def check_extra(extra: dict[str, Any]) -> None:
    """Refuse an unknown RunConfig.extra key (a `--set` name that is no RunConfig field lands there) or an
    unknown field inside a dict-valued knob, naming the valid ones."""
    known = known_extra_knobs()
    unknown = [k for k in extra if k not in known]
    if unknown:
        names = run_config_fields()
        what = "; ".join(f"{k!r}{_did_you_mean(k, names + list(known))}" for k in unknown)
        raise PipelineError(
            f"--set / RunConfig.extra: unknown name(s) {what}. Valid RunConfig fields: {', '.join(names)}. "
            f"Valid extra knobs: {', '.join(sorted(known))}")
    import importlib

    for key, (module, class_name) in NESTED_KNOBS.items():
        if key not in extra:
            continue
        value = extra[key]
        if not isinstance(value, dict):
            raise PipelineError(f"--set {key}=...: expected a JSON object of {class_name} fields, e.g. "
                                f"--set '{key}={{\"name\": value}}', got {value!r}")
        fields = [f.name for f in dataclasses.fields(getattr(importlib.import_module(module), class_name))]
        bad = [k for k in value if k not in fields]
        if bad:
            what = "; ".join(f"{k!r}{_did_you_mean(k, fields)}" for k in bad)
            raise PipelineError(f"--set {key}=...: unknown {class_name} field(s) {what}. Valid fields: {', '.join(fields)}")


# =========================================================================== plan


@dataclass
class Plan:
    cfg: RunConfig
    name: str
    run_dir: Path
    methods: tuple[str, ...]
    dataset_keys: tuple[str, ...]
    seeds: tuple[int, ...]
    opts: dict[str, Any]

    def stage_dir(self, key: str, seed: int, chain: Sequence[str]) -> Path:
        return self.run_dir / "stages" / key / f"seed{seed}" / "+".join(chain)

    def eval_dir(self, key: str, seed: int, method: str) -> Path:
        return self.run_dir / "eval" / key / f"seed{seed}" / method

    def data_dir(self, key: str, split: str) -> Path:
        return self.run_dir / "data" / key / split


def dataset_keys(datasets: Sequence[str], depths: Sequence[int], variant: str = "T") -> tuple[str, ...]:
    keys = []
    for ds in datasets:
        if ds == "clevr":
            keys += [f"clevr-{variant}-N{d}" for d in depths]
        elif ds == "gta":
            keys.append("gta")
        else:
            raise PipelineError(f"--datasets: unknown dataset {ds!r}; choose from clevr, gta")
    return tuple(keys)


def eval_options(cfg: RunConfig) -> dict[str, Any]:
    opts = dict(EVAL_DEFAULTS.get(cfg.preset, EVAL_DEFAULTS["toy"]))
    opts.update({k: v for k, v in cfg.extra.items() if k in opts or k.startswith("eval_") or k.startswith("toy_base")})
    return opts


def make_plan(cfg: RunConfig, *, name: str | None = None, methods: Sequence[str] | None = None,
              seeds: Sequence[int] | None = None) -> Plan:
    methods = tuple(methods or DEFAULT_METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise PipelineError(f"--methods: unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    seeds = tuple(int(s) for s in (seeds if seeds is not None else (cfg.seed,)))
    if not seeds:
        raise PipelineError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
    check_extra(cfg.extra)
    name = name or cfg.preset
    if not name or "/" in name or name.startswith("."):
        raise PipelineError(f"--name must be a plain directory name, got {name!r}")
    keys = dataset_keys(cfg.datasets, cfg.depths, cfg.extra.get("variant", "T"))
    return Plan(cfg=cfg, name=name, run_dir=Path(cfg.out_dir) / name, methods=methods, dataset_keys=keys,
                seeds=seeds, opts=eval_options(cfg))


# =========================================================================== stage bookkeeping


def is_done(path: Path) -> bool:
    return (path / "done.json").exists()


def finished_intact(path: Path, stage: str, log: Callable[[str], None]) -> bool:
    """Whether `path` is a finished stage whose files match its done.json (mpi.integrity). A damaged one (a
    partial Drive sync, a full disk) is named with what is wrong, removed and reported as not finished, so
    the caller rebuilds it instead of a later stage failing on it with a raw traceback."""
    if not is_done(path):
        return False
    problems = stage_damage(path)
    if not problems:
        return True
    log(f"[damaged] {stage}: {path} does not match its done.json ({'; '.join(problems[:3])}"
        f"{f'; {len(problems) - 3} more' if len(problems) > 3 else ''}): rebuilding the stage")
    shutil.rmtree(path)
    return False


def with_manifest(result: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`result` (a done.json) with the size and sha256 of every file of the finished stage in `folder`."""
    return {**result, MANIFEST_KEY: file_manifest(folder)}


def read_done(path: Path) -> dict[str, Any]:
    return json.loads((path / "done.json").read_text())


class Timer:
    """Wall time per stage, kept in the run directory (so a resumed run reports every stage)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "timings.json"
        self.rows: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def record(self, stage: str, seconds: float, skipped: bool) -> None:
        if self.path.exists():  # another process (another seed) may have recorded stages meanwhile
            self.rows = {**self.rows, **json.loads(self.path.read_text())}
        if skipped and stage in self.rows:
            self.rows[stage]["skipped_last_run"] = True
        else:
            self.rows[stage] = {"seconds": seconds, "skipped_last_run": skipped}
        atomic_write_json(self.path, self.rows)


def run_stage(plan: Plan, timer: Timer, stage: str, path: Path, fn: Callable[[Path], dict[str, Any]],
              log: Callable[[str], None], settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run `fn(tmp_dir)` into `path` atomically unless `path` is already done (and intact); return its done.json.
    `settings` (e.g. an evaluation's options) go into done.json; a finished stage made with other settings is
    an error, never a skip."""
    settings = None if settings is None else json.loads(json.dumps(settings, default=str))
    if finished_intact(path, stage, log):
        done = read_done(path)
        if settings is not None and done.get("settings", settings) != settings:
            diff = sorted(k for k in set(settings) | set(done["settings"]) if settings.get(k) != done["settings"].get(k))
            raise PipelineError(f"{stage}: {path} was made with other settings ({diff}); use a new run name, or "
                                "delete that folder to make it again")
        log(f"[skip] {stage} (done)")
        timer.record(stage, 0.0, skipped=True)
        return done
    log(f"[run ] {stage}")
    t0 = time.perf_counter()
    with atomic_directory(path) as tmp:
        result = fn(tmp) or {}
        result = {**result, "stage": stage, "seconds": time.perf_counter() - t0}
        if settings is not None:
            result["settings"] = settings
        result = with_manifest(result, tmp)
        atomic_write_json(tmp / "done.json", result)
    timer.record(stage, result["seconds"], skipped=False)
    log(f"[done] {stage} in {result['seconds']:.1f}s")
    return result


class Processes:
    """Who does what under `accelerate launch` (one process, and every method a no-op, without it).

    The main process builds the data and the toy base, evaluates, writes the report and every done marker;
    all processes train (the stage functions are data parallel). The others wait for the main process on a
    barrier of their own gloo group with a long timeout: building a toy base or evaluating a method can take
    far longer than the default group's 30 minutes, and a CPU group keeps these waits and the small decisions
    shared from the main process (share) off the GPUs."""

    WAIT = 7 * 24 * 3600  # seconds a process may wait for the main process (a barrier is not a timer)

    def __init__(self):
        import torch

        from mpi import distributed as dist

        self.world = dist.num_processes()
        self.main = dist.is_main_process()
        self.group = None
        if self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            from datetime import timedelta

            self.group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=self.WAIT))

    def barrier(self) -> None:
        if self.group is not None:
            import torch

            torch.distributed.barrier(group=self.group)

    def share(self, value: Any) -> Any:
        """The main process's `value` on every process (every process decides alike what to skip)."""
        if self.group is None:
            return value
        import torch

        box = [value]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


_PROCESSES: Processes | None = None


def processes() -> Processes:
    """This run's processes (one, or those of an `accelerate launch`), made once."""
    global _PROCESSES
    if _PROCESSES is None:
        _PROCESSES = Processes()
    return _PROCESSES


def publish(partial: Path, path: Path) -> None:
    """Move a finished stage (its done.json already inside) into place in one rename."""
    if path.exists():  # a stage directory without done.json (an older layout, or a copy): not a finished stage
        shutil.rmtree(path)
    os.replace(partial, path)


def run_training_stage(plan: Plan, timer: Timer, stage: str, path: Path, fn: Callable[[Path], dict[str, Any]],
                       log: Callable[[str], None], config=None) -> dict[str, Any]:
    """Like run_stage, but `fn` works in `<path>.partial/`, which survives a killed run: the stage resumes from
    its checkpoints there. Finished, the directory gets done.json and is renamed to `path` (the next stage
    only ever sees finished stages). Every process calls this and `fn`; the main process writes.

    `config` (the stage config `fn` trains with) goes into done.json with its `config_key`; a finished stage
    whose recorded key differs is an error, never a silent skip (`stage_folder` gives another config its own
    folder, so this only meets a run folder whose settings were changed under it)."""
    procs = processes()
    procs.barrier()
    partial = partial_dir(path)
    state = None
    if procs.main:  # a damaged finished stage (or trained work folder) is set aside and trained again
        state = ("done" if finished_intact(path, stage, log) else
                 "trained" if finished_intact(partial, stage + " (trained, not yet published)", log) else
                 "saved" if (partial / "model").exists() else "resume" if partial.exists() else "new")
    state = procs.share(state)
    record = {} if config is None else {"config_key": config_key(config), "config": dataclasses.asdict(config)}
    if state == "done":
        done = read_done(path)
        if record and done.get("config_key", record["config_key"]) != record["config_key"]:
            old = done.get("config", {})
            diff = sorted(k for k in set(old) | set(record["config"]) if k not in STAGE_BOOKKEEPING
                          and json.dumps(old.get(k), default=str) != json.dumps(record["config"].get(k), default=str))
            raise PipelineError(f"{stage}: {path} was trained with another config (fields {diff}); train this one "
                                "in its own folder (pipeline.stage_folder), or delete that stage to retrain it")
        log(f"[skip] {stage} (done)")
        if procs.main:
            timer.record(stage, 0.0, skipped=True)
        return done
    t0 = time.perf_counter()
    if state == "saved":  # trained and saved, killed before done.json: nothing to train again
        result = json.loads((partial / "summary.json").read_text())
    if state in ("new", "resume"):
        log(f"[{'run ' if state == 'new' else 'resume'}] {stage}" + (f" from {partial}" if state == "resume" else ""))
        from mpi.supervised import ConfigError

        try:
            result = fn(partial) or {}
        except ConfigError as err:  # checkpoints in the work directory made with other settings
            raise PipelineError(f"{stage}: {err}\n(pipeline: delete {partial} to train this stage from the start, "
                                "or rerun with the settings it was started with)") from err
    if procs.main and state != "trained":
        atomic_write_json(partial / "done.json",
                          with_manifest({**result, **record, "stage": stage, "resumed": state == "resume",
                                         "seconds": time.perf_counter() - t0}, partial))
    if procs.main:
        seconds = read_done(partial)["seconds"]
        publish(partial, path)
        timer.record(stage, seconds, skipped=False)
    procs.barrier()
    result = read_done(path)
    log(f"[done] {stage} in {result['seconds']:.1f}s" + (" (this run's part of it)" if state != "new" else ""))
    return result


def train_in_run(plan: Plan, key: str, seed: int, chain: Sequence[str], config, fn: Callable[[Path], dict[str, Any]],
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the last stage of `chain` with `config` by `fn(work_dir)` into its folder in the run
    (`stage_folder`: a changed config is a new stage), unless it is finished; returns its done.json."""
    chain = tuple(chain)
    path = stage_folder(plan, key, seed, chain, config)
    return run_training_stage(plan, Timer(plan.run_dir), f"train/{key}/seed{seed}/{path.name}", path, fn, log,
                              config=config)


# =========================================================================== data


def data_config(cfg: RunConfig, key: str):
    from mpi.data import get_data_config

    overrides: dict[str, Any] = {"image_size": cfg.image_size, "seed": int(cfg.extra.get("data_seed", 0))}
    if key.startswith("clevr"):
        _, variant, n = key.split("-")
        overrides.update(depths=(int(n[1:]),), variant=variant)
    for k, v in cfg.extra.get("data", {}).items():
        overrides[k] = v
    return get_data_config(cfg.data_preset, **overrides)


def build_data(plan: Plan, key: str, tmp: Path) -> dict[str, Any]:
    from mpi.data import build_split, save_dataset
    from mpi.evaluate import majority_baseline

    dcfg = data_config(plan.cfg, key)
    dataset = "gta" if key == "gta" else "clevr"
    sizes = {}
    from mpi.data import SPLITS

    for split in SPLITS:
        ds = build_split(dcfg, dataset, split)
        save_dataset(ds, tmp / split)
        sizes[split] = len(ds)
        if split == "test":
            chance = majority_baseline([{k: ds[i][k] for k in ("dataset", "answer", "policy_name")} for i in range(len(ds))])
    return {"sizes": sizes, "chance": chance["accuracy"], "data_config": dataclasses.asdict(dcfg)}


def load_split(plan: Plan, key: str, split: str):
    from mpi.data import load_dataset_dir

    return load_dataset_dir(plan.run_dir / "data" / key / split)


def validation_items(plan: Plan, key: str) -> list[dict[str, Any]] | None:
    """The validation split as a list of items (None for a run directory built before the split existed)."""
    path = plan.run_dir / "data" / key / "val"
    if not path.exists():
        return None
    ds = load_split(plan, key, "val")
    return [ds[i] for i in range(len(ds))] or None


def with_cot_only(ds):
    """CoT SFT trains on the items that have a CoT (all ClevrPolicy items here; GTA items carry one too)."""
    return ds.filter(lambda row: bool(row["cot"]), keep_in_memory=True)


# =========================================================================== models


def base_model_path(plan: Plan) -> str:
    """The starting checkpoint of every method: the cached toy base for toy models, else the model id."""
    from mpi.toy import is_toy

    if not is_toy(plan.cfg.model):
        return plan.cfg.model
    return str(toy_base_dir(plan))


def toy_base_cfg(plan: Plan):
    from mpi.toy_base import toy_base_config

    preset = plan.opts.get("toy_base") or ("tiny" if plan.cfg.model == "toy-tiny" else "toy")
    overrides = dict(plan.cfg.extra.get("toy_base_overrides", {}))
    overrides.setdefault("model", plan.cfg.model)
    overrides.setdefault("seed", int(plan.cfg.extra.get("toy_base_seed", 0)))
    return toy_base_config(preset, **overrides)


def toy_base_dir(plan: Plan) -> Path:
    from mpi.toy_base import toy_base_path

    return toy_base_path(toy_base_cfg(plan))


def lora_settings(cfg: RunConfig):
    from mpi.modeling import LoraSettings

    if cfg.lora_r is None:
        return None
    return LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)


def load_for_stage(plan: Plan, seed: int, adapter: Path | None, trainable: bool):
    """Base + adapter (continue a chain), base + fresh LoRA (first stage), or the base alone (eval).

    With lora_r=None (full fine-tuning) a stage saves the whole model and the next stage loads it."""
    from mpi.modeling import load_model_and_processor

    cfg = plan.cfg
    common = dict(quantization=cfg.quantization, device=cfg.device, seed=seed, trainable=trainable,
                  gradient_checkpointing=bool(getattr(cfg, "gradient_checkpointing", False)) and trainable)
    if adapter is not None:
        return _load_stage_model(plan, Path(adapter), common)
    lora = lora_settings(cfg) if trainable else None
    if trainable and lora is None and cfg.quantization:
        raise PipelineError("full fine-tuning (lora_r=None) of a quantized model is not possible; set lora_r")
    return load_model_and_processor(base_model_path(plan), lora=lora, **common)


def damaged_stage_error(stage_dir: Path, what: str) -> PipelineError:
    return PipelineError(f"{stage_dir} is damaged ({what}): delete that folder and rerun (python -m mpi with the same "
                         "arguments, or the notebook's cell) to train the stage again")


def _load_stage_model(plan: Plan, adapter: Path, common: dict[str, Any]):
    """A finished stage's model: checked against its done.json first, and a file that still fails to load
    (a done.json from before manifests) named with its stage folder instead of a raw SafetensorError."""
    from mpi.modeling import load_model_and_processor

    stage_dir = adapter.parent
    problems = stage_damage(stage_dir) if is_done(stage_dir) else []
    if problems:
        raise damaged_stage_error(stage_dir, "; ".join(problems))
    try:
        if (adapter / "config.json").exists():  # a full model directory
            return load_model_and_processor(str(adapter), lora=None, **common)
        return load_model_and_processor(base_model_path(plan), adapter=str(adapter), **common)
    except Exception as err:
        from safetensors import SafetensorError

        if isinstance(err, (SafetensorError, json.JSONDecodeError, UnicodeDecodeError)):
            raise damaged_stage_error(stage_dir, f"{type(err).__name__}: {err}") from err
        raise


# =========================================================================== training stages


def stage_config(plan: Plan, stage: str, seed: int, key: str | None = None):
    """The config a training stage trains with: THE one mapping from the RunConfig to the stage configs.

    "cpt", "cot-sft", "direct-sft" -> a SupervisedConfig: cpt_* or sft_* epochs and learning rate, the shared
    batch, max_length, LoRA and memory fields, then RunConfig.extra["cpt"] / ["sft"]. The RL stages -> a
    GRPOConfig: the method's preset (mpi.poro.GRPO_PRESETS) with the rl_* fields (rl_epochs through
    `rl_steps`, which needs the dataset `key`), then the run preset's RL_PRESETS and RunConfig.extra["grpo"].
    Both checkpoint every RunConfig.save_every steps and print a line every log_every steps.

    The pipeline trains every stage with this config and the notebooks show it, edit it and train with it;
    a stage trained with another config lives in another folder (`stage_folder`). The batch is the global
    one: `split_batch` gives each process of an `accelerate launch` its share."""
    cfg = plan.cfg
    if stage in SUPERVISED_STAGES:
        from mpi.supervised import SupervisedConfig

        cpt = stage == "cpt"
        values = dict(
            mode=stage, epochs=cfg.cpt_epochs if cpt else cfg.sft_epochs,
            learning_rate=cfg.cpt_learning_rate if cpt else cfg.sft_learning_rate,
            batch_size=cfg.batch_size, grad_accum_steps=cfg.grad_accum_steps, max_length=cfg.max_length,
            seed=seed, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            quantization=cfg.quantization,
            policy_in_context_frac=0.0 if cpt else cfg.sft_policy_in_context_frac,
            save_every=max(1, int(cfg.save_every)), save_total_limit=2, logging_steps=1, log_every=cfg.log_every)
        return SupervisedConfig(**{**values, **cfg.extra.get("cpt" if cpt else "sft", {})})
    if stage not in RL_STAGES:
        raise PipelineError(f"unknown training stage {stage!r}; the stages are {SUPERVISED_STAGES + RL_STAGES}")
    from mpi.poro import get_grpo_config

    values = dict(steps=rl_steps(plan, key), learning_rate=cfg.rl_learning_rate, num_generations=cfg.num_generations,
                  max_completion_length=cfg.max_completion_length, prompts_per_step=cfg.prompts_per_step, seed=seed,
                  micro_batch_size=cfg.micro_batch_size, save_every=max(1, int(cfg.save_every)), log_every=cfg.log_every)
    return get_grpo_config(stage, **{**values, **RL_PRESETS.get(cfg.preset, {}), **cfg.extra.get("grpo", {})})


# Stage-config fields that change no weight (checkpoint and print cadence): left out of the stage's key.
STAGE_BOOKKEEPING = ("save_every", "save_total_limit", "logging_steps", "progress", "log_every", "keep_checkpoints",
                     "sample_every")


def config_key(config) -> str:
    """Eight hex digits that name a stage config (its fields that change the weights)."""
    import hashlib

    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in STAGE_BOOKKEEPING}
    text = json.dumps([type(config).__name__, fields], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def stage_folder(plan: Plan, key: str, seed: int, chain: Sequence[str], config=None) -> Path:
    """Where the last stage of `chain` trained with `config` lives: the run's folder `<chain>` for the config
    `stage_config` gives (what `python -m mpi` trains), `<chain>@<config key>` for any other (a notebook's
    edited config), so a changed config is a new stage and never meets a finished one."""
    path = plan.stage_dir(key, seed, chain)
    if config is None or config_key(config) == config_key(stage_config(plan, chain[-1], seed, key)):
        return path
    return path.with_name(f"{path.name}@{config_key(config)}")


def per_process_config(cfg, world: int):
    """`cfg` (a RunConfig or a SupervisedConfig) with batch_size (or, when it does not split, grad_accum_steps)
    divided over `world` processes: the Trainer's batch is per device, the config's the global batch of one
    optimizer step."""
    if world <= 1:
        return cfg
    if cfg.batch_size % world == 0:
        return dataclasses.replace(cfg, batch_size=cfg.batch_size // world)
    if cfg.grad_accum_steps % world == 0:
        return dataclasses.replace(cfg, grad_accum_steps=cfg.grad_accum_steps // world)
    raise PipelineError(
        f"batch_size={cfg.batch_size} x grad_accum_steps={cfg.grad_accum_steps} is the global batch and does not "
        f"split over {world} processes: make batch_size or grad_accum_steps a multiple of {world} "
        f"(--set batch_size=...), or launch a number of processes that divides one of them")


def rl_steps(plan: Plan, key: str | None) -> int:
    """RunConfig.rl_steps, or with rl_epochs set, the budget rule: ceil(rl_epochs x train prompts of `key` /
    prompts_per_step) steps."""
    cfg = plan.cfg
    if cfg.rl_epochs is None:
        return cfg.rl_steps
    if key is None:
        raise PipelineError("rl_epochs sets the RL steps from the training split's size: pass the dataset key")
    if cfg.rl_epochs <= 0:
        raise PipelineError(f"rl_epochs must be > 0 (or null to use rl_steps), got {cfg.rl_epochs}")
    from mpi.data import split_item_counts

    n_train = split_item_counts(data_config(cfg, key), "gta" if key == "gta" else "clevr")["train"]
    return max(1, math.ceil(cfg.rl_epochs * n_train / cfg.prompts_per_step))


def partial_dir(path: Path) -> Path:
    """Where a training stage works until it is finished: kept across runs, so a killed stage resumes."""
    return path.with_name(path.name + ".partial")


def start_stage(plan: Plan, key: str, seed: int, chain: Sequence[str], config=None):
    """What the last stage of `chain` starts from: (model, processor, training items, validation items).

    The model is the parent stage's (`chain[:-1]`, trainable) or the base with a fresh LoRA; CoT SFT trains on
    the items with a CoT; the validation split (never the test split) is for the RL stages. Prints the
    expected peak memory first and refuses, with the knobs to turn, a stage that cannot fit. An RL stage's
    training prompts are measured first: one over max_length (with the policy in context too when `config`,
    default `stage_config`, rolls out with it) is refused with the item, never truncated through its image
    tokens."""
    from mpi.device import seed_everything
    from mpi.scale.memory import preflight

    procs, stage = processes(), chain[-1]
    parent = plan.stage_dir(key, seed, chain[:-1]) / "model" if len(chain) > 1 else None
    preflight(per_process_config(plan.cfg, procs.world), memory_stage(stage), num_processes=procs.world,
              quiet=not procs.main)
    seed_everything(seed)
    model, processor = load_for_stage(plan, seed, parent, trainable=True)
    train = load_split(plan, key, "train")
    if stage == "cot-sft":
        train = with_cot_only(train)
    if stage in RL_STAGES and len(train):
        from mpi.prompt_lengths import PromptTooLong, check_prompt_lengths

        policy_rollout = (config or stage_config(plan, stage, seed, key)).policy_rollout
        where = f"{key} seed{seed} {'+'.join(chain)} (RL)"
        try:
            check_prompt_lengths(processor, train, plan.cfg.max_length, where=where,
                                 with_policy=(False, True) if policy_rollout else (False,))
        except PromptTooLong as err:
            raise PipelineError(str(err)) from err
    return model, processor, train, validation_items(plan, key) if stage in RL_STAGES else None


def finish_stage(plan: Plan, tmp: Path, model, processor, result: Any) -> dict[str, Any]:
    """Save the trained model into tmp/model (the main process) and return the stage's summary for done.json;
    the training logs stay in tmp/work, the checkpoints (only for resuming) go."""
    procs = processes()
    work = tmp / "work"
    summary = _result_summary(result, work)
    resumed = result.get("resumed_from") if isinstance(result, dict) else getattr(result, "resumed_from", None)
    summary["resumed_from_step"] = resumed
    if (work / "learning_rate_sweep.json").exists():
        summary["learning_rate_sweep"] = json.loads((work / "learning_rate_sweep.json").read_text())
    if procs.main:
        atomic_write_json(tmp / "summary.json", summary)  # before model/: a stage with model/ has its summary
        with atomic_directory(tmp / "model") as out:
            save_model(model, processor, out, base_model_path(plan))
        for sub in ("checkpoints", "adapter"):
            shutil.rmtree(work / sub, ignore_errors=True)
    procs.barrier()  # nobody reads model/ (or leaves) before it is written
    return summary


def train_stage(plan: Plan, key: str, seed: int, chain: tuple[str, ...], tmp: Path, config=None) -> dict[str, Any]:
    """Train the last stage of `chain` with `config` (default: `stage_config`) on top of `chain[:-1]`; save it
    into tmp/model. Notebooks 02-04 run these same lines in view.

    `tmp` is the stage's persistent work directory (`<chain>.partial/`, see run_training_stage): the stage
    checkpoints into tmp/work every save_every steps and resumes there, so a run killed mid-stage continues
    from its last checkpoint and ends with the weights of an uninterrupted run. Every process of an
    `accelerate launch` calls this (the stage functions are data parallel); only the main process writes."""
    from mpi.poro import train_poro
    from mpi.supervised import train_supervised

    config = config or stage_config(plan, chain[-1], seed, key)
    model, processor, train, val = start_stage(plan, key, seed, chain, config)
    work = tmp / "work"
    if chain[-1] in SUPERVISED_STAGES:
        result = train_supervised(model, processor, train, per_process_config(config, processes().world), work)
        model = result.pop("model")
    elif plan.cfg.extra.get("rl_learning_rates"):
        model, result = learning_rate_sweep(plan, key, seed, chain, model, processor, train, config, work, val)
    else:
        result = train_poro(model, processor, train, config, work, resume=True, save_adapter=False, eval_items=val)
    return finish_stage(plan, tmp, model, processor, result)


def learning_rate_sweep(plan: Plan, key: str, seed: int, chain: Sequence[str], model, processor, train, gcfg, work: Path,
                        val: list[dict[str, Any]] | None):
    """Train the RL stage once per learning rate (same seed, so the same prompts), each into work/lr_<rate>/ and
    resumable, and return (the model with the winner's best-validation weights, a result whose rows are the
    winner's). `model` is the stage's freshly loaded start; each later rate starts from a fresh load. The winner: the highest best smoothed validation accuracy (mpi.poro.BEST_METRIC); a tie goes
    to the rate listed first. The test split plays no part."""
    from mpi.device import seed_everything
    from mpi.poro import TrainResult, train_poro
    from mpi.engine import load_trainable

    rates = plan.cfg.extra["rl_learning_rates"]
    parent = plan.stage_dir(key, seed, chain[:-1]) / "model" if len(chain) > 1 else None
    desc = f"{key} seed{seed} {'+'.join(chain)}"
    if not isinstance(rates, (list, tuple)) or not rates or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in rates):
        raise PipelineError(f"rl_learning_rates must be a non-empty list of positive numbers, got {rates!r}; "
                            "e.g. --set 'rl_learning_rates=[3e-5,1e-4,3e-4]'")
    if not val:
        raise PipelineError("rl_learning_rates needs the validation split (data/<key>/val, built by this version's "
                            "data stage) to choose a rate; rebuild the data under a new --name")
    sweep, fresh = [], True  # fresh: `model` still holds the start weights
    for rate in rates:
        sub = work / f"lr_{rate:g}"
        summary = sub / "sweep.json"
        if not summary.exists():
            if not fresh:
                del model
                model, _ = load_for_stage(plan, seed, parent, trainable=True)
            seed_everything(seed)
            fresh = False
            cfg = dataclasses.replace(gcfg, learning_rate=float(rate), keep_best=True)
            print(f"{desc}: learning rate {rate:g} ({len(sweep) + 1} of {len(rates)})")
            res = train_poro(model, processor, train, cfg, sub, resume=True, save_adapter=False, eval_items=val)
            atomic_write_json(summary, {"learning_rate": float(rate), "best_smoothed": res.best_value,
                                        "best_step": res.best_step})
        sweep.append(json.loads(summary.read_text()))
    winner = max(range(len(sweep)), key=lambda i: (sweep[i]["best_smoothed"], -i))
    chosen = work / f"lr_{rates[winner]:g}"
    print(f"{desc}: learning rates " + ", ".join(f"{r['learning_rate']:g} -> {r['best_smoothed']:.3f}" for r in sweep)
          + f" (best smoothed validation accuracy); keeping {rates[winner]:g}")
    atomic_write_json(work / "learning_rate_sweep.json", {"sweep": sweep, "chosen": sweep[winner]})
    for rate in rates:  # the per-step checkpoints were for resuming; each rate's best/ weights stay
        shutil.rmtree(work / f"lr_{rate:g}" / "checkpoints", ignore_errors=True)
    # every trainable weight is overwritten, the frozen ones were never touched: no reload needed
    load_trainable(model, chosen / "best" / "trainable.pt")
    from mpi.metrics import read_metrics

    return model, TrainResult(out_dir=chosen, adapter_dir=None, rows=read_metrics(chosen),
                              final_step=gcfg.steps, best_step=sweep[winner]["best_step"])


def _result_summary(result: Any, work: Path) -> dict[str, Any]:
    rows = getattr(result, "rows", None)
    if rows is None and isinstance(result, dict):
        rows = result.get("rows")
    if rows is None and (work / "metrics.jsonl").exists():
        from mpi.metrics import read_metrics

        rows = read_metrics(work)
    if not rows:
        return {"steps": 0}
    last = rows[-1]
    return {"steps": last.get("step", len(rows)),
            "last": {k: v for k, v in last.items() if isinstance(v, (int, float))}}


# =========================================================================== evaluation stages


def evaluate_method(plan: Plan, key: str, seed: int, method: str, tmp: Path) -> dict[str, Any]:
    """Policy-free accuracy, policy back in context, override, referral and forgetting for one method."""
    from mpi.device import seed_everything
    from mpi.evaluate import evaluate_accuracy, strip_for_json

    seed_everything(seed)
    chain = METHODS[method]
    adapter = plan.stage_dir(key, seed, chain) / "model" if chain else None
    model, processor = load_for_stage(plan, seed, adapter, trainable=False)
    opts = plan.opts
    kw = dict(batch_size=opts["eval_batch_size"], max_new_tokens=opts["eval_max_new_tokens"], progress=True)
    # the method's headline number gets eval_limit items, the other views eval_side_limit (default: the same)
    headline = "with_policy" if method == "in-context" else "policy_free"
    limits = {part: opts["eval_limit"] if part == headline else opts.get("eval_side_limit", opts["eval_limit"])
              for part in ("policy_free", "with_policy", "override")}
    test = load_split(plan, key, "test")
    override = load_split(plan, key, "override")
    results = {
        "policy_free": evaluate_accuracy(model, processor, test, with_policy=False, desc=f"{method} policy-free",
                                         limit=limits["policy_free"], **kw),
        "with_policy": evaluate_accuracy(model, processor, test, with_policy=True, desc=f"{method} policy in context",
                                         limit=limits["with_policy"], **kw),
        "override": evaluate_accuracy(model, processor, override, with_policy=True, desc=f"{method} override",
                                      limit=limits["override"], **kw),
    }
    out = {name: strip_for_json(r) for name, r in results.items()}
    out["forgetting"] = general_skills(plan, model, processor)
    out["method"], out["dataset"], out["seed"] = method, key, seed
    # the headline number: what the method is used for at inference
    out["accuracy"] = out[headline]["accuracy"]
    examples = [{"id": i, "text": t} for i, t in zip(results["policy_free"]["ids"][:8], results["policy_free"]["predictions"][:8])]
    (tmp / "examples.json").write_text(json.dumps(examples, indent=2))
    return out


def general_skills(plan: Plan, model, processor) -> dict[str, Any] | None:
    """General-skill accuracy (the forgetting measure) on the toy base's held-out questions."""
    from mpi.toy import is_toy

    if not is_toy(plan.cfg.model):
        return None  # a hub model's forgetting is measured on MMMU-Pro / MMLU-Pro, outside this toy
    from mpi.toy_base import general_skill_accuracy, general_skill_items

    tb = toy_base_cfg(plan)
    items = general_skill_items(tb.model, tb.n_eval, seed=tb.seed, max_objects=tb.max_objects, world=tb.world,
                                evidence=tb.exists_evidence)
    # the attribute list runs to ~40 tokens: decode far enough that it can be complete
    r = general_skill_accuracy(model, processor, items, batch_size=plan.opts["eval_batch_size"],
                               max_new_tokens=max(tb.max_new_tokens, 64))
    return {"accuracy": r["accuracy"], "per_task": r["per_task"], "n": r["n"]}


def measure_cost(plan: Plan, key: str, tmp: Path) -> dict[str, Any]:
    """Prompt tokens with and without the policy (all test items) and measured prefill on the base model."""
    from mpi.evaluate import measure_prefill, token_cost_table

    model, processor = load_for_stage(plan, plan.seeds[0], None, trainable=False)
    test = load_split(plan, key, "test")
    tokens = token_cost_table(processor, test, limit=None)
    n = min(plan.opts["prefill_items"], len(test))
    prefill = measure_prefill(model, processor, [test[i] for i in range(n)])
    return {"tokens": tokens, "prefill": prefill}


# =========================================================================== run


def run(plan: Plan, *, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Run every stage of `plan` (skipping finished ones), then write the report.

    Under `accelerate launch` every process calls this: the main process builds the data, the toy base and
    the cost table, evaluates and reports (the others wait on a barrier); every training stage runs on all
    processes, data parallel. Returns the report's metrics on the main process, None on the others."""
    from mpi.toy import is_toy

    procs = processes()
    if not procs.main:
        log = _silent
    if procs.main:
        check_run_dir(plan)
    procs.barrier()
    timer = Timer(plan.run_dir)
    t_start = time.perf_counter()
    if procs.main:
        for key in plan.dataset_keys:
            run_stage(plan, timer, f"data/{key}", plan.run_dir / "data" / key, lambda tmp, k=key: build_data(plan, k, tmp), log)
        if is_toy(plan.cfg.model):
            ensure_toy_base(plan, timer, log)
        for key in plan.dataset_keys:
            run_stage(plan, timer, f"cost/{key}", plan.run_dir / "cost" / key, lambda tmp, k=key: measure_cost(plan, k, tmp), log)
    procs.barrier()
    for seed in plan.seeds:
        for key in plan.dataset_keys:
            for chain in training_chains(plan.methods):
                config = stage_config(plan, chain[-1], seed, key)
                train_in_run(plan, key, seed, chain, config,
                             lambda tmp, k=key, s=seed, c=chain, g=config: train_stage(plan, k, s, c, tmp, g), log)
            if not procs.main:
                continue
            for method in plan.methods:
                name = f"eval/{key}/seed{seed}/{method}"
                run_stage(plan, timer, name, plan.eval_dir(key, seed, method),
                          lambda tmp, k=key, s=seed, m=method: evaluate_method(plan, k, s, m, tmp), log,
                          settings=plan.opts)
    metrics = None
    if procs.main:
        from mpi.report import write_report

        metrics = write_report(plan.run_dir, wall_seconds=time.perf_counter() - t_start)
        log(accuracy_table(plan.run_dir))
        log(f"report: {plan.run_dir / 'report.md'}")
    procs.barrier()
    return metrics


def _silent(message: str) -> None:
    """The log of the processes other than the main one: the main process reports for all."""


def accuracy_table(run_dir: Path) -> str:
    """The accuracy section of report.md (the paper's table and what it says), to print at the end of a run."""
    text = (Path(run_dir) / "report.md").read_text()
    start = text.find("## Accuracy")
    if start < 0:
        return ""
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)].strip()


def ensure_toy_base(plan: Plan, timer: Timer, log: Callable[[str], None]) -> None:
    """Use the shipped or cached toy base (build it once if neither exists) and record its info in the run."""
    from mpi.toy_base import SHIPPED_ROOT, build_toy_base, load_toy_base_info

    path = toy_base_dir(plan)
    cached = (path / "toy_base.json").exists()
    where = "shipped with the repo" if path.is_relative_to(SHIPPED_ROOT) else "cached"
    log(f"[{'skip' if cached else 'run '}] toy base -> {path}{f' ({where})' if cached else ' (once, tens of minutes on toy-small)'}")
    t0 = time.perf_counter()
    build_toy_base(toy_base_cfg(plan), device=plan.cfg.device)
    timer.record("toy_base", time.perf_counter() - t0, skipped=cached)
    info = load_toy_base_info(path)
    info["path"] = str(path)
    atomic_write_json(plan.run_dir / "toy_base.json", {k: v for k, v in info.items() if k != "log"})


def check_run_dir(plan: Plan) -> None:
    """A run directory holds one config: refuse to mix stages made with another one."""
    record = {"config": plan.cfg.to_dict(), "opts": plan.opts}
    path = plan.run_dir / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        # seeds and datasets may be added to a run; bookkeeping (checkpoint / print cadence) changes no result
        # out_dir is where the folder is, not what it holds: `runs/toy` from the CLI and MPI_OUT_DIR=$PWD/runs from
        # the notebooks (or the folder moved to Drive) are the same run
        ignored = ("seed", "datasets", "depths", "out_dir", *BOOKKEEPING_FIELDS)
        old_cfg = {k: v for k, v in old.get("config", {}).items() if k not in ignored}
        new_cfg = json.loads(json.dumps({k: v for k, v in record["config"].items() if k not in ignored}, default=str))
        if old_cfg != new_cfg or old.get("opts") != json.loads(json.dumps(plan.opts, default=str)):
            diff = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
            raise PipelineError(
                f"{plan.run_dir} was made with a different config (fields {diff or ['eval options']}); "
                f"pass --name <new name> for a new run, or delete the directory to start over")
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    record["methods"], record["seeds"], record["dataset_keys"] = list(plan.methods), list(plan.seeds), list(plan.dataset_keys)
    if path.exists():  # remember the union of what was asked for, so the report covers every stage run
        old = json.loads(path.read_text())
        for field_name in ("methods", "seeds", "dataset_keys"):
            merged = list(old.get(field_name, []))
            merged += [v for v in record[field_name] if v not in merged]
            record[field_name] = merged
    atomic_write_json(path, record)


# =========================================================================== CLI


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r} ({err})") from err
    return parse


def _set_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects field=value, got {text!r}")
    k, v = text.split("=", 1)
    try:
        value = json.loads(v)
    except json.JSONDecodeError:
        value = v
    return k.strip(), value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpi", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=("run", "report", "toy-base", "smoke"),
                   help="run (default): the whole pipeline; report RUN_DIR: redraw a run's report; "
                        "toy-base: build the cached toy base only; smoke: build the toy VLM, one forward")
    p.add_argument("run_dir", nargs="?", help="for `report`: the run directory")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: $MPI_PRESET or toy")
    p.add_argument("--name", default=None, help="run name: results go to <out-dir>/<name> (default: the preset)")
    p.add_argument("--out-dir", default=None, help="parent directory of runs (default: runs)")
    p.add_argument("--methods", type=_csv(str), default=None,
                   help=f"comma-separated, from: {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--datasets", type=_csv(str), default=None, help="clevr, gta (default: the preset's)")
    p.add_argument("--depths", type=_csv(int), default=None, help="ClevrPolicy tree depths N, e.g. 2,4")
    p.add_argument("--seeds", type=_csv(int), default=None, help="e.g. 0,1,2 (default: 0)")
    p.add_argument("--all", action="store_true", help="every method and seeds 0,1,2 (unless given)")
    p.add_argument("--table", action="store_true",
                   help="the RL comparison: in-context, CoT SFT (+ GRPO), VM-CPT + CoT SFT (+ GRPO), TriMPI and its "
                        "wrong-policy control, seeds 0,1,2, ClevrPolicy N=2,4 (unless given)")
    p.add_argument("--rebuild", action="store_true",
                   help="toy-base: train the toy base again on this machine (into the cache), even if one is shipped")
    p.add_argument("--ship", action="store_true",
                   help="toy-base: copy the toy base built here into mpi/assets/toy_base (fp16 weights), for maintainers")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan, every stage's resolved config and the memory preflight; load nothing")
    p.add_argument("--set", type=_set_value, action="append", default=[], metavar="FIELD=VALUE",
                   help="override a RunConfig field (JSON value), e.g. --set rl_steps=60, --set save_every=5, "
                        "--set log_every=20; the pipeline's other knobs go to RunConfig.extra (e.g. eval_limit=200, "
                        "'grpo={\"temperature\": 0.7}'); an unknown name is an error that lists the valid ones")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    names = {f.name for f in dataclasses.fields(RunConfig)}
    overrides: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for k, v in args.set:
        if k in names:
            overrides[k] = tuple(v) if isinstance(v, list) else v
        else:
            extra[k] = v
    if args.datasets:
        overrides["datasets"] = tuple(args.datasets)
    if args.depths:
        overrides["depths"] = tuple(args.depths)
    elif getattr(args, "table", False):
        overrides["depths"] = (2, 4)
    if args.out_dir:
        overrides["out_dir"] = args.out_dir
    from mpi.config import ConfigValueError

    try:
        cfg = get_config(args.preset, **overrides)
    except ConfigValueError as err:  # a --set value of the wrong type or out of range: named, no traceback
        raise PipelineError(str(err)) from err
    cfg.extra = {**cfg.extra, **extra}
    return cfg


def quiet_library_bars() -> None:
    """No bars for loading weights, saving or filtering datasets: the pipeline shows one bar per stage."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    # printed once per stage by transformers' own gradient-checkpointing check, whatever the model does
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated")
