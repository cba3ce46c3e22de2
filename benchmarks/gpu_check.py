"""First-GPU check: Qwen2.5-VL-3B's real architecture (random weights, no hub) through every stage.

On a CUDA machine without hub access this builds the 3B model of the colab-t4 preset from its config
(tests.qwen_offline.QWEN25_VL_3B: hidden 2048, 36 layers, 16/2 heads, vocab 151,936, a 32-block 1280-wide
vision tower) with random weights, saves it as a model directory with Qwen's real tokenizer, chat template
and image-processor settings (pip-shipped pieces, see tests.qwen_offline), and loads it by path with the
project's own loader in two precisions:

    nf4-fp16   4-bit NF4 (QLoRA) with fp16 compute and a T4's mixed precision (no bf16): the colab-t4 path
    bf16       bf16 weights and compute (an Ampere+ GPU)

In each: one VM-CPT step and one SFT step (mpi.supervised.train_supervised), one PoRo-GRPO step with
G = 4 own + 4 guided and 256-token completions (mpi.poro.train_poro), one evaluation batch
(mpi.evaluate.evaluate_accuracy). Per stage it prints the step time against mpi.wall_time's estimate for the
same shapes on this GPU's throughput entry (the numbers the dry run's `estimated wall time` is made of), the peak
CUDA memory against mpi.scale.memory's estimate, and NaN/inf checks of the loss and of every trainable weight.

    python benchmarks/gpu_check.py                   # both modes; about 5-8 minutes on one GPU
    python benchmarks/gpu_check.py --modes bf16      # one mode
    python benchmarks/gpu_check.py --cpu-smoke       # the same steps on a tiny Qwen2.5-VL on CPU (tests/test_dry_run.py)
    python benchmarks/gpu_check.py --json out.json   # the rows as JSON too

Without CUDA (and without --cpu-smoke) it prints one line and exits 0. Exit 1 when a check fails
(a non-finite loss or weight, or a stage that raised).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
GPU_MODES = ("nf4-fp16", "bf16")
CPU_MODES = ("nf4-fp32", "fp32")  # --cpu-smoke: bitsandbytes runs NF4 on CPU too, so the 4-bit path is exercised


@dataclasses.dataclass
class Shape:
    """The sizes of one check: the real ones on a GPU, tiny ones for --cpu-smoke."""

    image_size: int = 224  # colab-t4's
    num_generations: int = 4  # PoRo: G own + G guided
    max_completion_length: int = 256
    micro_batch_size: int = 4
    eval_items: int = 4
    eval_new_tokens: int = 64
    lora_r: int = 8


GPU_SHAPE = Shape()
CPU_SHAPE = Shape(image_size=56, num_generations=2, max_completion_length=8, micro_batch_size=2, eval_items=2,
                  eval_new_tokens=4, lora_r=4)


# =========================================================================== helpers


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class Meter:
    """Peak memory and wall time of a block: CUDA's allocator peak on a GPU, nothing on CPU."""

    def __init__(self, device: str):
        self.device = device

    @contextlib.contextmanager
    def measure(self, row: dict):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device == "cuda":
                torch.cuda.synchronize()
                row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
            row["seconds"] = time.perf_counter() - t0


@contextlib.contextmanager
def emulate_t4(enabled: bool):
    """Make the project see a GPU without bf16 (a T4, compute capability 7.5): the Trainer then runs fp16
    mixed precision with a GradScaler, exactly as on Colab. Only the capability answers change."""
    if not enabled:
        yield
        return
    import mpi.device as device

    real = device.describe_device

    def describe(dev=None):
        info = real(dev)
        if info.type == "cuda":
            return dataclasses.replace(info, bf16_supported=False, compute_capability=(7, 5))
        return info

    device.describe_device = describe
    try:
        yield
    finally:
        device.describe_device = real


def trainable_finite(model) -> bool:
    import torch

    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def make_items(shape: Shape):
    """ClevrPolicy-T N=2 items from mpi.data at the check's image size (train for the steps, test for eval)."""
    from mpi.data import build_clevr_policy, get_data_config

    cfg = get_data_config("colab", image_size=shape.image_size, n_policies=2, n_train_per_policy=2,
                          n_test=shape.eval_items, depths=(2,))
    train = [dict(r) for r in build_clevr_policy(cfg, "train")]
    test = [dict(r) for r in build_clevr_policy(cfg, "test")]
    return train, test


def estimate(facts, stage: str, dtype: str, quant: str | None, shape: Shape, **knobs):
    from mpi.scale.memory import MemoryKnobs, estimate_peak_memory

    k = MemoryKnobs(dtype=dtype, quantization=quant, lora_r=shape.lora_r, image_size=shape.image_size,
                    gradient_checkpointing=True, num_generations=shape.num_generations,
                    max_completion_length=shape.max_completion_length, micro_batch_size=shape.micro_batch_size,
                    **knobs)
    return estimate_peak_memory(facts, stage, knobs=k).peak_gib


