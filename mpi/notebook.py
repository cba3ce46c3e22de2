"""What every notebook's config cell calls: pick the preset (CI forces one), seed, print versions."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

from mpi.config import PRESET_ENV, RunConfig, get_config
from mpi.device import describe_device, get_device, pick_dtype, seed_everything


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
    """Resolve the run config for a notebook. The environment variable MPI_PRESET wins over `preset`
    so that CI runs every notebook on the toy preset; with no GPU the default is the toy preset."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    chosen = os.environ.get(PRESET_ENV) or preset
    device = get_device()
    if chosen is None:
        chosen = "colab-t4" if device.type == "cuda" else "toy"
    cfg = get_config(chosen, seed=seed, **overrides)
    if cfg.device is None:
        cfg.device = device.type
    seed_everything(cfg.seed)
    info = describe_device(cfg.device)
    print(" | ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"preset {cfg.preset} | model {cfg.model} | device {info.type} {info.name} | dtype "
          f"{str(pick_dtype(info)).replace('torch.', '')} | seed {cfg.seed} | in colab {'google.colab' in sys.modules}")
    return cfg
