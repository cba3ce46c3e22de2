"""Hours up front: the wall time of every stage of a plan on the device it is meant for, before anything runs.

`python -m mpi --dry-run` prints it per stage and in total (mpi.dry_run); notebook 00 shows it. The estimate
is tokens per stage (counted on a few sample items of each dataset) times a throughput table whose every
number names its source:

    train_tokens_per_s   teacher-forced tokens per second, forward + backward (VM-CPT, SFT, RL's scoring)
    decode_s             seconds per generated position for a batch of up to `decode_rows` sequences (sampling
                         is memory-bound: more rows cost about the same until the batch is large); more rows
                         cost proportionally more

A stage's time:
    VM-CPT / SFT   train items x epochs x sequence tokens / train_tokens_per_s
    RL             per step: max_completion_length positions x ceil(rows / decode_rows) x decode_s (an untrained
                   group usually has one row that runs to the cap) + scoring tokens (each prompt once, every
                   completion; x 4/3 with the KL reference pass) / train_tokens_per_s; plus the validation
                   samples every eval_every steps
    evaluation     per batch of eval_batch_size prompts: min(eval_max_new_tokens, 2 x the gold response)
                   positions x decode_s (greedy answers stop near the gold length), over the three views
    data           rendered items x the CPU's seconds per item (measured here)

Token counts come from the shipped toy tokenizer (mpi/assets/toy_base), which is within 4% of Qwen2.5's on
ClevrPolicy text (policy N=2 / 4 / 6: 219 / 824 / 3,626 tokens vs Qwen's 215 / 815 / 3,617; CoT 73 / 145 / 237
vs 75 / 150 / 244, measured on 16 items each), plus the image tokens (patch 14, merge 2) and the chat template's
33 tokens (Qwen2.5-VL's template around one image and a query, tests/test_real_qwen_pieces.py). These are
estimates: `benchmarks/gpu_check.py` measures the GPU numbers when a GPU is lent.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEMPLATE_TOKENS = 33  # system turn, role markers, vision markers around one image (Qwen2.5-VL template, measured)
RESPONSE_EXTRA = 8  # <think></think>, \boxed{}, <|im_end|>
# A free Colab session: Colab's FAQ gives at most 12 h; in practice a T4 is often reclaimed after a few hours
# (the "a free Colab session ends after a few hours"). The colab-t4 default plan must fit this.
COLAB_SESSION_HOURS = 4.0


@dataclass(frozen=True)
class Throughput:
    device: str
    model: str  # the model the rates are for; another model scales by its parameter count
    params: float  # that model's parameters
    train_tokens_per_s: float
    decode_s: float
    decode_rows: int
    source: str
    gpus: int = 1  # devices the rates are for together (the paper's 8 x H100, data parallel)


# Every rate and where it comes from. Published numbers (the issue's): Qwen2.5-VL-7B 4-bit GRPO on a T4 ran 142
# steps in 6 h 35 min (~167 s per step, G = 4, 1,024 tokens, with vLLM); a text QLoRA GRPO on a T4 ~94 s per step
# (G = 8, 256 tokens); Qwen2.5-VL-3B LoRA GRPO on an A100 21.6 s per step (G = 2).
THROUGHPUT: dict[str, Throughput] = {
    "t4": Throughput(
        "Tesla T4 (1 GPU)", "Qwen/Qwen2.5-VL-3B-Instruct 4-bit NF4, fp16 compute", 3.75e9,
        train_tokens_per_s=325.0, decode_s=0.31, decode_rows=8,
        source="train: 8 FLOPs per parameter per token (forward, backward, checkpointed recompute) at 15% of the "
               "T4's 65 TFLOPs fp16 peak (bitsandbytes dequantizes every matmul): 9.8e12 / (8 x 3.75e9) = 325 "
               "tokens/s, an assumption until gpu_check measures it; decode: the published text QLoRA GRPO on a "
               "T4, 94 s per step for G = 8 x 256 tokens, less its scoring at the train rate (~15 s), is 0.31 s "
               "per position for 8 rows (HF generate, no vLLM, as here). Cross-check: the published "
               "Qwen2.5-VL-7B 4-bit T4 run (167 s per step, G = 4 x 1,024 tokens) needed vLLM to be that fast"),
    "h100x8": Throughput(
        "8 x H100 80 GB", "Qwen/Qwen2.5-VL-7B-Instruct bf16", 8.29e9,
        train_tokens_per_s=8 * 5200.0, decode_s=0.025, decode_rows=8 * 64,
        source="train: 8 FLOPs per parameter per token at 35% of an H100's 989 TFLOPs bf16 dense peak: 5,200 "
               "tokens/s per GPU, x 8 data parallel (an assumption: MFU of LoRA training with gradient "
               "checkpointing); decode: 25 ms per position for up to 64 rows per GPU, HF generate at ~5x the "
               "bandwidth bound (15.2 GB of bf16 weights / 3.35 TB/s = 4.5 ms). Cross-check: the published "
               "Qwen2.5-VL-3B LoRA GRPO on one A100, 21.6 s per step (G = 2)", gpus=8),
    "cpu:toy-small": Throughput(
        "CPU (2 cores)", "toy-small", 3.54e6,
        train_tokens_per_s=5000.0, decode_s=0.0015, decode_rows=32,
        source="measured: the default toy run on 2 quiet CPU cores with toy base v6 and compact policies (README "
               "'The default run', 2026-12-06, 3 min 05 s): VM-CPT 37 s and CoT SFT 31 s for ~187K and ~152K "
               "tokens with loading and checkpoints = 5,000 tokens/s; PoRo-GRPO 35 s for 30 steps of 4 prompts x "
               "(4 + 4) rows with 4 validations: what its scoring at 5,000 tokens/s leaves is ~1.5 ms per decode "
               "position. Evaluations (12-15 s each: loading and five views) are estimated low. (Toy base v5: "
               "6,900 tokens/s, 1.0 ms; before compact policies: CoT SFT 101 s, 2,500 tokens/s.)"),
    "cpu:toy-tiny": Throughput(
        "CPU (2 cores)", "toy-tiny", 2.88e5,
        train_tokens_per_s=2000.0, decode_s=0.02, decode_rows=16,
        source="measured here (tiny run, 2 loaded CPU cores): CoT SFT 32 items x ~130 tokens in 1.7-2.6 s; "
               "GRPO 2 steps x 4 rows x 16 positions in 0.7 s"),
}
GPU_NAMES = {"T4": "t4", "H100": "h100x8"}  # a CUDA device's name -> its entry (8 x H100 is the paper's target)
DATA_S_PER_ITEM_112PX = 0.0007  # CPU: the toy run's data stage, 1,432 sprite items at 112 px in 0.9 s (README)


@dataclass(frozen=True)
class Rates:
    """A throughput entry for one model on one device: tokens/s, seconds per decode position, rows per decode step."""

    train: float
    decode_s: float
    decode_rows: int

    @classmethod
    def of(cls, entry: Throughput, params: float, gpus: int | None = None) -> "Rates":
        """`entry`'s rates for a model of `params` parameters (scaled by size), on `gpus` of its devices (None:
        all of them, e.g. the 8 of "h100x8")."""
        scale = params / entry.params
        share = 1 if gpus is None else max(1, entry.gpus // max(1, gpus))
        return cls(entry.train_tokens_per_s / scale / share, entry.decode_s * scale, max(1, entry.decode_rows // share))

    def generate(self, rows: int, positions: float) -> float:
        """Seconds to sample `positions` tokens for `rows` sequences."""
        return positions * math.ceil(max(rows, 1) / self.decode_rows) * self.decode_s

    def rl_step(self, *, prompts: int, rows: int, positions: int, free_prompt: float, prefill: float,
                passes: float = 4 / 3) -> float:
        """One RL step: sampling, then scoring each prompt once and every completion (x passes: the update's
        forward + backward and, with beta > 0, the KL reference's forward), and the prompts' prefill."""
        scored = prompts * free_prompt + rows * positions
        return self.generate(rows, positions) + scored * passes / self.train + prefill / (3 * self.train)


@dataclass
class StageTime:
    stage: str
    seconds: float
    tokens: int  # teacher-forced tokens (training) or generated positions x rows (evaluation)
    what: str


@dataclass
class Estimate:
    device: str
    rates: Throughput | None
    scale: float  # this model's parameters / the rates' model's
    stages: list[StageTime]
    notes: list[str]

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def lines(self) -> list[str]:
        if self.rates is None:
            return [f"estimated wall time: no throughput entry for {self.device} (mpi.wall_time.THROUGHPUT)"]
        out = [f"estimated wall time on {self.rates.device} (mpi.wall_time.THROUGHPUT[{self.key!r}]: "
               f"{self.rates.model}{'' if abs(self.scale - 1) < 0.05 else f', scaled x{self.scale:.2f} by parameters'})"]
        for s in self.stages:
            out.append(f"  {s.stage:<48} {fmt_duration(s.seconds):>9}  {s.what}")
        out.append(f"  estimated wall time in total: {fmt_duration(self.total_seconds)}")
        out += [f"  note: {n}" for n in self.notes]
        return out

    key: str = ""


def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# =========================================================================== tokens per item


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from tokenizers import Tokenizer

    from mpi.toy_base import SHIPPED_ROOT

    files = sorted(Path(SHIPPED_ROOT).glob("*/tokenizer.json"))
    if not files:
        raise FileNotFoundError(f"no tokenizer.json under {SHIPPED_ROOT}: the shipped toy base is missing")
    return Tokenizer.from_file(str(files[0]))


def count_tokens(text: str | None) -> int:
    return len(_tokenizer().encode(text or "", add_special_tokens=False).ids) if text else 0


@functools.lru_cache(maxsize=32)
def _item_stats_cached(data_cfg_json: str, dataset: str, image_tokens_per_224: int) -> dict[str, float]:
    import json

    from mpi.data import build_split
    from mpi.data.build import DataConfig

    values = json.loads(data_cfg_json)
    values = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
              for k, v in values.items()}
    cfg = DataConfig(**values)
    ds = build_split(cfg, dataset, "train")
    rows = [ds[i] for i in range(len(ds))]
    n = max(len(rows), 1)

    def mean(f) -> float:
        return sum(f(r) for r in rows) / n

    return {"items": len(rows), "policy": mean(lambda r: count_tokens(r["policy_text"])),
            "query": mean(lambda r: count_tokens(r["query"])), "cot": mean(lambda r: count_tokens(r["cot"])),
            "answer": mean(lambda r: count_tokens(r["answer"])), "images": mean(lambda r: len(r["images"])),
            "policy_images": mean(lambda r: len(r["policy_images"] or []))}


def item_tokens(data_cfg, dataset: str, image_tokens: int, policy_image_tokens: int) -> dict[str, float]:
    """Mean tokens of a training item's parts, from a few items built with `data_cfg`'s settings (4 per policy)."""
    import json

    small = dataclasses.replace(data_cfg, n_train_per_policy=min(data_cfg.n_train_per_policy, 4),
                                n_test=min(data_cfg.n_test, 4), n_val=min(data_cfg.n_val, 4),
                                n_gta_train=min(data_cfg.n_gta_train, 16), n_gta_test=min(data_cfg.n_gta_test, 4))
    s = dict(_item_stats_cached(json.dumps(dataclasses.asdict(small), default=str), dataset, image_tokens))
    free = TEMPLATE_TOKENS + s["images"] * image_tokens + s["query"]
    s["free_prompt"] = free
    s["policy_prompt"] = free + s["policy"] + s["policy_images"] * policy_image_tokens
    s["response"] = s["cot"] + s["answer"] + RESPONSE_EXTRA
    s["direct_response"] = s["answer"] + RESPONSE_EXTRA
    return s


# =========================================================================== the plan


def pick_rates(plan, device_info, processes: int) -> tuple[str, Throughput | None]:
    from mpi.toy import is_toy

    if device_info.type == "cuda":
        key = next((k for name, k in GPU_NAMES.items() if name in (device_info.name or "")), None)
        return key or "", THROUGHPUT.get(key) if key else None
    key = f"cpu:{plan.cfg.model}" if is_toy(plan.cfg.model) else "cpu:toy-small"
    return key, THROUGHPUT.get(key)


def estimate_plan(plan, facts, device_info, stages: list[str], processes: int = 1) -> Estimate:
    """The wall time of each of `stages` (the names `mpi.pipeline.run` gives the stages of `plan`, in its order:
    mpi.dry_run.stage_names; finished ones included, the estimate is for the whole run), on `device_info`'s
    throughput entry."""
    from mpi.methods import RL_STAGES
    from mpi.pipeline import data_config, rl_steps, stage_config

    key, rates = pick_rates(plan, device_info, processes)
    device = f"{device_info.name or device_info.type}"
    if rates is None:
        return Estimate(device, None, 1.0, [], [], key=key)
    cfg, opts = plan.cfg, plan.opts
    scale = facts.total_params() / rates.params
    r = Rates.of(rates, facts.total_params())
    train_rate, gen_seconds = r.train, r.generate

    image_tokens = facts.image_tokens(cfg.image_size)
    stats, sizes = {}, {}
    for k in plan.dataset_keys:
        dcfg = data_config(cfg, k)
        dataset = "gta" if k == "gta" else "clevr"
        from mpi.data import split_item_counts

        sizes[k] = split_item_counts(dcfg, dataset)
        policy_px = dcfg.policy_image_size or max(28, dcfg.image_size // 2)
        stats[k] = item_tokens(dcfg, dataset, image_tokens, facts.image_tokens(policy_px))
    names, stages, notes = list(stages), [], []
    for name in names:
        parts = name.split("/")
        if parts[0] == "data":
            n = sum(sizes[parts[1]].values())
            sec = n * DATA_S_PER_ITEM_112PX * (cfg.image_size / 112) ** 2
            stages.append(StageTime(name, sec, 0, f"{n:,} items rendered (CPU)"))
        elif parts[0] == "toy_base":
            from mpi.pipeline import toy_base_dir

            if (toy_base_dir(plan) / "toy_base.json").exists():
                stages.append(StageTime(name, 0.0, 0, f"shipped or cached at {toy_base_dir(plan)}"))
            else:  # README: `python -m mpi toy-base --rebuild` trains toy-small's in ~50 min on 2 cores
                sec = 50 * 60.0 if cfg.model == "toy-small" else 5 * 60.0
                stages.append(StageTime(name, sec, 0, "not built yet: built once" + (
                    " (~50 min measured, README)" if cfg.model == "toy-small" else " (a few minutes, not measured)")))
        elif parts[0] == "cost":
            s = stats[parts[1]]
            n = min(opts.get("prefill_items", 8), sizes[parts[1]]["test"])
            tokens = int(n * (s["free_prompt"] + s["policy_prompt"]))
            stages.append(StageTime(name, tokens / (3 * train_rate), tokens, f"prefill of {n} items, with and without the policy"))
        elif parts[0] == "train":
            k, chain = parts[1], parts[3].split("+")
            stage, s, n_train = chain[-1], stats[k], sizes[k]["train"]
            if stage in RL_STAGES:
                gcfg = stage_config(plan, stage, plan.seeds[0], k)
                steps = rl_steps(plan, k) if cfg.rl_epochs is not None else gcfg.steps
                prompts, G = gcfg.prompts_per_step, gcfg.num_generations
                rows = prompts * G * (2 if gcfg.policy_rollout else 1)
                T = gcfg.max_completion_length
                scored = prompts * s["free_prompt"] + rows * T
                passes = 1 + (1 / 3 if gcfg.beta > 0 else 0) + (1 / 3 if gcfg.num_iterations > 1 else 0)
                prefill = prompts * (s["free_prompt"] + (s["policy_prompt"] if gcfg.policy_rollout else 0))
                per_step = r.rl_step(prompts=prompts, rows=rows, positions=T, free_prompt=s["free_prompt"],
                                     prefill=prefill, passes=passes)
                n_val = min(sizes[k]["val"], 10**9)
                evals = (steps // gcfg.eval_every + 1) if gcfg.eval_every else 0
                val = evals * gen_seconds(n_val * gcfg.eval_samples, T)
                sec = steps * per_step + val
                stages.append(StageTime(name, sec, int(steps * scored), f"{steps} steps x {rows} rows x {T} positions "
                                        f"({fmt_duration(per_step)} per step)" + (f" + {evals} validations "
                                        f"({fmt_duration(val)})" if evals else "")))
            else:
                cpt = stage == "cpt"
                epochs = cfg.cpt_epochs if cpt else cfg.sft_epochs
                frac = 1.0 if cpt else cfg.sft_policy_in_context_frac
                response = s["direct_response"] if stage == "direct-sft" else s["response"]
                per_item = s["free_prompt"] + frac * (s["policy_prompt"] - s["free_prompt"]) + response
                tokens = int(n_train * epochs * per_item)
                stages.append(StageTime(name, tokens / train_rate, tokens, f"{n_train:,} items x {epochs:g} epoch(s) x "
                                        f"{per_item:,.0f} tokens"))
        elif parts[0] == "eval":
            k, method = parts[1], parts[3]
            s, n_test = stats[k], sizes[k]["test"]
            limit = opts.get("eval_limit")
            head = n_test if limit is None else min(limit, n_test)
            side_limit = opts.get("eval_side_limit", limit)
            side = n_test if side_limit is None else min(side_limit, n_test)
            # views policy-free, policy in context, override: the headline one (policy in context for the
            # in-context baseline) gets eval_limit items, the others eval_side_limit (mpi.pipeline.evaluate_method)
            ov = min(side, sizes[k]["override"])
            sizes_ = [side, head, ov] if method == "in-context" else [head, side, ov]
            positions = min(opts["eval_max_new_tokens"], 2 * s["response"])
            batch = opts["eval_batch_size"]
            sec, gen = 0.0, 0
            for n in sizes_:
                for start in range(0, n, batch):
                    rows = min(batch, n - start)
                    sec += gen_seconds(rows, positions)
                    gen += int(rows * positions)
            prefill = sizes_[0] * s["free_prompt"] + (sizes_[1] + sizes_[2]) * s["policy_prompt"]
            sec += prefill / (3 * train_rate)
            stages.append(StageTime(name, sec, gen, f"{sum(sizes_)} answers (views {sizes_[0]}/{sizes_[1]}/{sizes_[2]}), "
                                    f"~{positions:.0f} positions per batch of {batch}"))
    if cfg.preset == "colab-t4":
        total_h = sum(s.seconds for s in stages) / 3600
        verdict = "fits" if total_h <= COLAB_SESSION_HOURS else "does NOT fit"
        notes.append(f"{verdict} one free Colab session (~{COLAB_SESSION_HOURS:g} h) by this estimate; a longer run "
                     "continues across sessions from its checkpoints on Drive (USE_DRIVE = True)")
    return Estimate(device, rates, scale, stages, notes, key=key)