# =========================================================================== one mode


def run_mode(mode: str, model_dir: Path, work: Path, shape: Shape, device: str, log=print) -> list[dict]:
    import torch

    from mpi.data.messages import build_messages
    from mpi.evaluate import evaluate_accuracy
    from mpi.scale.memory import facts_from_config
    from mpi.modeling import LoraSettings, load_model_and_processor
    from mpi.poro import get_grpo_config, train_poro
    from mpi.supervised import SupervisedConfig, train_supervised

    quant = "4bit" if mode.startswith("nf4") else None
    dtype = {"nf4-fp16": torch.float16, "bf16": torch.bfloat16, "nf4-fp32": torch.float32, "fp32": torch.float32}[mode]
    dtype_name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    facts = facts_from_config(json.loads((model_dir / "config.json").read_text()), "qwen2.5-vl-3b-random")
    meter = Meter(device)
    rows: list[dict] = []
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"

    def log_stage(row: dict) -> None:  # every stage row gets its wall-time estimate before it is printed
        row["estimate_s"] = wall_time_estimate(row, device_name, facts, shape)
        log(format_row(row))
    train, test = make_items(shape)

    def stage_row(stage: str) -> dict:
        row = {"mode": mode, "stage": stage, "ok": False}
        rows.append(row)
        return row

    with emulate_t4(mode == "nf4-fp16"):
        row = stage_row("load")
        with meter.measure(row):
            model, processor = load_model_and_processor(
                str(model_dir), quantization=quant, lora=LoraSettings(r=shape.lora_r, alpha=2 * shape.lora_r, dropout=0.05),
                device=device, dtype=dtype, seed=0, gradient_checkpointing=True, trainable=True)
        row["ok"] = trainable_finite(model)
        row["estimate_gib"] = estimate(facts, "sft", dtype_name, quant, shape, batch_size=1, max_length=1)  # ~weights
        log_stage(row)

        for stage, mode_name in (("vm-cpt", "cpt"), ("sft", "cot-sft")):
            row = stage_row(stage)
            try:
                cfg = SupervisedConfig(mode=mode_name, max_steps=1, batch_size=1, grad_accum_steps=1, learning_rate=1e-4,
                                       warmup_ratio=0.0, max_length=4096, progress=False, save_every=100, seed=0,
                                       lora_r=shape.lora_r, quantization=quant)  # the model was loaded with gradient checkpointing
                with meter.measure(row):
                    result = train_supervised(model, processor, train[:1], cfg, work / f"{mode}-{stage}", resume=False)
                model = result["model"]
                row["loss"] = result["final_loss"]
                row["tokens"] = result["check"]["longest_sequence"]
                row["estimate_gib"] = estimate(facts, "cpt" if mode_name == "cpt" else "sft", dtype_name, quant, shape,
                                               batch_size=1, max_length=row["tokens"])
                row["ok"] = math.isfinite(row["loss"]) and trainable_finite(model)
            except Exception as err:  # noqa: BLE001 - report every stage, then fail at the end
                row["error"] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
            log_stage(row)

        row = stage_row("poro-grpo")
        try:
            gcfg = get_grpo_config("poro-grpo", num_generations=shape.num_generations, prompts_per_step=1, steps=1,
                                   max_completion_length=shape.max_completion_length,
                                   micro_batch_size=shape.micro_batch_size, learning_rate=1e-6,
                                   progress=False, log_every=0, sample_every=0, seed=0)
            with meter.measure(row):
                result = train_poro(model, processor, train, gcfg, work / f"{mode}-poro", build_messages=build_messages,
                                    save_adapter=False)
            last = result.rows[-1]
            row["loss"] = last.get("loss", float("nan"))
            row["gen_tokens"] = last.get("gen_tokens")
            row["gen_seconds"] = last.get("gen_seconds")
            free = processor(text=[processor.apply_chat_template(build_messages(train[0], with_policy=False)[0],
                                                                  tokenize=False, add_generation_prompt=True)],
                             images=build_messages(train[0], with_policy=False)[1], return_tensors="pt")
            guided = processor(text=[processor.apply_chat_template(build_messages(train[0], with_policy=True)[0],
                                                                    tokenize=False, add_generation_prompt=True)],
                               images=build_messages(train[0], with_policy=True)[1], return_tensors="pt")
            row["tokens"] = [int(free["input_ids"].shape[1]), int(guided["input_ids"].shape[1])]
            row["estimate_gib"] = estimate(facts, "rl", dtype_name, quant, shape, prompts_per_process=1,
                                           free_prompt_tokens=row["tokens"][0], policy_prompt_tokens=row["tokens"][1],
                                           max_length=row["tokens"][1])
            row["ok"] = all(math.isfinite(v) for k, v in last.items() if isinstance(v, float)) and trainable_finite(model)
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        log_stage(row)

        row = stage_row("eval")
        try:
            with meter.measure(row):
                result = evaluate_accuracy(model, processor, test, batch_size=len(test), max_new_tokens=shape.eval_new_tokens)
            row["n"], row["parsed_rate"] = result["n"], result["parsed_rate"]
            row["ok"] = result["n"] == len(test) and all(isinstance(t, str) for t in result["predictions"])
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        log_stage(row)
    model = processor = result = None  # drop the references (result holds the model too)
    gc.collect()  # the next mode's load starts from an empty GPU
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def wall_time_estimate(row: dict, device_name: str, facts, shape: Shape) -> float | None:
    """mpi.wall_time's seconds for this row's work on one `device_name` GPU (the dry run's arithmetic; the
    first step also pays warm-up, so a measured step above the estimate is expected on the first call)."""
    from mpi.wall_time import GPU_NAMES, THROUGHPUT, Rates

    key = next((k for name, k in GPU_NAMES.items() if name in device_name), "cpu:toy-tiny")
    rates = Rates.of(THROUGHPUT[key], facts.total_params(), gpus=1)  # this check runs on one GPU
    if row["stage"] in ("vm-cpt", "sft") and "tokens" in row:
        return row["tokens"] / rates.train
    if row["stage"] == "poro-grpo" and "tokens" in row:
        free, guided = row["tokens"]
        return rates.rl_step(prompts=1, rows=2 * shape.num_generations, positions=shape.max_completion_length,
                             free_prompt=free, prefill=free + guided)
    if row["stage"] == "eval":
        return rates.generate(shape.eval_items, shape.eval_new_tokens)
    return None


