"""Step time and peak memory: our GRPO loop (mpi.poro, PolicyRollout off) vs TRL's GRPOTrainer.

Same toy VLM, same prompts (ClevrPolicy toy split, policy-free), same group size G, prompts per step,
completion length, beta, LoRA rank, learning rate and temperature; each implementation runs in its
own child process (so peak memory is not shared) and the parent prints both and the ratio.
The two children run in lockstep: the parent lets one step of ours run, then one of TRL's, and so on
(the other child waits, idle), so a machine whose load changes during the run slows both alike; the
load average is printed before and after.

    python benchmarks/bench_grpo_vs_trl.py                      # the toy pipeline's step: toy-small, 4 x G=8, 112 tokens
    python benchmarks/bench_grpo_vs_trl.py --model toy-tiny --steps 4 --prompts 2 --num-generations 4

Where the time of our step goes (cProfile of one step at the defaults: toy-small on CPU, 1 thread, a
shared 2-core machine, so absolute times are inflated and noisy; `rollout` + `train_on_rollout`):
    before (HF generate, whole prompt + completion per scored row), load average 4.7: 8.2 s =
      sampling 3.5 s: prefill 0.4 s (every one of the 32 rows prefilled its prompt and images again),
        112 decode steps 3.1 s (~28 ms each: 28 LoRA wrappers per step, each base + A + B matmul and
        Python, 3192 calls, ~1/3 of it; torch.cat growing the KV cache 0.3 s; multinomial 0.25 s)
      training 4.7 s: reference forward 1.0 s, trained forward 1.7 s, backward 1.8 s, log-softmax and
        entropy 0.3 s; image encoding ~0.01 s (once per prompt already); Python around it < 0.1 s.
      Every scored row ran its group's 83-token policy-free prompt again with its 112 completion tokens.
    after (`mpi.sampling`), load average 2.7: 3.8 s =
      sampling 1.9 s: one prefill per prompt, its KV cache copied to the G rows; LoRA folded into a
        temporary copy of the weights (one matmul per projection); a preallocated KV cache (no cat);
        one decoder forward per token; attention 0.44 s, linear 1.1 s in all (now compute-bound);
        torch.multinomial (0.22 s) since replaced by an inverse-CDF draw (0.01 s, same distribution).
      training 2.0 s: each prompt runs once per pass and its KV cache serves the group's rows
        (4 x 83 + 32 x 112 tokens per pass instead of 32 x 195): reference 0.46 s, trained forward
        0.5 s, backward 0.69 s.
Measured with this script (lockstep, 1 thread, load average of the 2 CPUs in brackets):
    --steps 3 --sampler hf --no-shared-prompt (old path): ours 8.63 s, TRL 12.97 s -> 1.50x wall, 1.47x CPU [2.8-3.2]
    --steps 3:                                            ours 3.59 s, TRL  8.94 s -> 2.49x wall, 2.07x CPU [2.8-3.3]
    defaults (5 steps):                                   ours 4.02 s, TRL  7.85 s -> 1.95x wall, 1.93x CPU [2.1-2.3]
    defaults, with the inverse-CDF draw:                  ours 4.03 s, TRL  7.75 s -> 1.93x wall, 1.92x CPU [1.8-2.2]
    Run-to-run spread is large on this machine (TRL's own median moved 7.8 - 13.0 s).
    after prefill buckets, the sampler's log-probs, one log-sum-exp for log-probs + entropy [0.0-0.7]:
                                                          ours 2.29 s, TRL  4.86 s -> 2.12x wall (a second run: 2.94 vs 5.69 s, 1.93x)
    --bf16 (ours: bfloat16 scoring passes, float32 head; TRL: bf16=True): ours 1.92 s, TRL 3.74 s -> 1.95x
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
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step")
    p.add_argument("--max-completion-length", type=int, default=112)
    p.add_argument("--sampler", default="fast", choices=["fast", "hf"], help="ours: mpi.sampling or HF generate")
    p.add_argument("--no-shared-prompt", action="store_true", help="ours: score prompt + completion per row")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 mixed precision in both: ours GRPOConfig(bf16_scoring=True) (the scoring passes), TRL "
                        "TrainingArguments(bf16=True) (needs a CPU with AVX512-BF16 / AMX, or a GPU)")
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads per child (1: on a small shared CPU more threads only spin; 0 = torch's default)")
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


def wait_for_turn() -> float:
    """Lockstep with the parent: say READY, block until it says GO; returns the seconds spent waiting."""
    t0 = time.perf_counter()
    print("READY", flush=True)
    sys.stdin.readline()
    return time.perf_counter() - t0


def run_ours(args) -> dict:
    from mpi import poro
    from mpi.data.messages import build_messages
    from mpi.poro import get_grpo_config, train_poro

    model, processor, items, device = load(args, lora=True)
    cfg = get_grpo_config("grpo", steps=args.warmup + args.steps, num_generations=args.num_generations,
                          prompts_per_step=args.prompts, max_completion_length=args.max_completion_length,
                          beta=args.beta, learning_rate=args.lr, seed=args.seed, progress=False, log_every=0,
                          sample_every=0, log_behaviour_ratio=False, sampler=args.sampler,
                          shared_prompt_scoring=not args.no_shared_prompt, bf16_scoring=args.bf16)
    waits: list[float] = []
    real_collect = poro.collect_rollout

    def collect_in_turn(*a, **k):  # the first thing of a step: the wait is subtracted from step_time below
        waits.append(wait_for_turn())
        return real_collect(*a, **k)

    poro.collect_rollout = collect_in_turn
    with tempfile.TemporaryDirectory() as out:
        result = train_poro(model, processor, items, cfg, out, build_messages=build_messages, save_adapter=False)
    rows = result.rows[args.warmup:]
    waits = waits[args.warmup:]
    return {"step_times": [r["step_time"] - w for r, w in zip(rows, waits)], "cpu_times": [r["step_cpu_s"] for r in rows],
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
            wait_for_turn()
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
        save_strategy="no", use_cpu=not cuda, bf16=args.bf16 or (cuda and torch.cuda.is_bf16_supported()), fp16=False,
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
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = run_ours(args) if args.impl == "ours" else run_trl(args)
    print("RESULT " + json.dumps(out))


class Child:
    """One implementation in its own process, stepping only when told to (see `wait_for_turn`)."""

    def __init__(self, impl: str, argv: list[str]):
        self.impl, self.result, self.log = impl, None, []
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, __file__, *argv, "--impl", impl], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, cwd=ROOT, bufsize=1)

    def wait_ready(self) -> bool:
        """Read until the child is idle (READY: True) or done (RESULT / exit: False)."""
        for line in self.proc.stdout:
            if line.startswith("READY"):
                return True
            if line.startswith("RESULT "):
                self.result = json.loads(line[len("RESULT "):])
                return False
            self.log.append(line)
        return False

    def go(self) -> None:
        self.proc.stdin.write("GO\n")
        self.proc.stdin.flush()

    def finish(self) -> dict:
        self.proc.wait()
        if self.result is None:
            self.stderr.seek(0)
            raise RuntimeError(f"{self.impl} run failed (exit {self.proc.returncode}):\n{''.join(self.log)[-3000:]}\n"
                               f"{self.stderr.read()[-6000:]}")
        return self.result


def run_lockstep(argv: list[str]) -> dict[str, dict]:
    children = [Child(impl, argv) for impl in ("ours", "trl")]
    ready = {c.impl: c.wait_ready() for c in children}  # both loaded (loading overlaps; it is not timed)
    while any(ready.values()):
        for c in children:
            if ready[c.impl]:
                c.go()
                ready[c.impl] = c.wait_ready()  # this child's step is over before the other one starts
    return {c.impl: c.finish() for c in children}


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
          f"LoRA r={args.lora_r} | bf16 {args.bf16} | ours: sampler={args.sampler}, "
          f"shared_prompt_scoring={not args.no_shared_prompt} | "
          f"{args.steps} measured steps after {args.warmup} warm-up, steps interleaved | torch threads {args.threads or 'default'}")
    load_before = os.getloadavg()
    results = run_lockstep(argv)
    load_after = os.getloadavg()
    print("load average (1, 5, 15 min) before " + ", ".join(f"{x:.2f}" for x in load_before)
          + " | after " + ", ".join(f"{x:.2f}" for x in load_after) + f" | {os.cpu_count()} CPUs")
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
