"""Training throughput of both supervised stages on a toy model: tokens per second, 4-bit and not,
and the LM head on supervised positions only (`sparse_logits`) against the full head.

    python benchmarks/bench_supervised.py                      # toy-small, 6 steps per setting
    python benchmarks/bench_supervised.py --model toy-tiny --steps 4 --threads 1

Each setting is a real `train_supervised` run (collation, forward, backward, optimizer, logging) on
ClevrPolicy-T items; throughput is the median over the logged steps after the first (warm-up).
"tokens" are all non-padding input tokens (image tokens included); "sup" are those carrying loss.
Numbers are printed, never asserted: they depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_one(model_name, dataset, stage, quantization, sparse, steps, batch_size, seed=0):
    from mpi.metrics import read_metrics
    from mpi.modeling import LoraSettings, load_model_and_processor
    from mpi.supervised import SupervisedConfig, train_supervised

    model, processor = load_model_and_processor(model_name, quantization=quantization, lora=LoraSettings(r=8), seed=seed)
    cfg = SupervisedConfig(mode=stage, max_steps=steps, batch_size=batch_size, learning_rate=1e-3, save_every=10_000,
                           max_length=4096, progress=False, sparse_logits=sparse, seed=seed)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = train_supervised(model, processor, dataset, cfg, out)
        wall = time.perf_counter() - start
        rows = read_metrics(out)[1:]  # drop the warm-up step
    speeds = [r["tokens_per_s"] for r in rows]
    return {"tokens_per_s": statistics.median(speeds), "sup_per_step": statistics.mean(r["supervised_tokens"] for r in rows),
            "loss": result["final_loss"], "wall_s": wall}


def micro_sparse_vs_full(model_name, dataset, stage, batch_size, reps=8):
    """Forward + backward on one fixed batch, sparse and full LM head interleaved (so load drifts hit both)."""
    from mpi.collate import SupervisedCollator
    from mpi.modeling import LoraSettings, load_model_and_processor
    from mpi.supervised import supervised_loss

    model, processor = load_model_and_processor(model_name, quantization=None, lora=LoraSettings(r=8), seed=0)
    batch = SupervisedCollator(processor, stage)([dataset[i] for i in range(batch_size)])
    labels = batch.pop("labels")
    batch = {k: v.to(model.device) for k, v in batch.items()}
    labels = labels.to(model.device)
    times = {True: [], False: []}
    for rep in range(reps + 1):
        for sparse in (True, False) if rep % 2 else (False, True):
            start = time.perf_counter()
            loss, n = supervised_loss(model, batch, labels, sparse=sparse)
            (loss / n).backward()
            model.zero_grad(set_to_none=True)
            if rep:  # rep 0 is warm-up
                times[sparse].append(time.perf_counter() - start)
    return statistics.median(times[False]) / statistics.median(times[True])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-small")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--stages", default="cpt,cot-sft")
    parser.add_argument("--quantization", default="none,4bit")
    parser.add_argument("--sparse", default="on,off")
    args = parser.parse_args(argv)

    import torch

    from mpi.data import build_clevr_policy, get_data_config
    from mpi.device import get_device
    from mpi.modeling import bitsandbytes_can_4bit
    from mpi.toy import TOY_SPECS

    if args.threads:
        torch.set_num_threads(args.threads)
    size = TOY_SPECS[args.model].image_size if args.model in TOY_SPECS else 224
    dataset = build_clevr_policy(get_data_config("toy", image_size=size, n_train_per_policy=32), "train")
    device = get_device()
    print(f"model {args.model} | device {device} | torch threads {torch.get_num_threads()} | "
          f"batch {args.batch_size} | {args.steps} steps per setting | {len(dataset)} ClevrPolicy-T items")
    print(f"{'stage':10s} {'weights':8s} {'lm head':9s} {'tokens/s':>9s} {'sup/step':>9s} {'loss':>7s} {'wall s':>7s}")
    results = {}
    for stage in args.stages.split(","):
        for quant in args.quantization.split(","):
            quantization = None if quant == "none" else quant
            if quantization == "4bit" and not bitsandbytes_can_4bit(device.type):
                print(f"{stage:10s} {'4bit':8s} skipped: bitsandbytes cannot run 4-bit on {device.type}")
                continue
            for sparse in args.sparse.split(","):
                r = run_one(args.model, dataset, stage, quantization, sparse == "on", args.steps, args.batch_size)
                results[(stage, quant, sparse)] = r
                print(f"{stage:10s} {quant:8s} {('sparse' if sparse == 'on' else 'full'):9s} {r['tokens_per_s']:9.0f} "
                      f"{r['sup_per_step']:9.0f} {r['loss']:7.3f} {r['wall_s']:7.1f}", flush=True)
    print("\nsparse / full LM head throughput (same run of this script):")
    for (stage, quant, sparse), r in results.items():
        full = results.get((stage, quant, "off"))
        if sparse == "on" and full:
            print(f"  {stage:10s} {quant:5s} x{r['tokens_per_s'] / full['tokens_per_s']:.2f}")
    print("\nforward+backward on one fixed batch, full / sparse LM head time (interleaved, median of 8):")
    for stage in args.stages.split(","):
        print(f"  {stage:10s} x{micro_sparse_vs_full(args.model, dataset, stage, args.batch_size):.2f} faster with the sparse head")
    print("\n4-bit / bf16-or-fp32 throughput:")
    for (stage, quant, sparse), r in results.items():
        base = results.get((stage, "none", sparse))
        if quant != "none" and base:
            print(f"  {stage:10s} {sparse:3s} x{r['tokens_per_s'] / base['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