def format_row(row: dict) -> str:
    peak = f"{row['peak_gib']:6.2f}" if "peak_gib" in row else "   n/a"
    est = f"{row['estimate_gib']:6.2f}" if "estimate_gib" in row else "   n/a"
    loss = f"{row['loss']:.3f}" if isinstance(row.get("loss"), float) else "-"
    extra = f" tokens {row['tokens']}" if "tokens" in row else ""
    if row.get("estimate_s") is not None:
        extra += f"  wall-time estimate {row['estimate_s']:.1f}s"
    status = "ok" if row.get("ok") else f"FAILED {row.get('error', '(non-finite loss or weights)')}"
    return (f"{row['mode']:<9} {row['stage']:<10} {row.get('seconds', 0.0):7.1f}s  peak {peak} GiB  "
            f"estimate {est} GiB  loss {loss}{extra}  {status}")


# =========================================================================== entry point


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="the same steps on a tiny Qwen2.5-VL on CPU")
    parser.add_argument("--modes", default=None, help=f"comma-separated from {GPU_MODES} (GPU) / {CPU_MODES} (CPU)")
    parser.add_argument("--work-dir", default=None, help="where the random model is written (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)

    if not args.cpu_smoke and not cuda_available():
        print("gpu_check: no CUDA device on this machine, nothing to check (--cpu-smoke runs the same steps "
              "at tiny size on CPU)")
        return None
    import torch

    from tests.qwen_offline import QWEN25_VL_3B, tiny_architecture, write_qwen_vl_dir

    device = "cpu" if args.cpu_smoke else "cuda"
    shape = CPU_SHAPE if args.cpu_smoke else GPU_SHAPE
    modes = args.modes.split(",") if args.modes else list(CPU_MODES if args.cpu_smoke else GPU_MODES)
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        model_dir = work / "qwen2.5-vl-3b-random"
        t0 = time.perf_counter()
        if args.cpu_smoke:
            write_qwen_vl_dir(model_dir, tiny_architecture(), seed=0)
        elif not (model_dir / "config.json").exists():
            # Random init on the GPU in bf16 takes seconds where 3.75B fp32 parameters on a CPU take minutes.
            with torch.device("cuda"):
                write_qwen_vl_dir(model_dir, QWEN25_VL_3B, seed=0, dtype=torch.bfloat16)
            torch.cuda.empty_cache()
        info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                "build_seconds": time.perf_counter() - t0}
        print(f"gpu_check on {info['device']}: model written in {info['build_seconds']:.1f}s to {model_dir}")
        rows = []
        for mode in modes:
            rows += run_mode(mode, model_dir, work, shape, device)
    info["seconds"] = time.perf_counter() - t_start
    info["rows"] = rows
    timed = [r for r in rows if r.get("estimate_s") and r.get("seconds")]
    for r in timed:  # measured against the dry run's estimate (mpi.wall_time), for README's table
        print(f"wall time {r['mode']:<9} {r['stage']:<10} measured {r['seconds']:7.1f}s  estimated {r['estimate_s']:7.1f}s"
              f"  ratio {r['seconds'] / r['estimate_s']:.2f}")
    failed = [r for r in rows if not r.get("ok")]
    print(f"gpu_check: {len(rows) - len(failed)}/{len(rows)} stages ok in {info['seconds']:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2, default=str))
    info["failed"] = failed
    return info


if __name__ == "__main__":
    result = main()
    raise SystemExit(1 if result is not None and result["failed"] else 0)
