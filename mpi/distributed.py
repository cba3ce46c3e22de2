"""Data parallel for the from-scratch loops, on top of accelerate (no distributed system of our own).

`accelerate launch` starts one process per GPU (or per CPU slot with --cpu) and sets the environment;
`accelerate.PartialState()` reads it and opens the process group (NCCL on GPUs, gloo on CPUs). Every
helper here takes an optional `accelerator` (an `Accelerator` or a `PartialState`) and otherwise asks
`PartialState()`; run without a launcher they are all identities, so the single-process path is the
same code.

How the PolicyRollout loop uses them, per step:

    sampler = ShardedSampler(PromptSampler(len(dataset), seed))   # process p takes positions p, p+W, ...
    local = local_count(cfg.prompts_per_step)                     # prompts_per_step is the GLOBAL batch
    ... generate + score this process's groups (a group never crosses processes) ...
    n_seq, n_tok = global_sums(N, mask.sum())                     # the whole step's counts
    loss = local_sum / n_seq (or / n_tok); loss.backward()        # this process's share of the global loss
    all_reduce_gradients(params)                                  # shares add up to the global gradient
    clip, optimizer.step()                                        # identical on every process
    row = reduce_metrics(metrics)                                 # one row for the whole step

Because every process divides by the *global* counts and the gradients are summed (not averaged),
the update equals the single-process update on the same global batch even when processes hold
different numbers of groups or tokens (DAPO's token mean, dynamic sampling).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import torch

# How reduce_metrics combines one key across processes (others: mean weighted by WEIGHT_KEY).
SUM_KEYS = ("loss", "num_groups", "gen_tokens", "gen_tokens_per_s", "num_rows", "num_tokens")
MAX_KEYS = ("step_time", "gen_seconds", "resample_tries")
WEIGHT_KEY = "num_groups"
REDUCE_OPS = ("mean", "sum", "max", "min")


# --------------------------------------------------------------------------- who am I


def get_state(accelerator=None):
    """The accelerator / PartialState to ask; `PartialState()` (initialises the process group from
    the environment `accelerate launch` sets) when none is given."""
    if accelerator is not None:
        return accelerator
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # Without a GPU, processes launched by torchrun must use CPU + gloo; PartialState only does that
    # when told (accelerate's own launcher says so through ACCELERATE_USE_CPU).
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def process_index(accelerator=None) -> int:
    return int(get_state(accelerator).process_index)


def num_processes(accelerator=None) -> int:
    return int(get_state(accelerator).num_processes)


def is_main_process(accelerator=None) -> bool:
    """True on process 0 (the one that writes logs, checkpoints and adapters) and when not launched."""
    return bool(get_state(accelerator).is_main_process)


def _distributed(accelerator=None) -> bool:
    return num_processes(accelerator) > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def wait_for_everyone(accelerator=None) -> None:
    if _distributed(accelerator):
        get_state(accelerator).wait_for_everyone()


def _comm_device(accelerator=None) -> torch.device:
    """NCCL only moves CUDA tensors; gloo only CPU tensors."""
    backend = torch.distributed.get_backend() if _distributed(accelerator) else "gloo"
    return get_state(accelerator).device if backend == "nccl" else torch.device("cpu")


# --------------------------------------------------------------------------- sharding


def shard_bounds(num_items: int, index: int, world: int, group_size: int = 1) -> tuple[int, int]:
    """[start, end) of process `index`'s share: whole groups, as even as possible, earlier processes
    taking the remainder (like accelerate's split_between_processes)."""
    if group_size < 1 or num_items % group_size:
        raise ValueError(f"shard_for_process: {num_items} items do not split into groups of group_size={group_size}; "
                         "pass the group size that laid them out (2G with PolicyRollout, G without)")
    if not 0 <= index < world:
        raise ValueError(f"process index {index} is outside 0..{world - 1}")
    groups = num_items // group_size
    base, extra = divmod(groups, world)
    start = index * base + min(index, extra)
    end = start + base + (1 if index < extra else 0)
    return start * group_size, end * group_size


def shard_for_process(items: Sequence[Any], accelerator=None, *, group_size: int = 1,
                      index: int | None = None, world: int | None = None) -> list[Any]:
    """This process's contiguous share of `items`, never splitting a group of `group_size` items.

    With W processes and P groups, process p gets P//W groups (+1 for the first P%W processes); the
    shares concatenated in process order give back `items`. `index`/`world` override the launcher's
    values (tests, or sharding for someone else).
    """
    index = process_index(accelerator) if index is None else index
    world = num_processes(accelerator) if world is None else world
    start, end = shard_bounds(len(items), index, world, group_size)
    return list(items[start:end])


def local_count(global_count: int, accelerator=None, *, index: int | None = None, world: int | None = None) -> int:
    """How many of `global_count` prompts (groups) this process handles per step."""
    index = process_index(accelerator) if index is None else index
    world = num_processes(accelerator) if world is None else world
    if global_count < world:
        raise ValueError(f"prompts_per_step={global_count} is the global number of groups per step and must be "
                         f">= the number of processes ({world}) so that every process has a group; raise "
                         "prompts_per_step or launch fewer processes")
    start, end = shard_bounds(global_count, index, world)
    return end - start


class ShardedSampler:
    """Process p of W reads positions p, p+W, p+2W, ... of a shared seeded prompt order.

    `base` is any sampler with a settable integer `cursor` and `next(n) -> list` that draws from
    position `cursor` (mpi.engine.PromptSampler). Every process builds the same base (same seed), so
    the shares never overlap, even when processes draw different amounts (DAPO's refills), and one
    step of W processes x n prompts covers exactly the positions a single process would draw with
    n*W prompts per step. `cursor` counts this process's own draws (what a checkpoint stores).
    """

    def __init__(self, base, accelerator=None, *, index: int | None = None, world: int | None = None):
        self.base = base
        self.index = process_index(accelerator) if index is None else index
        self.world = num_processes(accelerator) if world is None else world
        self.cursor = int(getattr(base, "cursor", 0))

    def next(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            self.base.cursor = self.cursor * self.world + self.index
            out.extend(self.base.next(1))
            self.cursor += 1
        return out


# --------------------------------------------------------------------------- weights, gradients, counts


@torch.no_grad()
def sync_initial_weights(model, accelerator=None, *, trainable_only: bool = True) -> None:
    """Copy process 0's (trainable) weights to every process: data parallel needs one starting point.

    LoRA init is seeded so the copies normally agree already; this makes it a guarantee.
    """
    if not _distributed(accelerator):
        return
    device = _comm_device(accelerator)
    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        buf = p.data.to(device)
        torch.distributed.broadcast(buf, src=0)
        if buf.data_ptr() != p.data.data_ptr():
            p.data.copy_(buf)


@torch.no_grad()
def all_reduce_gradients(params: Iterable[torch.nn.Parameter], accelerator=None, *, op: str = "sum",
                         bucket_numel: int = 2**24) -> None:
    """Sum (or average, op="mean") the gradients of `params` across processes, in place.

    Call after the step's backward passes and before clipping. A parameter without a gradient on
    this process contributes zeros (and receives the others' sum), so every process ends up with the
    same gradients and takes the same optimizer step. Gradients travel in flat buckets per dtype.
    """
    if op not in ("sum", "mean"):
        raise ValueError(f"all_reduce_gradients: op must be 'sum' or 'mean', got {op!r}")
    if not _distributed(accelerator):
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    device = _comm_device(accelerator)
    world = num_processes(accelerator)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for p in group + [None]:
            if p is not None:
                bucket.append(p)
                size += p.grad.numel()
            if bucket and (p is None or size >= bucket_numel):
                flat = torch.cat([q.grad.reshape(-1).to(device) for q in bucket])
                torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
                if op == "mean":
                    flat /= world
                offset = 0
                for q in bucket:
                    n = q.grad.numel()
                    q.grad.copy_(flat[offset:offset + n].view_as(q.grad))
                    offset += n
                bucket, size = [], 0


def global_sums(*values: float, accelerator=None) -> tuple[float, ...]:
    """Each value summed over processes, in one collective (e.g. the step's sequence and token counts)."""
    if not _distributed(accelerator):
        return tuple(float(v) for v in values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device(accelerator))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return tuple(float(v) for v in t.tolist())


def all_processes(flag: bool, accelerator=None) -> bool:
    """True when `flag` is true on every process (e.g. every process found only flat groups)."""
    (n,) = global_sums(1.0 if flag else 0.0, accelerator=accelerator)
    return n == num_processes(accelerator)


def idle_update(model, optimizer, *, num_iterations: int = 1, max_grad_norm: float | None = None,
                accelerator=None) -> None:
    """A process with no groups this step (DAPO found only flat ones) still joins the collectives of
    `train_on_rollout`: the counts, then per iteration the gradient sum, the clip and the step, so
    its weights stay identical to the others'. Its own contribution is zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    global_sums(0.0, 0.0, accelerator=accelerator)
    for _ in range(num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for p in params:  # a zero contribution, so the optimizer steps every parameter as the others do
            p.grad = torch.zeros_like(p)
        all_reduce_gradients(params, accelerator)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- metrics


def _op_for(key: str, ops: Mapping[str, str] | None) -> str:
    if ops and key in ops:
        return ops[key]
    if key in SUM_KEYS:
        return "sum"
    if key in MAX_KEYS or key.endswith("_max"):
        return "max"
    if key.endswith("_min"):
        return "min"
    return "mean"


def combine_metric_rows(rows: Sequence[Mapping[str, Any]], *, ops: Mapping[str, str] | None = None,
                        weight_key: str | None = WEIGHT_KEY) -> dict[str, Any]:
    """One metrics dict from each process's dict: the reduction rule of `reduce_metrics`, pure.

    sum for counts and for "loss" (each process holds its share of the global loss), max for
    times and *_max, min for *_min, otherwise the mean weighted by each process's `weight_key`
    (its number of groups; equal weights where absent). A key missing or NaN on a process is left
    out for that process; NaN everywhere stays NaN. Non-numeric values come from process 0.
    """
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    out: dict[str, Any] = {}
    weights = [float(r.get(weight_key, 1.0)) if weight_key else 1.0 for r in rows]
    for key in keys:
        present = [(r[key], w) for r, w in zip(rows, weights) if key in r]
        if not all(isinstance(v, (int, float, bool)) and not isinstance(v, str) for v, _ in present):
            out[key] = present[0][0]
            continue
        finite = [(float(v), w) for v, w in present if not math.isnan(float(v))]
        op = _op_for(key, ops)
        if op not in REDUCE_OPS:
            raise ValueError(f"reduce op for {key!r} must be one of {REDUCE_OPS}, got {op!r}")
        if not finite:
            out[key] = math.nan
        elif op == "sum":
            out[key] = sum(v for v, _ in finite)
        elif op == "max":
            out[key] = max(v for v, _ in finite)
        elif op == "min":
            out[key] = min(v for v, _ in finite)
        else:
            total = sum(w for _, w in finite)
            out[key] = (sum(v * w for v, w in finite) / total) if total > 0 else sum(v for v, _ in finite) / len(finite)
        if all(isinstance(v, int) and not isinstance(v, bool) for v, _ in present) and op in ("sum", "max", "min"):
            out[key] = int(out[key]) if not math.isnan(out[key]) else out[key]
    return out


def gather_objects(obj: Any, accelerator=None) -> list[Any]:
    """[obj of process 0, obj of process 1, ...] on every process ([obj] when not launched)."""
    if not _distributed(accelerator):
        return [obj]
    out: list[Any] = [None] * num_processes(accelerator)
    torch.distributed.all_gather_object(out, obj)
    return out


def reduce_metrics(metrics: Mapping[str, Any], accelerator=None, *, ops: Mapping[str, str] | None = None,
                   weight_key: str | None = WEIGHT_KEY) -> dict[str, Any]:
    """The step's metrics over all processes (same dict on every process); see combine_metric_rows.

    Every process must call it once per step (it is a collective)."""
    plain = {k: (v.item() if hasattr(v, "item") and callable(v.item) and getattr(v, "numel", lambda: 1)() == 1 else v)
             for k, v in metrics.items()}
    if not _distributed(accelerator):
        return dict(plain)
    return combine_metric_rows(gather_objects(plain, accelerator), ops=ops, weight_key=weight_key)


class NullLogger:
    """Stands in for MetricsLogger on processes other than 0: keeps the rows, writes nothing."""

    def __init__(self, *args, **kwargs):
        self.rows: list[dict[str, Any]] = []

    def log(self, step: int, **metrics: Any) -> dict[str, Any]:
        row = {"step": int(step), **metrics}
        self.rows.append(row)
        return row
