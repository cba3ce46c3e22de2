"""The memory estimator (mpi.scale.memory) against measured peaks on the toy models.

What is measured, on this machine (CPU, fp32):
  * step peak   = the process's peak resident memory during one step minus its resident memory just
                  before it (Linux VmHWM after resetting it via /proc/self/clear_refs, minus VmRSS).
                  Each case runs in a fresh child process with MALLOC_MMAP_THRESHOLD_=65536, so every
                  tensor above 64 KiB is its own mmap and is returned to the OS when freed: resident
                  memory then follows torch's live allocations instead of glibc's heap high-water mark.
                  This is compared with the estimator's dynamic terms (activations + logits + vision,
                  or kv_cache + prefill + vision for generation).
  * saved       = bytes of the tensors autograd saves for backward (torch.autograd.graph.saved_tensors_hooks,
                  each storage counted once): an independent check of the `activations` term alone.
  * static      = parameter + LoRA AdamW state bytes read off the tensors, against `weights` + `trainable`.
On a CUDA machine the same script reports torch.cuda.max_memory_allocated() deltas instead of RSS.

    python benchmarks/bench_memory.py            # all cases, a table
    python benchmarks/bench_memory.py --json     # the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = [
    # name, model, stage, knobs
    ("sft toy-tiny 8x512", "toy-tiny", "sft", dict(batch_size=8, max_length=512)),
    ("sft toy-small 8x512", "toy-small", "sft", dict(batch_size=8, max_length=512)),
    ("sft toy-small 4x1024 gc", "toy-small", "sft", dict(batch_size=4, max_length=1024, gradient_checkpointing=True)),
    ("rl-gen toy-small 4x2G=16 P=768 T=64", "toy-small", "rl-gen",
     dict(num_generations=8, prompts_per_process=1, policy_prompt_tokens=768, max_completion_length=64)),
    ("rl-score toy-small 16 rows P=400 T=64", "toy-small", "rl-score",
     dict(num_generations=8, prompts_per_process=1, free_prompt_tokens=400, max_completion_length=64)),
]


# --------------------------------------------------------------------------- child: one measurement


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMeter:
    """Peak memory of a block above its start: CUDA allocator stats, else Linux RSS high-water mark."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        import gc

        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.start = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = _status_kib("VmHWM") * 1024 - self.start


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves while fn() runs its forward."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _inputs(processor, model, batch: int, length: int, image_size: int, seed: int = 0):
    """`batch` rows of exactly `length` tokens: a chat prompt with one image, then random text tokens."""
    import torch
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    img = Image.new("RGB", (image_size, image_size), (120, 30, 200))
    enc = processor(text=[prompt] * batch, images=[img] * batch, return_tensors="pt", padding=True)
    P = enc["input_ids"].shape[1]
    if length < P:
        raise ValueError(f"length {length} < prompt length {P}")
    g = torch.Generator().manual_seed(seed)
    special = set(processor.tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(len(processor.tokenizer)) if i not in special])
    extra = pool[torch.randint(len(pool), (batch, length - P), generator=g)]
    out = dict(enc)
    out["input_ids"] = torch.cat([enc["input_ids"], extra], 1)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    if "mm_token_type_ids" in out:
        out["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    labels = out["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    return out, labels


def child(name: str, model_name: str, stage: str, knobs: dict) -> dict:
    import torch

    from mpi.scale import memory
    from mpi.modeling import LoraSettings, load_model_and_processor

    torch.manual_seed(0)
    model, processor = load_model_and_processor(model_name, quantization=None, lora=LoraSettings(r=8), seed=0,
                                                gradient_checkpointing=bool(knobs.get("gradient_checkpointing")))
    device = next(model.parameters()).device
    facts = memory.model_facts(model_name)
    image_size = int(json.loads((Path(model.config._name_or_path) / "toy_spec.json").read_text())["image_size"]) \
        if (Path(str(model.config._name_or_path)) / "toy_spec.json").exists() else 56
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[next(model.parameters()).dtype]
    k = memory.MemoryKnobs(dtype=dtype, lora_r=8, image_size=image_size, **knobs)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    row = {"case": name, "device": str(device)}
    t0 = time.perf_counter()

    if stage == "sft":
        batch, labels = _inputs(processor, model, k.batch_size, k.max_length, image_size)
        batch = {kk: v.to(device) for kk, v in batch.items()}
        labels = labels.to(device)
        model.train()

        def step():
            loss = model(**batch, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up: optimizer states, lazy buffers
        with PeakMeter(device) as meter:
            step()
        if not k.gradient_checkpointing:
            saved, out = _saved_bytes(lambda: model(**batch, labels=labels).loss)
            del out
            row["saved_activations_mib"] = saved / 2**20
        dyn = memory.supervised_parts(facts, k)
    elif stage == "rl-gen":
        G2 = k.num_generations * 2
        prompt, _ = _inputs(processor, model, k.prompts_per_process, k.policy_prompt_tokens, image_size)
        prompt = {kk: v.to(device) for kk, v in prompt.items()}
        model.eval()

        def gen():
            with torch.no_grad():
                model.generate(**prompt, do_sample=True, max_new_tokens=k.max_completion_length,
                               min_new_tokens=k.max_completion_length, num_return_sequences=G2, use_cache=True)

        gen()
        with PeakMeter(device) as meter:
            gen()
        dyn = memory.generation_parts(facts, k)
    else:  # rl-score: poro's own scoring forward + backward on the policy-free prompt
        from mpi import logprobs

        G2 = k.num_generations * 2
        rows = G2 * k.prompts_per_process
        T = k.max_completion_length
        prompt, _ = _inputs(processor, model, 1, k.free_prompt_tokens, image_size)
        ids = prompt["input_ids"]
        completion = torch.randint(10, 200, (rows, T))
        batch = logprobs.ScoringBatch(
            input_ids=torch.cat([ids.repeat(rows, 1), completion], 1), attention_mask=torch.ones(rows, ids.shape[1] + T, dtype=torch.long),
            mm_token_type_ids=(torch.cat([prompt["mm_token_type_ids"].repeat(rows, 1), torch.zeros_like(completion)], 1)
                               if "mm_token_type_ids" in prompt else None),
            completion_ids=completion, prompt_index=torch.zeros(rows, dtype=torch.long),
            prompt_grid=[prompt["image_grid_thw"]], prompt_pixels=[prompt["pixel_values"]])
        logprobs.encode_images_once(model, batch)
        model.train()

        def score():
            logp, _ = logprobs.forward_log_probs(model, batch, torch.arange(rows), 1.0)
            (-logp.mean()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        score()
        with PeakMeter(device) as meter:
            score()
        dyn = memory.scoring_parts(facts, k)
        saved, out = _saved_bytes(lambda: logprobs.forward_log_probs(model, batch, torch.arange(rows), 1.0)[0])
        del out
        row["saved_activations_mib"] = saved / 2**20

    est_static = memory.weights_bytes(facts, k, trainable=True) + memory.trainable_bytes(facts, k)
    static = sum(p.numel() * p.element_size() for p in model.parameters())
    static += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    static += sum(p.numel() * p.element_size() for p in params)  # gradients, alive during the step
    row.update(
        est_dynamic_mib=sum(dyn.values()) / 2**20,
        measured_dynamic_mib=meter.peak / 2**20,
        est_static_mib=est_static / 2**20,
        measured_static_mib=static / 2**20,
    )
    if "activations" in dyn:
        row["est_activations_mib"] = dyn["activations"] / 2**20
    row["est_total_mib"] = row["est_dynamic_mib"] + row["est_static_mib"]
    row["measured_total_mib"] = row["measured_dynamic_mib"] + row["measured_static_mib"]
    row["ratio_total"] = row["est_total_mib"] / row["measured_total_mib"]
    row["child_seconds"] = time.perf_counter() - t0
    return row


# --------------------------------------------------------------------------- parent


def run_case(case) -> dict:
    name, model, stage, knobs = case
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--child", json.dumps([name, model, stage, knobs])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["seconds"] = time.perf_counter() - t0
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--cases", default="", help="substring filter on case names")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    rows = [run_case(c) for c in CASES if args.cases in c[0]]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'case':<40} {'est MiB':>9} {'meas MiB':>9} {'ratio':>6} | {'dyn est':>8} {'dyn meas':>8} | "
          f"{'act est':>8} {'saved':>8}")
    for r in rows:
        print(f"{r['case']:<40} {r['est_total_mib']:9.1f} {r['measured_total_mib']:9.1f} {r['ratio_total']:6.3f} | "
              f"{r['est_dynamic_mib']:8.1f} {r['measured_dynamic_mib']:8.1f} | "
              f"{r.get('est_activations_mib', float('nan')):8.1f} {r.get('saved_activations_mib', float('nan')):8.1f}")
    print("ratio = estimate / measured peak (static tensors + step peak above the pre-step resident memory)")


if __name__ == "__main__":
    main()
