"""What PolicyRollout costs: G own + G policy-guided responses vs plain GRPO with 2G own responses.

Both groups have 2G responses per prompt; PoRo's guided half is generated behind the (long) policy
prompt, and, when `log_behaviour_ratio` is on, scored once more behind it to log the importance
ratio pi(o|q) / pi(o|q,P). Same model, prompts, seed and completion length; one process, one run.
The configurations' steps are interleaved (step k of every configuration, then step k + 1), each from
the same starting weights and the same prompts, and the medians compared, so a change of machine load
during the run hits all of them alike; the load average is printed before and after.

    python benchmarks/bench_poro_cost.py                     # the toy pipeline's step: toy-small, 4 prompts, G=4+4, 112 tokens
    python benchmarks/bench_poro_cost.py --model toy-tiny --steps 3

Peak memory is torch.cuda.max_memory_allocated on CUDA (reset between configurations); on CPU
only the time columns are meaningful (the process's peak RSS never goes down).

Measured (toy-small, CPU, 1 thread, 3 steps, load average 2.5-3.0 on 2 CPUs):
    --sampler hf --no-shared-prompt: GRPO 2G 7.32 s, PoRo G+G 8.55 s (1.17x), with the IS log 13.3 s (2.09x)
    defaults:                        GRPO 2G 5.93 s, PoRo G+G 7.37 s (1.23x), with the IS log 8.62 s (1.51x)
    defaults, inverse-CDF draw [1.8-2.0]: GRPO 2G 3.93 s, PoRo G+G 4.84 s (1.26x), with the IS log 5.36 s (1.36x)
      (PoRo's extra 0.9 s: sampling +0.65 s, 1.68 -> 2.33 s; prefill alone is 0.06 s vs 0.3-0.4 s)
    after prefill buckets + the sampler's log-probs as the behaviour term, 4 steps [0.7-0.8]:
                                     GRPO 2G 2.10 s, PoRo G+G 2.21 s (1.07x), with the IS log 2.24 s (1.09x)
      a later run [0.2-0.7]:         GRPO 2G 2.37 s, PoRo G+G 3.39 s (1.43x), with the IS log 3.25 s (1.37x)
      --bf16 [1.0]:                  GRPO 2G 1.70 s, PoRo G+G 2.18 s (1.25x), with the IS log 2.26 s (1.32x)
Both got faster; PoRo's extra cost is its guided prompts (300 tokens with the policy and its images vs
83): their prefill, and every decode step attending over the longer, left-padded context of all 2G rows.
That is a fixed cost, so the ratio grew as the shared part shrank. The IS log's extra pass over the
policy-free batch is gone at num_iterations=1 (the trained pass's detached log-probs are pi_old); its
behaviour pass behind the policy prompt remains.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-small")
    p.add_argument("--steps", type=int, default=4, help="measured steps per configuration (after one warm-up)")
    p.add_argument("--num-generations", type=int, default=4, help="G: PoRo samples G + G, plain GRPO 2G")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=112)
    p.add_argument("--sampler", default="fast", choices=["fast", "hf"])
    p.add_argument("--no-shared-prompt", action="store_true")
    p.add_argument("--bf16", action="store_true", help="GRPOConfig(bf16_scoring=True): the scoring passes in bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from mpi.data import build_clevr_policy, get_data_config
    from mpi.data.messages import build_messages
    from mpi.modeling import LoraSettings, load_model_and_processor
    from mpi.poro import collect_rollout, get_grpo_config, make_reference, train_on_rollout
    from mpi.engine import PromptSampler, make_optimizer
    from mpi.sampling import encode_prompts, prompt_texts
    from mpi.toy import TOY_SPECS

    size = TOY_SPECS[args.model].image_size if args.model in TOY_SPECS else 224
    items = list(build_clevr_policy(get_data_config("toy", image_size=size), split="train"))
    model, processor = load_model_and_processor(args.model, quantization="auto", lora=LoraSettings(r=8), seed=args.seed)
    device = next(model.parameters()).device
    init = {n: q.detach().clone() for n, q in model.named_parameters() if q.requires_grad}

    def prompt_tokens(with_policy: bool) -> float:
        enc = encode_prompts(processor, *prompt_texts(processor, items[:8], with_policy, build_messages))
        return float(enc["attention_mask"].sum(1).float().mean())

    def reset_weights() -> None:
        with torch.no_grad():
            for n, q in model.named_parameters():
                if n in init:
                    q.copy_(init[n])

    G = args.num_generations
    common = dict(steps=args.steps + 1, prompts_per_step=args.prompts, max_completion_length=args.max_completion_length,
                  seed=args.seed, progress=False, log_every=0, sample_every=0, sampler=args.sampler,
                  shared_prompt_scoring=not args.no_shared_prompt, bf16_scoring=args.bf16)
    configs = {
        f"GRPO 2G={2 * G}": get_grpo_config("grpo", num_generations=2 * G, **common),
        f"PoRo G+G={G}+{G}": get_grpo_config("poro-grpo", num_generations=G, log_behaviour_ratio=False, **common),
        f"PoRo G+G, IS log": get_grpo_config("poro-grpo", num_generations=G, log_behaviour_ratio=True, **common),
    }
    state = {}
    for name, cfg in configs.items():
        reset_weights()
        state[name] = dict(optimizer=make_optimizer(model, cfg), reference=make_reference(model, cfg),
                           sampler=PromptSampler(len(items), cfg.seed), rows=[])
    print(f"PolicyRollout cost | model {args.model} on {device.type} | {args.prompts} prompts/step | "
          f"max_completion_length {args.max_completion_length} | sampler {args.sampler} | shared-prompt scoring "
          f"{not args.no_shared_prompt} | bf16 {args.bf16} | prompt tokens: policy-free {prompt_tokens(False):.0f}, with policy "
          f"{prompt_tokens(True):.0f} | {args.steps} steps after 1 warm-up, interleaved")
    load_before = os.getloadavg()
    peaks = {name: 0.0 for name in configs}
    for step in range(args.steps + 1):
        for name, cfg in configs.items():
            st = state[name]
            reset_weights()  # every configuration's step k starts from the same weights, on the same prompts
            torch.manual_seed(args.seed * 1000 + step)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0, c0 = time.perf_counter(), time.process_time()
            ro, _ = collect_rollout(model, processor, items, st["sampler"], cfg, build_messages, None)
            train_on_rollout(model, st["optimizer"], processor, ro, cfg, build_messages, st["reference"])
            row = dict(step_time=time.perf_counter() - t0, step_cpu_s=time.process_time() - c0,
                       gen_seconds=ro.gen_seconds, gen_tokens=float(ro.eos_mask.sum()))
            if step > 0:
                st["rows"].append(row)
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**20)
    load_after = os.getloadavg()
    print("load average (1, 5, 15 min) before " + ", ".join(f"{x:.2f}" for x in load_before)
          + " | after " + ", ".join(f"{x:.2f}" for x in load_after) + f" | {os.cpu_count()} CPUs")
    print(f"{'config':<20} {'step s':>8} {'CPU s':>8} {'generate s':>11} {'gen tok':>8} {'peak MB':>9}")
    base = None
    medians = {}
    for name in configs:
        rows = state[name]["rows"]
        med = {k: statistics.median(r[k] for r in rows) for k in ("step_time", "step_cpu_s", "gen_seconds", "gen_tokens")}
        medians[name] = med
        peak = peaks[name] if device.type == "cuda" else float("nan")
        base = base or med["step_time"]
        print(f"{name:<20} {med['step_time']:>8.3f} {med['step_cpu_s']:>8.3f} {med['gen_seconds']:>11.3f} "
              f"{med['gen_tokens']:>8.0f} {peak:>9.1f}   x{med['step_time'] / base:.2f} of GRPO 2G")
    names = list(configs)
    # per-step ratios (same prompts, same weights) are steadier than a ratio of medians on a loaded machine
    paired = [a["step_time"] / b["step_time"] for a, b in zip(state[names[1]]["rows"], state[names[0]]["rows"])]
    paired_is = [a["step_time"] / b["step_time"] for a, b in zip(state[names[2]]["rows"], state[names[0]]["rows"])]
    print(f"PoRo G+G / GRPO 2G = {statistics.median(paired):.2f}x (median of per-step ratios; "
          f"with the IS log {statistics.median(paired_is):.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
