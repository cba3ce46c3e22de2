"""Device, dtype and seeding decisions.

The dtype choice is a pure function of what the hardware reports, so it can be tested for a T4, an
A100 and a CPU on a machine that has none of them.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DeviceInfo:
    """What the dtype decision needs to know about a device."""

    type: str  # "cuda", "mps" or "cpu"
    name: str = ""
    bf16_supported: bool = False
    compute_capability: tuple[int, int] | None = None
    total_memory_gb: float | None = None


def get_device(prefer: str | None = None) -> torch.device:
    """The device to train on: `prefer` if given, else CUDA, then Apple MPS, then CPU.

    `MPI_DEVICE` in the environment overrides the automatic choice (e.g. `MPI_DEVICE=cpu`).
    """
    prefer = prefer or os.environ.get("MPI_DEVICE")
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        # Under `accelerate launch`/torchrun each process owns the GPU of its local rank.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe_device(device: torch.device | str | None = None) -> DeviceInfo:
    """Read a device's properties (only CUDA has interesting ones)."""
    device = torch.device(device) if device is not None else get_device()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return DeviceInfo(
            type="cuda",
            name=props.name,
            bf16_supported=torch.cuda.is_bf16_supported(),
            compute_capability=(props.major, props.minor),
            total_memory_gb=props.total_memory / 2**30,
        )
    return DeviceInfo(type=device.type, name=device.type)


def pick_dtype(info: DeviceInfo) -> torch.dtype:
    """bf16 where the GPU supports it, fp16 on older GPUs (a T4 is sm_75: no bf16), fp32 on CPU/MPS.

    CPU stays fp32 because bf16 matmuls on CPU are slow and the toy models are tiny anyway.
    """
    if info.type != "cuda":
        return torch.float32
    if info.bf16_supported and (info.compute_capability is None or info.compute_capability >= (8, 0)):
        return torch.bfloat16
    return torch.float16


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run repeats exactly on the same machine."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
