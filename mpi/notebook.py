"""What the notebooks call: the config cell (`notebook_setup`), Google Drive on Colab, and the course chain.

The notebooks are one chain in the pipeline's run folder (`mpi.pipeline`, `runs/<name>/...`):

    01 data/<dataset>/...   02 stages/<dataset>/seed<k>/cpt   03 .../cot-sft and .../cpt+cot-sft
    04 .../cpt+cot-sft+poro-grpo                              05 eval/<dataset>/seed<k>/<method>

Notebooks 02-04 train their own stage in view: `pipeline.stage_config` (the config the pipeline trains
with, shown and editable), then `train_supervised` / `train_poro` between `pipeline.start_stage` and
`pipeline.finish_stage`, run by `pipeline.train_in_run` into the stage's folder; an edited config trains
into its own folder (`<chain>@<config key>`). With the run's config, a notebook and `python -m mpi --preset
<p>` write the same folders: what one made, the other skips. A notebook opened alone builds a missing earlier
stage with the pipeline's `train_stage` (`ensure_stage`) and says so.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

from mpi.config import PRESET_ENV, RunConfig, get_config
from mpi.device import describe_device, get_device, pick_dtype, seed_everything

RUN_NAME_ENV = "MPI_RUN_NAME"  # the run folder's name (default: the preset, as `python -m mpi`)
OUT_DIR_ENV = "MPI_OUT_DIR"  # the parent of run folders (default: runs/); the Drive cell points it at Drive
DRIVE_ROOT = "/content/drive/MyDrive/mpi-course"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


def notebook_setup(preset: str | None = None, seed: int = 0, **overrides: Any) -> RunConfig:
    """Resolve the run config for a notebook.

    The preset: the environment variable MPI_PRESET if set (CI forces "tiny"), else `preset`, else the
    hardware's default ("colab-t4" with a CUDA GPU, "toy" on a CPU). MPI_OUT_DIR (set by `use_google_drive`)
    moves the run folders. `cfg.device` stays None (= the best device) unless overridden, so that the
    config a notebook records in the run folder is the one `python -m mpi` records."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    chosen = os.environ.get(PRESET_ENV) or preset
    device = get_device()
    if chosen is None:
        chosen = "colab-t4" if device.type == "cuda" else "toy"
    if os.environ.get(OUT_DIR_ENV) and "out_dir" not in overrides:
        overrides["out_dir"] = os.environ[OUT_DIR_ENV]
    cfg = get_config(chosen, seed=seed, **overrides)
    seed_everything(cfg.seed)
    info = describe_device(cfg.device or device.type)
    print(" | ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"preset {cfg.preset} | model {cfg.model} | device {info.type} {info.name} | dtype "
          f"{str(pick_dtype(info)).replace('torch.', '')} | seed {cfg.seed} | in colab {'google.colab' in sys.modules}")
    return cfg


def use_google_drive(root: str = DRIVE_ROOT, mount: bool = True) -> Path:
    """Keep run folders and model caches on Google Drive, so the next notebook (or a new Colab session) finds
    the last one's output: MPI_OUT_DIR (runs), MPI_CACHE (toy models and toy base), HF_HOME (hub models).
    Call it before `notebook_setup` and before anything imports transformers (HF_HOME is read at import)."""
    if mount:
        from google.colab import drive  # only on Colab

        drive.mount("/content/drive")
    root_path = Path(root)
    for sub in ("runs", "cache", "hf"):
        (root_path / sub).mkdir(parents=True, exist_ok=True)
    os.environ[OUT_DIR_ENV] = str(root_path / "runs")
    os.environ["MPI_CACHE"] = str(root_path / "cache")
    if "transformers" in sys.modules:
        print("note: transformers is already imported, so HF_HOME cannot move now; restart the runtime "
              "and run this cell first to keep hub downloads on Drive")
    os.environ["HF_HOME"] = str(root_path / "hf")
    print(f"runs -> {os.environ[OUT_DIR_ENV]} | model cache -> {os.environ['MPI_CACHE']} | HF_HOME -> {os.environ['HF_HOME']}")
    return root_path


# =========================================================================== the course chain


def course_plan(cfg: RunConfig, name: str | None = None, methods: Sequence[str] | None = None):
    """The pipeline's plan for this config: the run folder every notebook of the course reads and writes.

    name: MPI_RUN_NAME, else the preset (as `python -m mpi --preset <p>`); methods: the pipeline's default
    comparison (in-context, CoT SFT, TriMPI). Refuses a run folder made with another config (PipelineError)."""
    from mpi import pipeline

    plan = pipeline.make_plan(cfg, name=name or os.environ.get(RUN_NAME_ENV) or None,
                              methods=methods or pipeline.DEFAULT_METHODS, seeds=[cfg.seed])
    pipeline.check_run_dir(plan)
    print(f"run folder {plan.run_dir} | datasets {', '.join(plan.dataset_keys)} | seed {cfg.seed} "
          f"(the same folder as `python -m mpi --preset {cfg.preset}"
          f"{'' if plan.name == cfg.preset else ' --name ' + plan.name}`)")
    return plan


