"""Step time and peak memory: our GRPO loop (mpi.poro, PolicyRollout off) vs TRL's GRPOTrainer.

Same toy VLM, same prompts (ClevrPolicy toy split, policy-free), same group size G, prompts per step,
completion length, beta, LoRA rank, learning rate and temperature; each implementation runs in its
own child process (so peak memory is not shared) and the parent prints both and the ratio.

    python benchmarks/bench_grpo_vs_trl.py                      # toy-small, 2 prompts x G=4, 32 tokens
    python benchmarks/bench_grpo_vs_trl.py --model toy-tiny --steps 4

TRL is an optional dependency used only here: `pip install trl==1.16.0`. Without it this script
prints how to install it and exits 0. Peak memory is torch.cuda.max_memory_allocated on CUDA and
the child's peak resident set size (ru_maxrss, whole process) on CPU. The first `--warmup` steps are
excluded from the step times (allocator and kernel warm-up); the median of the rest is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-small")
    p.add_argument("--steps", type=int, default=5, help="measured steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--prompts", type=int, default=2, help="prompts per optimizer step")
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", choices=["ours", "trl"], help=argparse.SUPPRESS)  # child mode
    return p.parse_args(argv)


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def load(args, lora: bool):
    import torch

    from mpi.data import build_clevr_policy, get_data_config
    from mpi.modeling import LoraSettings, load_model_and_processor
    from mpi.toy import TOY_SPECS

    size = TOY_SPECS[args.model].image_size if args.model in TOY_SPECS else 224
    items = list(build_clevr_policy(get_data_config("toy", image_size=size), split="train"))
    model, processor = load_model_and_processor(args.model, quantization="auto",
                                                lora=LoraSettings(r=args.lora_r) if lora else None, seed=args.seed)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return model, processor, items, device


def run_ours(args) -> dict:
    from mpi.data.messages import build_messages
    from mpi.poro import get_grpo_config, train_poro

    model, processor, items, device = load(args, lora=True)
    cfg = get_grpo_config("grpo", steps=args.warmup + args.steps, num_generations=args.num_generations,
                          prompts_per_step=args.prompts, max_completion_length=args.max_completion_length,
                          beta=args.beta, learning_rate=args.lr, seed=args.seed, progress=False, print_every=0,
                          sample_every=0, log_behaviour_ratio=False)
    with tempfile.TemporaryDirectory() as out:
        result = train_poro(model, processor, items, cfg, out, build_messages=build_messages, save_adapter=False)
    rows = result.rows[args.warmup:]
    return {"step_times": [r["step_time"] for r in rows], "cpu_times": [r["step_cpu_s"] for r in rows],
            "gen_tokens": [r.get("gen_tokens", 0) for r in rows],
            "peak_mb": peak_memory_mb(device), "device": device.type}


def run_trl(args) -> dict:
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    from mpi.data.messages import build_messages
    from mpi.modeling import LoraSettings
    from mpi.rewards import RewardWeights, combined_rewards

    model, processor, items, device = load(args, lora=False)

    from datasets import Dataset

    def to_trl(item):
        # TRL's VLM format: conversational prompt with {"type": "image"} placeholders + an "images" column
        messages, images = build_messages(item, with_policy=False)
        return {"prompt": messages, "images": images, "answer": item["answer"], "dataset": item["dataset"],
                "id": item["id"]}

    data = Dataset.from_list([to_trl(it) for it in items])

    def reward(prompts, completions, answer, dataset, id, **kw):  # noqa: A002 - TRL passes columns by name
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        its = [{"answer": a, "dataset": d, "id": i} for a, d, i in zip(answer, dataset, id)]
        return combined_rewards(its, texts, RewardWeights())["reward"]

    times: list[float] = []
    cpu_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)
            cpu_times.append(time.process_time() - self.c0)

    cuda = device.type == "cuda"
    targs = TRLConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.prompts * args.num_generations,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length, beta=args.beta,
        epsilon=0.2, epsilon_high=0.3, loss_type="grpo", scale_rewards="group", num_iterations=1,
        learning_rate=args.lr, max_steps=args.warmup + args.steps, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported(), fp16=False,
        temperature=1.0, top_k=0, top_p=1.0, remove_unused_columns=False, gradient_checkpointing=False,
        disable_dropout=True, seed=args.seed, dataloader_num_workers=0, log_completions=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=targs, train_dataset=data,
                          processing_class=processor, peft_config=LoraSettings(r=args.lora_r).to_peft(),
                          callbacks=[Timer()])
    trainer.train()
    return {"step_times": times[args.warmup:], "cpu_times": cpu_times[args.warmup:], "gen_tokens": [], "peak_mb": peak_memory_mb(device),
            "device": device.type}


def child(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = run_ours(args) if args.impl == "ours" else run_trl(args)
    print("RESULT " + json.dumps(out))


def spawn(impl: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv, "--impl", impl], capture_output=True, text=True,
                          cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{impl} run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.impl:
        child(args)
        return 0
    try:
        import trl
    except ImportError:
        print("SKIP: TRL is not installed (it is an optional dependency used only by this benchmark). "
              "Install it with `pip install trl==1.16.0` and run again.")
        return 0
    print(f"GRPO step: mpi.poro vs TRL {trl.__version__} GRPOTrainer | model {args.model} | {args.prompts} prompts x "
          f"G={args.num_generations} | max_completion_length {args.max_completion_length} | beta {args.beta} | "
          f"LoRA r={args.lora_r} | {args.steps} measured steps after {args.warmup} warm-up")
    results = {}
    for impl in ("ours", "trl"):
        results[impl] = spawn(impl, argv)
    ours, theirs = results["ours"], results["trl"]
    med = {k: statistics.median(v["step_times"]) for k, v in results.items()}
    cpu = {k: statistics.median(v["cpu_times"]) for k, v in results.items()}
    mem_kind = "peak CUDA allocated" if ours["device"] == "cuda" else "peak RSS (whole process)"
    print(f"{'impl':<6} {'median step s':>14} {'median CPU s/step':>18} {mem_kind + ' MB':>30}")
    for name, res in (("ours", ours), ("trl", theirs)):
        print(f"{name:<6} {med[name]:>14.3f} {cpu[name]:>18.3f} {res['peak_mb']:>30.1f}")
    if ours["gen_tokens"]:
        print(f"ours generated {statistics.mean(ours['gen_tokens']):.0f} tokens/step (of at most "
              f"{args.prompts * args.num_generations * args.max_completion_length})")
    print(f"step time ratio TRL / ours = {med['trl'] / med['ours']:.2f}x wall, {cpu['trl'] / cpu['ours']:.2f}x CPU "
          "(> 1: ours is faster)")
    print(f"peak memory ratio TRL / ours = {theirs['peak_mb'] / ours['peak_mb']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
