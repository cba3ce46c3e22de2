"""What PolicyRollout costs: G own + G policy-guided responses vs plain GRPO with 2G own responses.

Both groups have 2G responses per prompt; PoRo's guided half is generated behind the (long) policy
prompt, and, when `log_behaviour_ratio` is on, scored once more behind it to log the importance
ratio pi(o|q) / pi(o|q,P). Same model, prompts, seed and completion length; one process, one run.

    python benchmarks/bench_poro_cost.py                     # toy-small
    python benchmarks/bench_poro_cost.py --model toy-tiny --steps 3

Peak memory is torch.cuda.max_memory_allocated on CUDA (reset between configurations); on CPU
only the time columns are meaningful (the process's peak RSS never goes down).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-small")
    p.add_argument("--steps", type=int, default=4, help="measured steps per configuration (after one warm-up)")
    p.add_argument("--num-generations", type=int, default=4, help="G: PoRo samples G + G, plain GRPO 2G")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from mpi.data import build_clevr_policy, get_data_config
    from mpi.data.messages import build_messages
    from mpi.modeling import LoraSettings, load_model_and_processor
    from mpi.poro import encode_prompts, get_grpo_config, prompt_texts, train_poro
    from mpi.toy import TOY_SPECS

    size = TOY_SPECS[args.model].image_size if args.model in TOY_SPECS else 224
    items = list(build_clevr_policy(get_data_config("toy", image_size=size), split="train"))
    model, processor = load_model_and_processor(args.model, quantization="auto", lora=LoraSettings(r=8), seed=args.seed)
    device = next(model.parameters()).device
    init = {n: q.detach().clone() for n, q in model.named_parameters() if q.requires_grad}

    def prompt_tokens(with_policy: bool) -> float:
        enc = encode_prompts(processor, *prompt_texts(processor, items[:8], with_policy, build_messages))
        return float(enc["attention_mask"].sum(1).float().mean())

    G = args.num_generations
    common = dict(steps=args.steps + 1, prompts_per_step=args.prompts, max_completion_length=args.max_completion_length,
                  seed=args.seed, progress=False, print_every=0, sample_every=0)
    configs = {
        f"GRPO 2G={2 * G}": get_grpo_config("grpo", num_generations=2 * G, **common),
        f"PoRo G+G={G}+{G}": get_grpo_config("poro-grpo", num_generations=G, log_behaviour_ratio=False, **common),
        f"PoRo G+G, IS log": get_grpo_config("poro-grpo", num_generations=G, log_behaviour_ratio=True, **common),
    }
    print(f"PolicyRollout cost | model {args.model} on {device.type} | {args.prompts} prompts/step | "
          f"max_completion_length {args.max_completion_length} | prompt tokens: policy-free "
          f"{prompt_tokens(False):.0f}, with policy {prompt_tokens(True):.0f}")
    print(f"{'config':<20} {'step s':>8} {'CPU s':>8} {'generate s':>11} {'gen tok':>8} {'peak MB':>9}")
    base = None
    for name, cfg in configs.items():
        with torch.no_grad():
            for n, q in model.named_parameters():
                if n in init:
                    q.copy_(init[n])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as out:
            rows = train_poro(model, processor, items, cfg, out, build_messages=build_messages, save_adapter=False).rows[1:]
        med = {k: statistics.median(r[k] for r in rows) for k in ("step_time", "step_cpu_s", "gen_seconds", "gen_tokens")}
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        base = base or med["step_time"]
        print(f"{name:<20} {med['step_time']:>8.3f} {med['step_cpu_s']:>8.3f} {med['gen_seconds']:>11.3f} "
              f"{med['gen_tokens']:>8.0f} {peak:>9.1f}   x{med['step_time'] / base:.2f} of GRPO 2G")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
