"""Stage 3: PolicyRollout GRPO / DAPO, from scratch in PyTorch.

One training step, in the order the code runs it:

1. rollout   for each prompt, G responses from pi_old(.|q,I) ("own") and, with PolicyRollout on, G more
             from pi_old(.|q,I,P) ("guided"), all in ONE batched sampling loop (`mpi.sampling.sample`:
             each prompt and its images prefilled once, its KV cache copied to its G rows, and each
             drawn token's log-prob kept: pi_old(o|q,P) for the guided rows; or `model.generate` with
             sampler="hf"; the same distribution).
2. rewards   accuracy (+ format) for all 2G; DAPO's dynamic sampling drops groups whose rewards are all
             equal and samples more prompts (at most `max_resample_tries` times).
3. advantages over the pooled 2G group (`mpi.grpo.group_advantages`).
4. log-probs of every response on the policy-FREE prompt: new (with grad), old (cached when
             num_iterations > 1), reference (same model, adapters off) for the KL term. A group's
             2G rows share that prompt: it runs once per group and its KV cache serves the rows
             (`shared_prompt_scoring`).
5. loss      clipped surrogate + beta * k3 KL, aggregated as grpo / dapo / dr_grpo; the guided half
             follows `offpolicy_rule` (the paper's "as_own", truncated IS "tis", or LUFFY "shaping").
6. update, metrics (split by origin), sample table every K steps, checkpoint every K steps.

Every pass (sampling and all scoring) runs without dropout (`disable_dropout`), so at num_iterations=1 the
ratio is exactly 1; on fp16 compute the update goes through `mpi.engine.DynamicLossScaler` (fp16/* metrics).
Controls of the guided half: `guided_context="wrong_policy"` (another policy's text in context) and
`adaptive_guidance` (guided samples only for groups whose own half is all wrong). `eval_items=` adds
validation metrics (val/sampled_accuracy, val/pass@k, val/greedy_accuracy) every `eval_every` steps.

    cfg = get_grpo_config("poro-grpo", steps=30)        # or pipeline.stage_config(plan, "poro-grpo", seed)
    result = train_poro(model, processor, dataset, cfg, "runs/poro")

What is not PolicyRollout lives a floor down: prompts and sampling in `mpi.sampling`, the teacher-forced
log-probs in `mpi.logprobs`, precision, the schedule, checkpoints and the best checkpoint in `mpi.engine`,
the per-origin metric rows and sample tables in `mpi.metrics`, data parallel in `mpi.distributed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mpi import distributed as dist
from mpi import engine
from mpi.device import seed_everything
from mpi.grpo import (LOSS_TYPES, OFFPOLICY_RULES, STD_KINDS, TRUNCATION_RULES, aggregate_loss, clipped_surrogate,
                      completion_mask, group_advantages, k3_kl, mask_truncated, offpolicy_token_weights,
                      overlong_penalty, shaped_offpolicy_loss, zero_std_groups)
from mpi.logprobs import ScoringBatch, build_scoring_batch, encode_images_once, forward_log_probs, row_chunks
from mpi.metrics import behaviour_ratio_metrics, format_row, origin_metrics, progress_every, write_sample_table
from mpi.rewards import RewardWeights, combined_rewards
from mpi.sampling import SAMPLERS, generate_from_prompts, prompt_texts


# =========================================================================== config

KL_REFERENCES = ("start", "no_adapter")
GUIDED_CONTEXTS = ("own_policy", "wrong_policy")


@dataclass
class GRPOConfig:
    """Every knob of stage 3. Names follow TRL's GRPOConfig where one exists."""

    # --- sampling
    num_generations: int = 4  # G responses per origin; PolicyRollout doubles the group to 2G
    policy_rollout: bool = True  # False = plain GRPO / DAPO (G policy-free responses only)
    prompts_per_step: int = 2  # groups per optimizer step
    max_completion_length: int = 48
    temperature: float = 1.0  # the log-probs of the loss use the same temperature
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    # "fast": `mpi.sampling.sample`, a hand-written loop (one prefill per prompt, LoRA folded in, no per-token
    # generate machinery) with generate's distribution; "hf": `model.generate`. "fast" falls back to "hf" on
    # a model outside the Qwen2-VL family.
    sampler: str = "fast"
    # --- objective
    beta: float = 0.01  # KL weight (k3 estimator against the reference); 0 = no reference pass
    # The KL reference. "start": the policy as RL found it (the paper's pi_ref = the SFT model), a copy of the
    # trainable weights swapped in for the reference pass. "no_adapter": the model with its LoRA switched off
    # (no copy), the same thing only when RL starts from a fresh adapter; continuing an SFT adapter it would
    # pull RL back towards the pre-SFT base.
    kl_reference: str = "start"
    epsilon: float = 0.2  # epsilon_low of the clip
    epsilon_high: float = 0.3  # DAPO's clip-higher; equal to epsilon = PPO's symmetric clip
    loss_type: str = "grpo"  # grpo (per-sequence mean) | dapo (token mean) | dr_grpo (constant L_max)
    scale_rewards: bool = True  # divide advantages by the group std
    advantage_std: str = "sample"  # "sample" (n-1, as TRL) or "population" (n)
    advantage_eps: float = 1e-4
    num_iterations: int = 1  # updates per batch (old log-probs cached); 1 = strictly on-policy
    dynamic_sampling: bool = False  # DAPO: drop groups with all-equal rewards and refill
    max_resample_tries: int = 20
    truncated_completions: str = "keep"  # keep | mask (no loss) | penalize (DAPO overlong penalty)
    # --- PolicyRollout: how the guided half (sampled WITH the policy, trained WITHOUT it) is weighted
    offpolicy_rule: str = "as_own"  # as_own (paper) | tis (truncated IS weight) | shaping (LUFFY)
    tis_cap: float = 2.0
    log_behaviour_ratio: bool = True  # log the IS ratio pi_old(o|q) / pi_old(o|q,P) (the sampler's log-probs)
    # --- controls of the guided half (is a gain internalization, or just extra samples / extra context?)
    # "own_policy" (the paper): the item's own policy in context. "wrong_policy": another policy's text and
    # images (the next policy name, in sorted order, found in the training set), same query and images;
    # if that helps as much, the gain is not the policy being internalized.
    guided_context: str = "own_policy"
    # Guided samples only for groups whose G own samples all have accuracy 0 (nothing to learn from them
    # alone); every other group gets G MORE own samples instead, so all groups keep 2G rows (one advantage
    # normaliser, one sample budget). Costs a second `generate` per step.
    adaptive_guidance: bool = False
    # --- dropout: the sampler is the eval-mode network, so every scoring pass (old, reference, behaviour and
    # the trained pass) must be too, or pi/pi_old drifts from 1 with no update made (LoRA dropout 0.05 gives
    # ratios up to 1.25 at num_iterations=1). Only dropout modules are switched: gradient checkpointing stays.
    disable_dropout: bool = True
    # --- rewards
    accuracy_weight: float = 0.9
    format_weight: float = 0.1
    # --- optimisation
    steps: int = 30
    learning_rate: float = 1e-4
    # The schedule (TRL's names): a linear warm-up from 0 over warmup_steps (a fresh Adam's first steps are its
    # largest: its second-moment estimate is still near 0), then "constant" or "cosine" down to
    # min_lr_ratio x learning_rate at the last step. `mpi.engine.learning_rate_at` is the whole rule.
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    max_grad_norm: float = 1.0
    micro_batch_size: int | None = None  # sequences per forward/backward (None = the whole step); lower if OOM
    logprob_chunk_size: int | None = None  # sequences per float32 log-softmax block; lower if OOM
    # Scoring runs each group's policy-free prompt once and shares its KV cache among the group's rows
    # (`mpi.sampling.shared_prompt_logits`); False = the whole prompt + completion per row.
    shared_prompt_scoring: bool = True
    # bfloat16 autocast in the scoring passes (reference, old, behaviour and the trained forward / backward) of
    # a float32 model: on a CPU with AVX512-BF16 or AMX (the toy) their matmuls run 2-4x faster. Weights, Adam
    # and the loss's log-softmax stay float32. Sampling stays float32: there the step is attention over the KV
    # cache, which CPU kernels run slower in bfloat16 (measured 3x). Off by default: float32 and bfloat16 runs
    # give different numbers and the README's are float32; benchmarks/bench_grpo_vs_trl.py measures both. A
    # bfloat16 / float16 model (CUDA) computes in its own dtype anyway.
    bf16_scoring: bool = False
    # Dynamic loss scaling for fp16 compute (a T4): "auto" = on iff the model computes in float16
    # (`mpi.engine.needs_loss_scaling`), "on" / "off" force it. A step whose gradients overflow is skipped.
    loss_scaling: str = "auto"
    # --- bookkeeping
    seed: int = 0
    sample_every: int = 10  # write a sample table (with the image) every K steps; 0 = never
    save_every: int = 0  # checkpoint every K steps (and always at the end); 0 = end only
    keep_checkpoints: int = 2
    progress: bool = True
    log_every: int | None = None  # one printed line every K steps; None: at most 50 lines; 0: silent
    preset: str = "custom"
    # --- validation on a fixed item list (train_poro's eval_items=): sampled accuracy at the rollout
    # temperature, pass@eval_samples and greedy accuracy, every eval_every steps and at the last step.
    # 0 = only at the last step (and only when eval_items are given).
    eval_every: int = 0
    eval_samples: int = 4
    # Keep the best validation checkpoint: the run ends with the weights whose *smoothed* BEST_METRIC was
    # highest (the step-0 weights included, so RL that only hurts gives back the model it started from).
    # Smoothing: an exponential moving average with weight best_smoothing on the newest evaluation, because a
    # single evaluation on a few dozen items is noisy (one item = 1/len(eval_items)); 1.0 = no smoothing.
    keep_best: bool = False
    best_smoothing: float = 0.5

    @property
    def group_size(self) -> int:
        return self.num_generations * (2 if self.policy_rollout else 1)

    def validate(self) -> "GRPOConfig":
        checks = [
            (self.num_generations >= 1, "num_generations must be >= 1"),
            (self.prompts_per_step >= 1, "prompts_per_step must be >= 1"),
            (self.max_completion_length >= 1, "max_completion_length must be >= 1"),
            (self.temperature > 0, "temperature must be > 0 (sampling and log-probs divide by it)"),
            (self.loss_type in LOSS_TYPES, f"loss_type must be one of {LOSS_TYPES}"),
            (self.advantage_std in STD_KINDS, f"advantage_std must be one of {STD_KINDS}"),
            (self.offpolicy_rule in OFFPOLICY_RULES, f"offpolicy_rule must be one of {OFFPOLICY_RULES}"),
            (self.truncated_completions in TRUNCATION_RULES, f"truncated_completions must be one of {TRUNCATION_RULES}"),
            (self.beta >= 0, "beta must be >= 0"),
            (self.kl_reference in KL_REFERENCES, f"kl_reference must be one of {KL_REFERENCES}"),
            (0 <= self.epsilon < 1 and self.epsilon_high >= 0, "epsilon must be in [0, 1) and epsilon_high >= 0"),
            (self.num_iterations >= 1, "num_iterations must be >= 1"),
            (self.guided_context in GUIDED_CONTEXTS, f"guided_context must be one of {GUIDED_CONTEXTS}"),
            (not self.adaptive_guidance or self.policy_rollout,
             "adaptive_guidance needs policy_rollout=True (it decides per group whether to add guided samples)"),
            (self.loss_scaling in engine.LOSS_SCALING, f"loss_scaling must be one of {engine.LOSS_SCALING}"),
            (self.sampler in SAMPLERS, f"sampler must be one of {SAMPLERS}"),
            (self.eval_every >= 0 and self.eval_samples >= 1, "eval_every must be >= 0 and eval_samples >= 1"),
            (self.lr_scheduler_type in engine.LR_SCHEDULES, f"lr_scheduler_type must be one of {engine.LR_SCHEDULES}"),
            (self.warmup_steps >= 0 and 0 <= self.min_lr_ratio <= 1,
             "warmup_steps must be >= 0 and min_lr_ratio in [0, 1]"),
            (0 < self.best_smoothing <= 1, "best_smoothing must be in (0, 1] (1 = the raw metric)"),
            (self.group_size >= 2 or not self.scale_rewards,
             "a group of 1 has no spread: raise num_generations or turn on policy_rollout"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"GRPOConfig: {message}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


GRPO_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's PoRo-GRPO: eps 0.2/0.3, beta 0.01, per-sequence mean.
    "poro-grpo": dict(policy_rollout=True, epsilon=0.2, epsilon_high=0.3, beta=0.01, loss_type="grpo",
                      dynamic_sampling=False),
    # The paper's PoRo-DAPO: eps 0.2/0.28, no KL, token mean, dynamic sampling (<= 20 tries).
    "poro-dapo": dict(policy_rollout=True, epsilon=0.2, epsilon_high=0.28, beta=0.0, loss_type="dapo",
                      dynamic_sampling=True, max_resample_tries=20),
    # The control: PoRo-GRPO whose guided half reads ANOTHER policy (see GRPOConfig.guided_context).
    "poro-grpo-wrong": dict(policy_rollout=True, epsilon=0.2, epsilon_high=0.3, beta=0.01, loss_type="grpo",
                            dynamic_sampling=False, guided_context="wrong_policy"),
    # Adaptive guidance: PoRo-GRPO whose guided half is drawn only for groups whose own half is all wrong.
    "poro-grpo-adaptive": dict(policy_rollout=True, epsilon=0.2, epsilon_high=0.3, beta=0.01, loss_type="grpo",
                               dynamic_sampling=False, adaptive_guidance=True),
    # The same two without PolicyRollout (the paper's "VM-CPT + SFT + GRPO" ablation).
    "grpo": dict(policy_rollout=False, epsilon=0.2, epsilon_high=0.3, beta=0.01, loss_type="grpo",
                 dynamic_sampling=False),
    "dapo": dict(policy_rollout=False, epsilon=0.2, epsilon_high=0.28, beta=0.0, loss_type="dapo",
                 dynamic_sampling=True, max_resample_tries=20),
}


def get_grpo_config(preset: str = "poro-grpo", **overrides: Any) -> GRPOConfig:
    """A named preset with overrides by field name (unknown names raise, listing the valid ones)."""
    if preset not in GRPO_PRESETS:
        raise ValueError(f"unknown GRPO preset {preset!r}; choose one of {sorted(GRPO_PRESETS)}")
    from mpi.config import check_known_fields

    check_known_fields(GRPOConfig, overrides)
    return GRPOConfig(preset=preset, **{**GRPO_PRESETS[preset], **overrides}).validate()


# =========================================================================== prompts


def default_build_messages():
    try:
        from mpi.data.messages import build_messages
    except ImportError as err:  # pragma: no cover - only before the data module exists
        raise ImportError("mpi.data.messages.build_messages is needed to build prompts; pass build_messages=...") from err
    return build_messages


# =========================================================================== rollout


@dataclass
class Rollout:
    """One step's responses, group after group; in a group the own rows come before the guided rows
    (with adaptive_guidance a group's second half is guided or own, see `adaptive_rollout`)."""

    items: list[dict]  # one per group
    completion_ids: torch.Tensor  # (N, T)
    eos_mask: torch.Tensor  # (N, T) tokens up to and including the first EOS
    truncated: torch.Tensor  # (N,) no EOS within max_completion_length
    guided: torch.Tensor  # (N,) bool: sampled with the policy in context
    texts: list[str]
    rewards: dict[str, torch.Tensor]  # reward (after any overlong penalty), accuracy, format
    gen_seconds: float = 0.0
    # one per group: the item whose policy the guided rows saw (None = `items`; differs for wrong_policy)
    guide_items: list[dict] | None = None
    # (N, T) the sampler's log-prob of each drawn token under the prompt it was drawn from (0 after a row's
    # end), at the sampling temperature; for the guided rows that is pi_old(o|q,P), the IS log's behaviour
    # policy, so no scoring pass behind the policy prompt is needed. None when the sampler gave none (HF).
    sample_log_probs: torch.Tensor | None = None

    @property
    def num_groups(self) -> int:
        return len(self.items)

    def take(self, rows, items: list[dict], guide_items: list[dict] | None = None) -> "Rollout":
        """These rows, in this order, as a Rollout of the groups `items`."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return Rollout(items=list(items), completion_ids=self.completion_ids[rows], eos_mask=self.eos_mask[rows],
                       truncated=self.truncated[rows], guided=self.guided[rows], texts=[self.texts[int(r)] for r in rows],
                       rewards={k: v[rows] for k, v in self.rewards.items()}, gen_seconds=self.gen_seconds,
                       guide_items=guide_items,
                       sample_log_probs=None if self.sample_log_probs is None else self.sample_log_probs[rows])

    def select_groups(self, keep: Sequence[int], group_size: int) -> "Rollout":
        rows = [g * group_size + k for g in keep for k in range(group_size)]
        return self.take(rows, [self.items[g] for g in keep],
                         None if self.guide_items is None else [self.guide_items[g] for g in keep])


def _pad_columns(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


def concat_rollouts(parts: list[Rollout]) -> Rollout:
    width = max(p.completion_ids.shape[1] for p in parts)
    guides = None
    if any(p.guide_items is not None for p in parts):
        guides = [g for p in parts for g in (p.guide_items if p.guide_items is not None else p.items)]
    return Rollout(
        items=[i for p in parts for i in p.items],
        completion_ids=torch.cat([_pad_columns(p.completion_ids, width, 0) for p in parts]),
        eos_mask=torch.cat([_pad_columns(p.eos_mask, width, 0) for p in parts]),
        truncated=torch.cat([p.truncated for p in parts]), guided=torch.cat([p.guided for p in parts]),
        texts=[t for p in parts for t in p.texts],
        rewards={k: torch.cat([p.rewards[k] for p in parts]) for k in parts[0].rewards},
        gen_seconds=sum(p.gen_seconds for p in parts), guide_items=guides,
        sample_log_probs=(None if any(p.sample_log_probs is None for p in parts) else
                          torch.cat([_pad_columns(p.sample_log_probs, width, 0) for p in parts])),
    )


def needs_behaviour_log_probs(cfg: GRPOConfig) -> bool:
    """pi_old(o|q,P) of the guided rows is used: for the IS log or for the truncated-IS weights."""
    return bool(cfg.policy_rollout and (cfg.log_behaviour_ratio or cfg.offpolicy_rule == "tis"))


@torch.no_grad()
def generate_group(model, processor, items: Sequence[dict], cfg: GRPOConfig, build_messages, *,
                   guide_items: Sequence[dict] | None = None) -> dict[str, Any]:
    """The whole step's 2G-per-prompt sampling in one batched sampling loop (`generate_from_prompts`).

    Prompts are laid out [free_1, policy_1, free_2, policy_2, ...] and each is expanded
    num_return_sequences=G times, so group j is rows j*2G ... (j+1)*2G - 1, own first. The fast sampler
    prefills each prompt (and encodes its images) once and copies its KV cache to the G rows. The policy
    prompts are built from `guide_items` when given (the wrong-policy control), else from `items`.
    """
    texts_free, images_free = prompt_texts(processor, items, False, build_messages)
    if cfg.policy_rollout:
        texts_pol, images_pol = prompt_texts(processor, guide_items if guide_items is not None else items, True,
                                             build_messages)
        texts = [t for pair in zip(texts_free, texts_pol) for t in pair]
        images = [i for pair in zip(images_free, images_pol) for i in pair]
    else:
        texts, images = texts_free, images_free
    return generate_from_prompts(model, processor, texts, images, cfg, return_log_probs=needs_behaviour_log_probs(cfg))


def score_completions(processor, items: Sequence[dict], gen: dict[str, Any], guided: torch.Tensor, cfg: GRPOConfig,
                      reward_fn: Callable | None = None, guide_items: list[dict] | None = None) -> Rollout:
    """A Rollout from generated ids: completion masks, decoded texts and rewards (against the item's own
    gold answer, whatever prompt the row was sampled from); rows are len(guided) // len(items) per item."""
    completion_ids = gen["completion_ids"]
    eos_mask, truncated = completion_mask(completion_ids, gen["stops"])
    pad = processor.tokenizer.pad_token_id
    texts = processor.tokenizer.batch_decode(completion_ids.masked_fill(eos_mask == 0, pad), skip_special_tokens=True)
    per_item = completion_ids.shape[0] // max(len(items), 1)
    row_items = [item for item in items for _ in range(per_item)]
    reward_fn = reward_fn or (lambda its, txts: combined_rewards(its, txts, RewardWeights(cfg.accuracy_weight, cfg.format_weight)))
    scores = {k: torch.tensor(v, dtype=torch.float32) for k, v in reward_fn(row_items, texts).items()}
    if cfg.truncated_completions == "penalize":
        scores["reward"] = scores["reward"] + overlong_penalty(eos_mask.sum(1), truncated, cfg.max_completion_length)
    log_probs = gen.get("log_probs")
    return Rollout(items=list(items), completion_ids=completion_ids, eos_mask=eos_mask, truncated=truncated,
                   guided=guided, texts=texts, rewards=scores, gen_seconds=gen["seconds"], guide_items=guide_items,
                   sample_log_probs=None if log_probs is None else log_probs * eos_mask)


def rollout(model, processor, items: Sequence[dict], cfg: GRPOConfig, build_messages,
            reward_fn: Callable | None = None, *, guide_items: Sequence[dict] | None = None) -> Rollout:
    """Sample the groups for `items` and score them (see `generate_group`; `adaptive_rollout` when
    cfg.adaptive_guidance). guide_items: one per item, the item whose policy the guided half sees."""
    items = list(items)
    guides = list(guide_items) if guide_items is not None else None
    if guides is not None and len(guides) != len(items):
        raise ValueError(f"rollout: {len(items)} items but {len(guides)} guide_items; pass one guide per item")
    if cfg.policy_rollout and cfg.adaptive_guidance:
        return adaptive_rollout(model, processor, items, cfg, build_messages, reward_fn, guide_items=guides)
    gen = generate_group(model, processor, items, cfg, build_messages, guide_items=guides)
    G = cfg.num_generations
    guided = torch.tensor(([False] * G + [True] * G) * len(items) if cfg.policy_rollout else [False] * G * len(items))
    return score_completions(processor, items, gen, guided, cfg, reward_fn, guides)


def adaptive_rollout(model, processor, items: list[dict], cfg: GRPOConfig, build_messages,
                     reward_fn: Callable | None = None, *, guide_items: list[dict] | None = None) -> Rollout:
    """Guidance only where it is needed: G own samples per item first; a group whose own samples all have
    accuracy 0 then gets G guided samples (policy in context), every other group G more own samples.
    Every group keeps 2G rows, own first; `guided` marks which second halves were guided."""
    G = cfg.num_generations
    own_cfg = dataclasses.replace(cfg, policy_rollout=False, adaptive_guidance=False)
    want = needs_behaviour_log_probs(cfg)
    first = score_completions(processor, items, generate_from_prompts(
        model, processor, *prompt_texts(processor, items, False, build_messages), own_cfg, return_log_probs=want),
        torch.zeros(G * len(items), dtype=torch.bool), cfg, reward_fn)
    all_wrong = (first.rewards["accuracy"].view(len(items), G) <= 0).all(dim=1)
    guides = guide_items if guide_items is not None else items
    texts, images = [], []
    for item, guide, wrong in zip(items, guides, all_wrong.tolist()):
        t, im = prompt_texts(processor, [guide if wrong else item], wrong, build_messages)
        texts += t
        images += im
    gen = generate_from_prompts(model, processor, texts, images, own_cfg, return_log_probs=want)
    second = score_completions(processor, items, gen, all_wrong.repeat_interleave(G), cfg, reward_fn)
    rows = torch.arange(len(items) * G).view(len(items), G)  # group g: its G first rows, then its G second rows
    order = torch.stack([rows, rows + len(items) * G], 1).flatten()
    return concat_rollouts([first, second]).take(order, items, guide_items)


def wrong_policy_guide(dataset) -> Callable[[dict], dict]:
    """The wrong-policy control: item -> the same item (query, images, gold answer) carrying ANOTHER policy's
    text and images: the next policy name after the item's own, in sorted order, among the policies of
    `dataset`; its text is that of the first item with that name. Deterministic, no RNG."""
    if hasattr(dataset, "column_names"):  # a datasets.Dataset: read one column, decode no images
        names = list(dataset["policy_name"])
    else:
        names = [item.get("policy_name") for item in dataset]
    first_index: dict[str, int] = {}
    for i, name in enumerate(names):
        first_index.setdefault(name, i)
    ordered = sorted(n for n in first_index if n is not None)
    if len(ordered) < 2:
        raise ValueError(f"guided_context='wrong_policy' needs items of at least two policies in the training set "
                         f"(field 'policy_name'); found {ordered}. Use a dataset with several policies or "
                         "guided_context='own_policy'")
    donors: dict[str, dict] = {}

    def guide(item: dict) -> dict:
        name = item.get("policy_name")
        other = ordered[(ordered.index(name) + 1) % len(ordered)] if name in ordered else ordered[0]
        if other not in donors:
            donors[other] = dataset[first_index[other]]
        donor = donors[other]
        return dict(item, policy_name=donor["policy_name"], policy_text=donor["policy_text"],
                    policy_images=list(donor.get("policy_images") or []))

    return guide


# =========================================================================== scoring (log-probs)


def make_reference(model, cfg: GRPOConfig) -> Callable | None:
    """A context manager factory `reference(model)` for the KL reference pass, or None when beta is 0."""
    if cfg.beta <= 0:
        return None
    if cfg.kl_reference == "start":
        return engine.StartReference(model)
    from mpi.modeling import reference_model

    return reference_model


@torch.no_grad()
def score_no_grad(model, batch: ScoringBatch, cfg: GRPOConfig, reference: Callable | bool | None = None) -> torch.Tensor:
    """Log-probs of every row without gradients, under `reference(model)` when given (True: adapters off)."""
    if reference is True:
        from mpi.modeling import reference_model as reference
    outs = []
    with reference(model) if reference else contextlib.nullcontext():
        for rows in row_chunks(batch.num_rows, cfg.micro_batch_size):
            lp, _ = forward_log_probs(model, batch, rows, cfg.temperature, cfg.logprob_chunk_size,
                                      shared_prompt=getattr(cfg, "shared_prompt_scoring", True))
            outs.append(lp.float().cpu())
    return torch.cat(outs)


# =========================================================================== one optimisation step


def policy_free_batch(processor, ro: Rollout, group_size: int, build_messages) -> ScoringBatch:
    """Every response of the step (own AND guided) behind its policy-free prompt."""
    texts, images = prompt_texts(processor, ro.items, False, build_messages)
    index = torch.arange(ro.num_groups).repeat_interleave(group_size)
    return build_scoring_batch(processor, texts, images, ro.completion_ids, ro.eos_mask, index)


def behaviour_batch(processor, ro: Rollout, build_messages) -> ScoringBatch:
    """The guided responses behind the prompt that actually produced them (policy in context)."""
    rows = torch.nonzero(ro.guided).squeeze(1)
    group_size = ro.completion_ids.shape[0] // ro.num_groups
    guides = ro.guide_items if ro.guide_items is not None else ro.items
    row_groups = (rows // group_size).tolist()
    groups = sorted(set(row_groups))  # only groups with guided rows (adaptive_guidance leaves some out)
    texts, images = prompt_texts(processor, [guides[g] for g in groups], True, build_messages)
    index = torch.tensor([groups.index(g) for g in row_groups], dtype=torch.long)
    return build_scoring_batch(processor, texts, images, ro.completion_ids[rows], ro.eos_mask[rows], index)


def train_on_rollout(model, optimizer, processor, ro: Rollout, cfg: GRPOConfig, build_messages,
                     reference: Callable | None = None, *,
                     loss_scaler: engine.DynamicLossScaler | None = None) -> dict[str, float]:
    """Advantages, log-probs, loss and `num_iterations` optimizer updates for one rollout.

    `reference(model)`: the KL reference's context (train_poro passes `make_reference`'s); None with beta > 0
    means the model with its adapters off. `loss_scaler`: a engine.DynamicLossScaler kept across steps (train_poro
    passes `make_loss_scaler`'s; pass one yourself on fp16). With cfg.disable_dropout every pass runs
    without dropout, so at num_iterations=1 the ratio is exactly 1 and the KL to an unchanged reference 0.
    Leaves the model in train mode."""
    model.train()
    with engine.dropout_disabled(model, cfg.disable_dropout), engine.autocast(model, cfg.bf16_scoring):
        return _train_on_rollout(model, optimizer, processor, ro, cfg, build_messages, reference, loss_scaler)


def _train_on_rollout(model, optimizer, processor, ro: Rollout, cfg: GRPOConfig, build_messages,
                      reference: Callable | None, loss_scaler: engine.DynamicLossScaler | None) -> dict[str, float]:
    N = ro.completion_ids.shape[0]
    G2 = N // ro.num_groups
    adv = group_advantages(ro.rewards["reward"], G2, scale_rewards=cfg.scale_rewards, std=cfg.advantage_std,
                           eps=cfg.advantage_eps)
    loss_mask = mask_truncated(ro.eos_mask, ro.truncated) if cfg.truncated_completions == "mask" else ro.eos_mask
    batch = policy_free_batch(processor, ro, G2, build_messages)
    encode_images_once(model, batch)
    guided = ro.guided

    need_behaviour = bool(guided.any()) and (cfg.offpolicy_rule == "tis" or cfg.log_behaviour_ratio)
    # pi_old only for the IS log at num_iterations=1: the trained pass's detached log-probs are pi_old (the same
    # network, no dropout), so collect them there instead of running one more no-grad pass. TIS needs pi_old
    # before the loss, and with dropout on the trained pass is not pi_old: then the separate pass.
    old_from_new = (need_behaviour and cfg.num_iterations == 1 and cfg.offpolicy_rule != "tis"
                    and cfg.disable_dropout)
    old_logp = (score_no_grad(model, batch, cfg) if (cfg.num_iterations > 1 or (need_behaviour and not old_from_new))
                else None)
    if old_from_new:
        old_logp = torch.zeros_like(loss_mask, dtype=torch.float32)
    ref_logp = score_no_grad(model, batch, cfg, reference=reference or True) if cfg.beta > 0 else None
    behaviour = torch.zeros_like(loss_mask, dtype=torch.float32)
    if need_behaviour and ro.sample_log_probs is not None and ro.sample_log_probs.shape == loss_mask.shape:
        # the sampler's own log-probs: the same network (eval mode, LoRA folded in) on the prompt it sampled from
        behaviour[guided] = ro.sample_log_probs[guided].float()
    elif need_behaviour:  # generate gave no log-probs: score the guided rows behind the policy prompt
        bb = behaviour_batch(processor, ro, build_messages)
        encode_images_once(model, bb)
        behaviour[guided] = score_no_grad(model, bb, cfg)

    weights = torch.ones_like(loss_mask, dtype=torch.float32)
    if cfg.offpolicy_rule == "tis" and guided.any():
        weights[guided] = offpolicy_token_weights(old_logp[guided], behaviour[guided], "tis", cfg.tis_cap)

    # each process holds a share of the global loss: divide by the whole step's counts (all processes)
    num_sequences, num_tokens = dist.global_sums(N, float(loss_mask.sum()))
    stats: dict[str, list] = {k: [] for k in ("loss", "grad_norm")}
    token_stats = {k: torch.zeros_like(loss_mask, dtype=torch.float32)
                   for k in ("kl", "entropy", "ratio", "clip_low", "clip_high")}
    params = [p for p in model.parameters() if p.requires_grad]
    # pi_old for the ratio: at num_iterations=1 it IS the current network, so the detached new log-probs
    # (exactly ratio 1, whatever the kernels); the no-grad pass is then only for the behaviour / IS ratio.
    ratio_old = old_logp if cfg.num_iterations > 1 else None
    for iteration in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for rows in row_chunks(N, cfg.micro_batch_size):
            logp, ent = forward_log_probs(model, batch, rows, cfg.temperature, cfg.logprob_chunk_size,
                                          with_entropy=iteration == 0, shared_prompt=cfg.shared_prompt_scoring)
            dev = logp.device
            old = ratio_old[rows].to(dev) if ratio_old is not None else logp.detach()
            a = adv[rows].to(dev)
            per_tok, ratio, c_low, c_high = clipped_surrogate(logp, old, a, cfg.epsilon, cfg.epsilon_high)
            per_tok = per_tok * weights[rows].to(dev)
            g = guided[rows].to(dev)
            if cfg.offpolicy_rule == "shaping" and g.any():
                shaped = shaped_offpolicy_loss(logp, a)
                per_tok = torch.where(g.unsqueeze(1), shaped, per_tok)
            if ref_logp is not None:
                kl = k3_kl(logp, ref_logp[rows].to(dev))
                per_tok = per_tok + cfg.beta * kl
                token_stats["kl"][rows] = kl.detach().float().cpu()
            loss = aggregate_loss(per_tok, loss_mask[rows].to(dev), cfg.loss_type,
                                  max_completion_length=cfg.max_completion_length, num_sequences=num_sequences,
                                  num_tokens=num_tokens)
            (loss_scaler.scale_loss(loss) if loss_scaler is not None else loss).backward()
            total += float(loss.detach())
            if ent is not None:
                token_stats["entropy"][rows] = ent.float().cpu()
            if old_from_new:
                old_logp[rows] = logp.detach().float().cpu()
            token_stats["ratio"][rows] = ratio.detach().float().cpu()
            token_stats["clip_low"][rows] = c_low.float().cpu()
            token_stats["clip_high"][rows] = c_high.float().cpu()
        dist.all_reduce_gradients(params)  # sum the processes' shares (no-op on one process)
        stats["loss"].append(total)
        # the summed gradients are the same on every process, so all of them skip (or step) together
        if loss_scaler is not None and not loss_scaler.unscale_(params):
            optimizer.zero_grad(set_to_none=True)  # an overflow: no update, a smaller scale next time
            loss_scaler.update(found_inf=True)
            continue
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if loss_scaler is not None:
            loss_scaler.update(found_inf=False)
        stats["grad_norm"].append(float(grad_norm))

    metrics = {"loss": float(np.mean(stats["loss"])),
               "grad_norm": float(np.mean(stats["grad_norm"])) if stats["grad_norm"] else math.nan,
               "advantage_abs_mean": float(adv.abs().mean())}
    if loss_scaler is not None:
        metrics.update(loss_scaler.metrics())
    if ro.guided.any() or cfg.adaptive_guidance:
        guided_groups = ro.guided.view(ro.num_groups, G2).any(dim=1)
        metrics["guidance/guided_group_frac"] = float(guided_groups.float().mean())
    metrics.update(origin_metrics(ro, adv, loss_mask, token_stats, G2, cfg))
    if need_behaviour:
        metrics.update(behaviour_ratio_metrics(old_logp, behaviour, ro.eos_mask, guided, cfg.tis_cap))
    return metrics


# =========================================================================== the loop


@dataclass
class TrainResult:
    out_dir: Path
    adapter_dir: Path | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    final_step: int = 0
    best_step: int | None = None  # keep_best: the step whose weights the model ends with (0 = the start)
    best_value: float | None = None  # keep_best: its smoothed validation metric
    resumed_from: int | None = None  # the checkpoint's step when resume=True found one


def collect_rollout(model, processor, dataset, sampler, cfg: GRPOConfig, build_messages,
                    reward_fn, *, guide_for: Callable[[dict], dict] | None = None) -> tuple[Rollout | None, int]:
    """A step's groups; with dynamic sampling, only groups with a reward spread, refilled up to N tries.
    guide_for(item): the item whose policy the guided half sees (e.g. `wrong_policy_guide`); None = its own."""

    def sample(items: list[dict]) -> Rollout:
        guides = [guide_for(item) for item in items] if guide_for is not None else None
        return rollout(model, processor, items, cfg, build_messages, reward_fn, guide_items=guides)

    if not cfg.dynamic_sampling:
        return sample([dataset[i] for i in sampler.next(cfg.prompts_per_step)]), 1
    kept: list[Rollout] = []
    have, tries = 0, 0
    while have < cfg.prompts_per_step and tries < cfg.max_resample_tries:
        tries += 1
        ro = sample([dataset[i] for i in sampler.next(cfg.prompts_per_step - have)])
        flat = zero_std_groups(ro.rewards["reward"], cfg.group_size)
        keep = [g for g in range(ro.num_groups) if not bool(flat[g])]
        if keep:
            kept.append(ro.select_groups(keep, cfg.group_size))
            have += len(keep)
    return (concat_rollouts(kept) if kept else None), tries


# The validation metric keep_best follows: the policy-free accuracy of answers sampled at the rollout temperature,
# the policy RL trains. Every evaluation samples from this seed in a forked RNG, so training is untouched.
BEST_METRIC = "val/sampled_accuracy"
VALIDATION_SEED = 1234
PRINT_KEYS = ("loss", "own/reward_mean", "guided/reward_mean", "own/accuracy", "guided/accuracy", "all/kl",
              "all/completion_length", "step_time", "gen_tokens_per_s")


def train_poro(model, processor, dataset, cfg: GRPOConfig, out_dir: str | Path, *, resume: bool = False,
               build_messages: Callable | None = None, reward_fn: Callable | None = None,
               save_adapter: bool = True, eval_items: Sequence[dict] | None = None) -> TrainResult:
    """PolicyRollout GRPO / DAPO on `dataset` (a sequence of mpi.data items) for cfg.steps steps.

    out_dir gets metrics.csv / metrics.jsonl, samples/, checkpoints/ and adapter/ (the final LoRA).
    resume=True continues from the latest checkpoint in out_dir and ends with exactly the weights an
    uninterrupted run would have. reward_fn(items, texts) -> {"reward": [...], "accuracy": [...], ...}
    replaces the default accuracy + format reward. eval_items: a small fixed validation list, evaluated
    (`validation_metrics`, val/...) before training, every cfg.eval_every steps and at the last step."""
    from tqdm.auto import tqdm

    cfg.validate()
    out_dir, build_messages = Path(out_dir), build_messages or default_build_messages()
    seed_everything(cfg.seed + dist.process_index())  # each process samples differently
    dist.sync_initial_weights(model)
    optimizer = engine.make_optimizer(model, cfg)
    reference = make_reference(model, cfg)  # before a checkpoint loads: "start" copies the weights RL starts from
    scaler = engine.make_loss_scaler(model, cfg)  # float16 compute only
    guide_for = wrong_policy_guide(dataset) if cfg.guided_context == "wrong_policy" and cfg.policy_rollout else None
    best = engine.BestCheckpoint(out_dir, BEST_METRIC, cfg.best_smoothing) if cfg.keep_best else None
    validate = validator(model, processor, eval_items, cfg, best, build_messages, reward_fn)
    sampler = dist.ShardedSampler(engine.PromptSampler(len(dataset), cfg.seed))  # process p: positions p, p+W, ...
    local_cfg = dataclasses.replace(cfg, prompts_per_step=dist.local_count(cfg.prompts_per_step))
    start = engine.resume(out_dir, model, optimizer, sampler, reference, scaler, best) if resume else 0
    logger = engine.metrics_logger(out_dir, start, cfg.to_dict(), "grpo_config.json")
    if validate and start == 0:
        logger.log(0, **validate(0))  # the baseline the validation curve starts from
    main = dist.is_main_process()
    bar = tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, desc=cfg.preset,
               disable=not cfg.progress or not main)
    for step in bar:
        t0, c0 = time.perf_counter(), time.process_time()
        engine.set_learning_rate(optimizer, engine.learning_rate_at(step, cfg.learning_rate, cfg.steps, cfg.warmup_steps,
                                                                    cfg.lr_scheduler_type, cfg.min_lr_ratio))
        ro, tries = collect_rollout(model, processor, dataset, sampler, local_cfg, build_messages, reward_fn,
                                    guide_for=guide_for)
        metrics: dict[str, Any] = {"resample_tries": tries}
        if dist.all_processes(ro is None):
            metrics["skipped"] = 1  # every try gave flat groups: nothing to learn from this step
        elif ro is None:  # this process found only flat groups, others did not: join their update
            engine.idle_update(model, optimizer, cfg.num_iterations, cfg.max_grad_norm, scaler)
            metrics["num_groups"] = 0
        else:
            metrics.update(train_on_rollout(model, optimizer, processor, ro, cfg, build_messages, reference,
                                            loss_scaler=scaler))
            metrics.update(num_groups=ro.num_groups, gen_tokens=int(ro.eos_mask.sum()), gen_seconds=ro.gen_seconds,
                           gen_tokens_per_s=int(ro.eos_mask.sum()) / max(ro.gen_seconds, 1e-9))
            if cfg.sample_every and step % cfg.sample_every == 0 and main:
                write_sample_table(out_dir, step, ro)
        metrics.update(step_time=time.perf_counter() - t0, lr=optimizer.param_groups[0]["lr"],
                       step_cpu_s=time.process_time() - c0)  # CPU seconds of this process: robust to a busy machine
        if validate and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            metrics.update(validate(step))  # after step_time: not part of the step's cost
        row = logger.log(step, **dist.reduce_metrics(metrics))  # one row for all processes
        if cfg.log_every != 0 and step % progress_every(cfg.log_every, cfg.steps) == 0 and main:
            tqdm.write(format_row(row, [k for k in PRINT_KEYS if k in row]))
        bar.set_postfix(reward=f"{row.get('all/reward_mean', float('nan')):.3f}")
        if ((cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps) and main:
            engine.save_checkpoint(out_dir, step, model, optimizer, sampler, cfg.to_dict(), cfg.keep_checkpoints,
                                   reference, loss_scaler=scaler, best=best)
    bar.close()
    best_step = best.restore(model) if best is not None else None
    return TrainResult(out_dir=out_dir, adapter_dir=engine.save_adapter(model, out_dir) if save_adapter else None,
                       rows=logger.rows, final_step=cfg.steps, best_step=best_step,
                       best_value=best.best if best is not None else None, resumed_from=start or None)


def validator(model, processor, items: Sequence[dict] | None, cfg: GRPOConfig, best, build_messages, reward_fn):
    """step -> the validation metrics on `items` (`validation_metrics`, reduced over processes), folded into the
    best checkpoint when keep_best; None without items."""
    if cfg.keep_best and not items:
        raise ValueError("GRPOConfig.keep_best needs eval_items (a validation list) to choose the best step; "
                         "pass eval_items= or set keep_best=False")
    if not items:
        return None
    items = list(items)

    def validate(step: int) -> dict[str, float]:
        val = dist.reduce_metrics(validation_metrics(model, processor, items, cfg, build_messages=build_messages,
                                                     reward_fn=reward_fn))
        return {**val, **best.update(step, val, model)} if best is not None else val

    return validate


# =========================================================================== evaluation on a fixed prompt set


def _with_policy_always(build, item, *, with_policy=False, **kw):
    return build(item, with_policy=True, **kw)


@torch.no_grad()
def mean_reward(model, processor, items: Sequence[dict], cfg: GRPOConfig, *, samples: int = 4, seed: int = 1234,
                build_messages: Callable | None = None, reward_fn: Callable | None = None,
                with_policy: bool = False) -> dict[str, float]:
    """Mean reward / accuracy / format of `samples` sampled responses per item, policy-free by default.

    Seeded inside a forked RNG, so calling it mid-training changes nothing about the training run.
    """
    build = build_messages or default_build_messages()
    ecfg = dataclasses.replace(cfg, num_generations=samples, policy_rollout=False)
    if with_policy:  # the in-context view: rollout's "policy-free" prompt gets the policy
        build = functools.partial(_with_policy_always, build)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        ro = rollout(model, processor, list(items), ecfg, build, reward_fn)
    return {k: float(v.mean()) for k, v in ro.rewards.items()}


@torch.no_grad()
def validation_metrics(model, processor, items: Sequence[dict], cfg: GRPOConfig, *, samples: int | None = None,
                       seed: int | None = None, build_messages: Callable | None = None,
                       reward_fn: Callable | None = None) -> dict[str, float]:
    """Policy-free accuracy on a fixed item list, in a forked RNG (training is unaffected):

    val/sampled_accuracy  mean accuracy of `samples` answers per item at the rollout temperature
    val/pass@k            mean over items of the best of those k = samples answers (for 0/1 accuracy:
                          the share of items with at least one right answer)
    val/greedy_accuracy   one greedy (argmax) answer per item
    and the matching val/sampled_reward, val/greedy_reward."""
    items = list(items)
    if not items:
        raise ValueError("validation_metrics: no items; pass a non-empty eval_items list")
    build = build_messages or default_build_messages()
    k = samples or cfg.eval_samples
    ecfg = dataclasses.replace(cfg, num_generations=k, policy_rollout=False, adaptive_guidance=False)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(VALIDATION_SEED if seed is None else seed)
        sampled = rollout(model, processor, items, ecfg, build, reward_fn)
        texts, images = prompt_texts(processor, items, False, build)
        gen = generate_from_prompts(model, processor, texts, images, ecfg, num_return_sequences=1, greedy=True)
        greedy = score_completions(processor, items, gen, torch.zeros(len(items), dtype=torch.bool), ecfg, reward_fn)
    acc = sampled.rewards["accuracy"].view(len(items), k)
    return {"val/sampled_accuracy": float(acc.mean()), f"val/pass@{k}": float(acc.max(dim=1).values.mean()),
            "val/greedy_accuracy": float(greedy.rewards["accuracy"].mean()),
            "val/sampled_reward": float(sampled.rewards["reward"].mean()),
            "val/greedy_reward": float(greedy.rewards["reward"].mean())}


