"""The training engine the loops share: precision and loss scaling, the learning-rate schedule, the optimizer,
checkpoints and resuming, the best-validation checkpoint, and saving a trained model.

    precision      `autocast` (bfloat16 scoring, float32 head), `dropout_disabled`, `model_compute_dtype`,
                   `DynamicLossScaler` / `make_loss_scaler` (float16 compute: a T4)
    schedule       `learning_rate_at`: warm-up, then constant or cosine; the RL loop sets it per step and the
                   supervised Trainer reads it through `lr_lambda`
    checkpoints    `PromptSampler` (the prompt order as one cursor), `save_checkpoint` / `latest_checkpoint` /
                   `load_checkpoint` / `resume` (weights, optimizer, RNG, cursor: a resumed run ends with the
                   weights of an uninterrupted one), `BestCheckpoint` (best smoothed validation weights)
    saving         `save_model` (an adapter, or a loadable model for full fine-tuning), `save_adapter`

None of it is PolicyRollout: `mpi.poro` (and `mpi.supervised` for the schedule and saving) call it, so a
chapter module reads as its method. Data parallel goes through `mpi.distributed` (no-ops in one process).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from mpi import distributed as dist
from mpi import sampling
from mpi.atomic import atomic_directory, atomic_write_text

LOSS_SCALING = ("auto", "on", "off")
LR_SCHEDULES = ("constant", "cosine")


# =========================================================================== precision


@contextlib.contextmanager
def dropout_disabled(model, enabled: bool = True) -> Iterator[torch.nn.Module]:
    """Dropout off inside the block, every other train/eval flag as it was.

    Only the dropout modules (peft's lora_dropout among them) and attention modules with a functional
    `attention_dropout` > 0 are switched, not the whole model: `model.eval()` would also turn off gradient
    checkpointing, which transformers runs only in training mode. Restored on exit."""
    if not enabled:
        yield model
        return
    switched = [m for m in model.modules() if m.training and (
        isinstance(m, torch.nn.modules.dropout._DropoutNd)
        or (isinstance(getattr(m, "attention_dropout", None), float) and m.attention_dropout > 0))]
    for m in switched:
        m.training = False  # this module only (not .eval(), which would recurse into its children)
    try:
        yield model
    finally:
        for m in switched:
            m.training = True


def model_compute_dtype(model) -> torch.dtype:
    """The dtype the forward pass computes in: a 4-bit layer's compute dtype, else the most common dtype of
    the frozen floating-point weights (LoRA weights are float32 even on a float16 base), else of all."""
    for m in model.modules():
        dtype = getattr(m, "compute_dtype", None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    for frozen_only in (True, False):
        counts: dict[torch.dtype, int] = {}
        for p in model.parameters():
            if p.dtype.is_floating_point and (not frozen_only or not p.requires_grad):
                counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
        if counts:
            return max(counts, key=counts.get)
    return torch.float32


def needs_loss_scaling(compute_dtype: torch.dtype, setting: str = "auto") -> bool:
    """Dynamic loss scaling is for float16 compute only: its 5 exponent bits underflow small gradients
    (below ~6e-8) and overflow large ones (above 65504). bfloat16 has float32's exponent range; float32
    needs none. setting "on" / "off" overrides the decision."""
    if setting not in LOSS_SCALING:
        raise ValueError(f"loss_scaling must be one of {LOSS_SCALING}, got {setting!r}")
    if setting != "auto":
        return setting == "on"
    return compute_dtype == torch.float16


class DynamicLossScaler:
    """Dynamic loss scaling written out (what torch.amp.GradScaler does, on any device and dtype):

    scale_loss(loss) before backward; unscale_(params) after it (and after the cross-process gradient sum),
    before clipping: True when every gradient is finite. update(found_inf): an overflowed update is
    skipped by the caller, counted here, and the scale multiplied by backoff_factor; after growth_interval
    good updates in a row the scale is multiplied by growth_factor."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_interval: int = 100, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, min_scale: float = 2.0 ** -24):
        self.scale, self.growth_interval = float(init_scale), int(growth_interval)
        self.growth_factor, self.backoff_factor, self.min_scale = growth_factor, backoff_factor, min_scale
        self.good_steps, self.skipped_steps = 0, 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    @torch.no_grad()
    def unscale_(self, params: Sequence[torch.Tensor]) -> bool:
        grads = [p.grad for p in params if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if finite:
            for g in grads:  # in the gradient's own dtype; float32 LoRA grads lose nothing (a power of 2)
                g.mul_(1.0 / self.scale)
        return finite

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.good_steps = 0
            self.skipped_steps += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def metrics(self) -> dict[str, float]:
        return {"fp16/loss_scale": self.scale, "fp16/skipped_steps": self.skipped_steps}

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
        self.skipped_steps = int(state["skipped_steps"])


def make_loss_scaler(model, cfg) -> DynamicLossScaler | None:
    """A DynamicLossScaler when the model computes in float16 (cfg.loss_scaling "auto"), else None."""
    if not needs_loss_scaling(model_compute_dtype(model), cfg.loss_scaling):
        return None
    return DynamicLossScaler()


@contextlib.contextmanager
def autocast(model, bf16: bool) -> Iterator[None]:
    """The scoring passes' precision: with bf16 a bfloat16 torch.autocast on the model's device, except the
    output head, which computes in float32 (bfloat16 logits carry ~2-3 significant digits: on the toy's
    learning test PoRo then reached accuracy 0.32 instead of 0.73 in 20 steps; MiniMax-M1 reports the same
    head-precision effect on the train / sample mismatch). Without bf16, nothing changes."""
    if not bf16:
        yield
        return
    device = next(model.parameters()).device
    head = sampling.base_model(model).get_output_embeddings()
    own = head.__dict__.get("forward")
    original = head.forward

    def float32_forward(x, *args, **kwargs):
        with torch.autocast(device.type, enabled=False):
            return original(x.float(), *args, **kwargs)

    head.forward = float32_forward  # the instance attribute shadows the class's forward for this block only
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


# =========================================================================== checkpoints


class PromptSampler:
    """Dataset indices in a fresh seeded permutation per epoch; the whole state is one cursor."""

    def __init__(self, size: int, seed: int, cursor: int = 0):
        if size < 1:
            raise ValueError("the RL dataset is empty: build it with mpi.data and pass at least one item")
        self.size, self.seed, self.cursor = size, seed, cursor
        self._epoch, self._perm = -1, None

    def next(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            epoch, pos = divmod(self.cursor, self.size)
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
                self._perm, self._epoch = torch.randperm(self.size, generator=g).tolist(), epoch
            out.append(self._perm[pos])
            self.cursor += 1
        return out


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | Path, step: int, model, optimizer, sampler: PromptSampler, config: dict[str, Any],
                    keep: int = 2, reference=None, *, loss_scaler: DynamicLossScaler | None = None,
                    best: "BestCheckpoint | None" = None) -> Path:
    """trainable weights + optimizer + RNG + step + prompt cursor (+ the KL reference's weights, which a resumed
    run cannot rebuild from the model: a reference with a state_dict), written to a temp dir then renamed; the
    newest `keep` checkpoints stay."""
    path = Path(out_dir) / "checkpoints" / f"step_{step:06d}"
    with atomic_directory(path) as tmp:
        trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(trainable, tmp / "trainable.pt")
        if hasattr(reference, "state_dict"):
            torch.save(reference.state_dict(), tmp / "reference.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        state = {"step": step, "cursor": sampler.cursor, "config": config}
        if loss_scaler is not None:
            state["loss_scaler"] = loss_scaler.state_dict()
        if best is not None:
            state["best"] = best.state()
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))
    checkpoints = sorted((Path(out_dir) / "checkpoints").glob("step_*"))
    for old in checkpoints[:-max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = sorted(p for p in (Path(out_dir) / "checkpoints").glob("step_*") if (p / "state.json").exists())
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, reference=None) -> dict[str, Any]:
    state = json.loads((path / "state.json").read_text())
    if hasattr(reference, "load_state_dict"):  # before the weights change: it was built from the current model
        if not (path / "reference.pt").exists():
            raise ValueError(f"checkpoint {path} has no KL reference weights (saved with another kl_reference); "
                             "resume with the same GRPOConfig")
        reference.load_state_dict(torch.load(path / "reference.pt", map_location="cpu"))
    load_trainable(model, path / "trainable.pt")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu"))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return state


# =========================================================================== schedule and optimizer


def learning_rate_at(step: int, peak: float, total_steps: int, warmup_steps: int = 0, schedule: str = "constant",
                     min_lr_ratio: float = 0.0) -> float:
    """THE learning-rate schedule of the training loops (RL, and the supervised Trainer through `lr_lambda`):
    the rate of optimizer step `step` (1-based in the RL loop): a linear warm-up to `peak` over warmup_steps (a fresh Adam's first
    steps are its largest: its second-moment estimate is still near 0), then constant, or a cosine from the
    peak to min_lr_ratio x peak at step total_steps. A pure function of the step, so a resumed run follows
    the schedule of an uninterrupted one."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"the learning-rate schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return peak * step / max(warmup_steps, 1)
    if schedule == "constant":
        return peak
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    floor = min_lr_ratio * peak
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class BestCheckpoint:
    """The best validation weights so far, by an exponential moving average of one metric.

    `update(step, metrics, model)` folds the new value into the average and, when it is the best yet, writes
    the trainable weights to out_dir/best/ (atomically, with best.json). `state()` goes into every regular
    checkpoint, so a resumed run continues the same average. `restore(model)` loads the best weights."""

    def __init__(self, out_dir: str | Path, metric: str, smoothing: float):
        self.dir, self.metric, self.smoothing = Path(out_dir) / "best", metric, smoothing
        self.average: float | None = None
        self.best: float | None = None
        self.best_step: int | None = None

    def update(self, step: int, metrics: dict[str, Any], model) -> dict[str, float]:
        if self.metric not in metrics:
            raise ValueError(f"keep_best: metric {self.metric!r} is not among the validation metrics "
                             f"{sorted(metrics)}; pass one of them as BestCheckpoint's metric")
        value = float(metrics[self.metric])
        self.average = value if self.average is None else self.smoothing * value + (1 - self.smoothing) * self.average
        if self.best is None or self.average > self.best:
            self.best, self.best_step = self.average, step
            if dist.is_main_process():
                with atomic_directory(self.dir) as tmp:
                    torch.save({n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
                               tmp / "trainable.pt")
                    (tmp / "best.json").write_text(json.dumps(
                        {"step": step, "metric": self.metric, "smoothed": self.average, "raw": value}, indent=2))
        return {"val/smoothed": self.average, "val/best_step": float(self.best_step)}

    def state(self) -> dict[str, Any]:
        return {"average": self.average, "best": self.best, "best_step": self.best_step}

    def load_state(self, state: dict[str, Any] | None) -> None:
        if state:
            self.average, self.best, self.best_step = state["average"], state["best"], state["best_step"]

    def restore(self, model) -> int | None:
        """Copy the best weights into the model (every process reads the main process's file)."""
        dist.wait_for_everyone()
        path = self.dir / "trainable.pt"
        if self.best_step is None or not path.exists():
            return None
        load_trainable(model, path)
        return self.best_step


def load_trainable(model, path: str | Path) -> None:
    """Copy saved trainable weights ({name: tensor}, as BestCheckpoint and save_checkpoint write them) into
    the model; a name the model lacks is an error naming the file."""
    weights = torch.load(path, map_location="cpu")
    params = dict(model.named_parameters())
    missing = sorted(set(weights) - set(params))
    if missing:
        raise ValueError(f"{path} has weights the model lacks ({missing[:3]}...): load the same model and LoRA settings")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device))


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    """AdamW over the trainable weights with cfg.learning_rate, cfg.weight_decay and cfg.adam_betas."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: load it with lora=LoraSettings(...) or trainable weights")
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=tuple(cfg.adam_betas))


def idle_update(model, optimizer, num_iterations: int, max_grad_norm: float,
                loss_scaler: DynamicLossScaler | None = None) -> None:
    """A process whose every group was flat (dynamic sampling) still joins the step's gradient sums and optimizer
    updates with a zero contribution (`mpi.distributed.idle_update`); with a loss scaler it checks the summed
    gradients for overflow, since they hold the other processes' infs, so it skips exactly the updates they skip."""
    if loss_scaler is None:
        dist.idle_update(model, optimizer, num_iterations=num_iterations, max_grad_norm=max_grad_norm)
        return
    params = [p for p in model.parameters() if p.requires_grad]
    dist.global_sums(0.0, 0.0)
    for _ in range(num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for p in params:  # a zero contribution, so the optimizer steps every parameter as the others do
            p.grad = torch.zeros_like(p)
        dist.all_reduce_gradients(params)
        if not loss_scaler.unscale_(params):
            optimizer.zero_grad(set_to_none=True)
            loss_scaler.update(found_inf=True)
            continue
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_scaler.update(found_inf=False)


def lr_lambda(total_steps: int, warmup_steps: int = 0, schedule: str = "constant", min_lr_ratio: float = 0.0):
    """`learning_rate_at` as a torch LambdaLR factor for the supervised Trainer. The factor of the next update
    is the schedule at the number of updates already taken, transformers' own convention, so this gives
    exactly transformers' cosine (to 0) and constant-with-warm-up schedules, and SFT's numbers stay theirs."""
    return lambda taken: learning_rate_at(taken, 1.0, total_steps, warmup_steps, schedule, min_lr_ratio)


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def resume(out_dir: str | Path, model, optimizer, sampler, reference=None, loss_scaler=None, best=None) -> int:
    """Load the latest checkpoint in out_dir into the model, optimizer, RNG, prompt cursor (and the KL
    reference, loss scaler and best-checkpoint state); returns its step, 0 when there is none."""
    path = latest_checkpoint(out_dir)
    if path is None:
        return 0
    state = load_checkpoint(path, model, optimizer, reference)
    sampler.cursor = state["cursor"]
    if loss_scaler is not None and "loss_scaler" in state:
        loss_scaler.load_state_dict(state["loss_scaler"])
    if best is not None:
        best.load_state(state.get("best"))
    return int(state["step"])


def metrics_logger(out_dir: str | Path, start: int, config: dict[str, Any], config_name: str):
    """The run's metrics log (continued after step `start` when resuming) and its config file, written by the
    main process; the other processes log nothing."""
    from mpi.metrics import MetricsLogger

    if not dist.is_main_process():
        return dist.NullLogger()
    logger = MetricsLogger(out_dir, resume_step=start or None, echo=False)
    atomic_write_text(Path(out_dir) / config_name, json.dumps(config, indent=2, default=str))
    return logger


# =========================================================================== the KL reference


class StartReference:
    """The KL reference "the policy when RL started": a copy of the trainable weights, swapped in for the
    reference pass and swapped back after. A LoRA copy is small; with lora_r=None it is a whole model."""

    def __init__(self, model):
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("kl_reference='start' needs trainable weights; load the model with trainable=True")
        self.weights = {n: p.detach().clone() for n, p in self.params.items()}

    @contextlib.contextmanager
    def __call__(self, model) -> Iterator[torch.nn.Module]:
        self._swap()
        try:
            yield model
        finally:
            self._swap()

    def _swap(self) -> None:
        # Exchange the storages rather than copy: no third set of weights during the pass. The Parameter
        # objects stay the same, so the optimizer's state and gradient hooks are untouched.
        for n, p in self.params.items():
            p.data, self.weights[n] = self.weights[n], p.data

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: w.detach().cpu() for n, w in self.weights.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.weights):
            raise ValueError("the checkpoint's KL reference does not match this model's trainable weights")
        for n, w in state.items():
            self.weights[n] = w.to(self.weights[n].device, self.weights[n].dtype)


# =========================================================================== saving


def save_model(model, processor, out: Path, base_path: str | None = None) -> Path:
    """An adapter directory (LoRA) or, for full fine-tuning, a loadable model directory."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if not hasattr(model, "peft_config"):
        processor.save_pretrained(out)
        processor.tokenizer.save_pretrained(out)
        source = base_path or str(getattr(model.config, "_name_or_path", ""))
        spec = Path(source) / "toy_spec.json"
        if spec.is_file():  # the toy processor is rebuilt from its spec
            shutil.copy(spec, out / "toy_spec.json")
    return out


def save_adapter(model, out_dir: str | Path) -> Path | None:
    """A peft model's adapter in out_dir/adapter (the main process writes, every process waits); None for a
    model without one."""
    path = Path(out_dir) / "adapter"
    if hasattr(model, "peft_config") and dist.is_main_process():
        with atomic_directory(path) as tmp:
            model.save_pretrained(tmp)
    dist.wait_for_everyone()  # nobody returns before process 0 has written the adapter
    return path if path.exists() else None