def _log(message: str) -> None:
    print(message)


def _timer(plan):
    from mpi import pipeline

    return pipeline.Timer(plan.run_dir)


def ensure_data(plan, key: str | None = None, *, who: str = "notebook 01") -> dict[str, Any]:
    """The dataset `key` of the run (train / test / override), built with `pipeline.build_data` if missing."""
    from mpi import pipeline

    key = key or plan.dataset_keys[0]
    path = plan.run_dir / "data" / key
    if not pipeline.is_done(path) and who != "here":
        print(f"{path} is missing ({who} has not run on this run folder): building it now with pipeline.build_data")
    return pipeline.run_stage(plan, _timer(plan), f"data/{key}", path,
                              lambda tmp: pipeline.build_data(plan, key, tmp), _log)


def ensure_base(plan) -> str:
    """The base every method starts from: for a toy model the toy base (`pipeline.ensure_toy_base` takes it from
    the cache or builds it, and records it in the run folder), else the hub model."""
    from mpi import pipeline
    from mpi.toy import is_toy

    if is_toy(plan.cfg.model):
        pipeline.ensure_toy_base(plan, _timer(plan), _log)
    return pipeline.base_model_path(plan)


WHO_MAKES = {"cpt": "notebook 02", "cot-sft": "notebook 03", "direct-sft": "notebook 03",
             "grpo": "notebook 04", "dapo": "notebook 04", "poro-grpo": "notebook 04", "poro-dapo": "notebook 04"}


def ensure_stage(plan, chain: Sequence[str], key: str | None = None, seed: int | None = None) -> dict[str, Any]:
    """The trained model of `chain` (e.g. ("cpt", "cot-sft")) with the run's stage configs, trained with
    `pipeline.train_stage` if missing, parents first (an earlier notebook's stages). Returns its done.json."""
    from mpi import pipeline

    chain = tuple(chain)
    if not chain:
        raise ValueError("ensure_stage needs a chain of stages, e.g. ('cpt', 'cot-sft'); the base model is ensure_base")
    key = key or plan.dataset_keys[0]
    seed = plan.seeds[0] if seed is None else seed
    ensure_data(plan, key)
    ensure_base(plan)
    for i in range(1, len(chain) + 1):
        sub = chain[:i]
        path = plan.stage_dir(key, seed, sub)
        if not pipeline.is_done(path):
            print(f"{path} is missing ({WHO_MAKES.get(sub[-1], 'an earlier notebook')} makes it): "
                  "training it now with pipeline.train_stage")
        # a killed stage resumes from its checkpoints in <chain>.partial/
        config = pipeline.stage_config(plan, sub[-1], seed, key)
        done = pipeline.train_in_run(plan, key, seed, sub, config,
                                     lambda tmp, s=sub, c=config: pipeline.train_stage(plan, key, seed, s, tmp, c), _log)
    return done


def stage_path(plan, chain: Sequence[str], key: str | None = None, seed: int | None = None, config=None) -> Path:
    """Where `chain`'s stage lives: model/ (the adapter) and work/ (metrics.jsonl, samples). `config`: the
    stage config it was trained with, if not the run's (`pipeline.stage_folder`: `<chain>@<config key>`)."""
    from mpi import pipeline

    key = key or plan.dataset_keys[0]
    return pipeline.stage_folder(plan, key, plan.seeds[0] if seed is None else seed, tuple(chain), config)


def load_stage_model(plan, chain: Sequence[str] = (), key: str | None = None, seed: int | None = None,
                     trainable: bool = False, config=None):
    """(model, processor) of a finished stage, loaded as the pipeline loads it; chain=() is the base model."""
    from mpi import pipeline

    seed = plan.seeds[0] if seed is None else seed
    adapter = stage_path(plan, chain, key, seed, config) / "model" if chain else None
    return pipeline.load_for_stage(plan, seed, adapter, trainable=trainable)


def stage_metrics(plan, chain: Sequence[str], key: str | None = None, seed: int | None = None,
                  config=None) -> list[dict]:
    from mpi.metrics import read_metrics

    return read_metrics(stage_path(plan, chain, key, seed, config) / "work")


def ensure_eval(plan, method: str, key: str | None = None, seed: int | None = None) -> dict[str, Any]:
    """A method's evaluation (results.json), made with `pipeline.evaluate_method` if missing (its chain first)."""
    from mpi import pipeline

    key = key or plan.dataset_keys[0]
    seed = plan.seeds[0] if seed is None else seed
    chain = pipeline.METHODS[method]
    if chain:
        ensure_stage(plan, chain, key, seed)
    else:
        ensure_data(plan, key)
        ensure_base(plan)
    return pipeline.run_stage(plan, _timer(plan), f"eval/{key}/seed{seed}/{method}", plan.eval_dir(key, seed, method),
                              lambda tmp: pipeline.evaluate_method(plan, key, seed, method, tmp), _log,
                              settings=plan.opts)
