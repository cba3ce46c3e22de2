"""Stage 3: PolicyRollout GRPO / DAPO, from scratch in PyTorch.

One training step, in the order the code runs it:

1. rollout   for each prompt, G responses from pi_old(.|q,I) ("own") and, with PolicyRollout on, G more
             from pi_old(.|q,I,P) ("guided"), all in ONE batched `generate` (KV cache; images encoded
             once per prompt, not once per group member).
2. rewards   accuracy (+ format) for all 2G; DAPO's dynamic sampling drops groups whose rewards are all
             equal and samples more prompts (at most `max_resample_tries` times).
3. advantages over the pooled 2G group (`mpi.grpo.group_advantages`).
4. log-probs of every response on the policy-FREE prompt: new (with grad), old (cached when
             num_iterations > 1), reference (same model, adapters off) for the KL term.
5. loss      clipped surrogate + beta * k3 KL, aggregated as grpo / dapo / dr_grpo; the guided half
             follows `offpolicy_rule` (the paper's "as_own", truncated IS "tis", or LUFFY "shaping").
6. update, metrics (split by origin), sample table every K steps, checkpoint every K steps.

    cfg = get_grpo_config("poro-grpo", steps=30)
    result = train_poro(model, processor, dataset, cfg, "runs/poro")
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import html
import inspect
import io
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from mpi import distributed as dist
from mpi.atomic import atomic_directory, atomic_write_text
from mpi.device import seed_everything
from mpi.grpo import (LOSS_TYPES, OFFPOLICY_RULES, STD_KINDS, TRUNCATION_RULES, aggregate_loss,
                      chunked_log_probs_and_entropy, clipped_surrogate, completion_mask, group_advantages,
                      k3_kl, mask_truncated, masked_mean, offpolicy_token_weights, overlong_penalty,
                      shaped_offpolicy_loss, zero_std_groups)
from mpi.rewards import RewardWeights, combined_rewards

ORIGINS = ("own", "guided")


# =========================================================================== config

KL_REFERENCES = ("start", "no_adapter")


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
    overlong_buffer: int = 0  # soft overlong ramp length for "penalize"
    # --- PolicyRollout: how the guided half (sampled WITH the policy, trained WITHOUT it) is weighted
    offpolicy_rule: str = "as_own"  # as_own (paper) | tis (truncated IS weight) | shaping (LUFFY)
    tis_cap: float = 2.0
    shaping_gamma: float = 0.1
    log_behaviour_ratio: bool = True  # score guided responses under pi_old(.|q,P) to log the IS ratio
    # --- rewards
    accuracy_weight: float = 0.9
    format_weight: float = 0.1
    # --- optimisation
    steps: int = 30
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    max_grad_norm: float = 1.0
    micro_batch_size: int | None = None  # sequences per forward/backward (None = the whole step); lower if OOM
    logprob_chunk_size: int | None = None  # sequences per float32 log-softmax block; lower if OOM
    # --- bookkeeping
    seed: int = 0
    sample_every: int = 10  # write a sample table (with the image) every K steps; 0 = never
    save_every: int = 0  # checkpoint every K steps (and always at the end); 0 = end only
    keep_checkpoints: int = 2
    progress: bool = True
    print_every: int = 1  # one printed line per K steps; 0 = silent
    preset: str = "custom"

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


def grpo_config_from_run(run_cfg, preset: str = "poro-grpo", **overrides: Any) -> GRPOConfig:
    """Map a `mpi.config.RunConfig` (rl_* fields) onto a GRPOConfig preset."""
    base = dict(steps=run_cfg.rl_steps, learning_rate=run_cfg.rl_learning_rate,
                num_generations=run_cfg.num_generations, max_completion_length=run_cfg.max_completion_length,
                prompts_per_step=run_cfg.prompts_per_step, seed=run_cfg.seed,
                micro_batch_size=getattr(run_cfg, "micro_batch_size", None))
    return get_grpo_config(preset, **{**base, **overrides})


# =========================================================================== prompts


def default_build_messages():
    try:
        from mpi.data.messages import build_messages
    except ImportError as err:  # pragma: no cover - only before the data module exists
        raise ImportError("mpi.data.messages.build_messages is needed to build prompts; pass build_messages=...") from err
    return build_messages


def prompt_texts(processor, items: Sequence[dict], with_policy: bool, build_messages) -> tuple[list[str], list[list]]:
    """Chat-templated prompt strings and their images, one per item."""
    texts, images = [], []
    for item in items:
        messages, imgs = build_messages(item, with_policy=with_policy)
        texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        images.append(list(imgs))
    return texts, images


def encode_prompts(processor, texts: list[str], images: list[list]) -> dict[str, torch.Tensor]:
    """Left-padded prompt tensors (the processor expands each image placeholder to its token count)."""
    flat = [img for imgs in images for img in imgs]
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = processor(text=texts, images=flat or None, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    enc = dict(enc)
    enc["num_images"] = torch.tensor([len(imgs) for imgs in images])
    return enc


def vision_token_ids(model) -> list[int]:
    """Vision placeholder ids a completion must never contain: fed back to the model they would be
    read as image slots. Generation suppresses them and the log-probs exclude them the same way, so the
    sampling and the scored distributions stay identical."""
    config = _base_model(model).config
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return sorted({getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)})


def stop_token_ids(model, processor) -> list[int]:
    """EOS ids that end a completion: the tokenizer's EOS plus any in the generation config."""
    ids = {processor.tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return sorted(i for i in ids if i is not None)


# =========================================================================== rollout


@dataclass
class Rollout:
    """One step's responses, group after group; in a group the own rows come before the guided rows."""

    items: list[dict]  # one per group
    completion_ids: torch.Tensor  # (N, T)
    eos_mask: torch.Tensor  # (N, T) tokens up to and including the first EOS
    truncated: torch.Tensor  # (N,) no EOS within max_completion_length
    guided: torch.Tensor  # (N,) bool: sampled with the policy in context
    texts: list[str]
    rewards: dict[str, torch.Tensor]  # reward (after any overlong penalty), accuracy, format
    gen_seconds: float = 0.0

    @property
    def num_groups(self) -> int:
        return len(self.items)

    def select_groups(self, keep: Sequence[int], group_size: int) -> "Rollout":
        rows = torch.tensor([g * group_size + k for g in keep for k in range(group_size)], dtype=torch.long)
        return Rollout(items=[self.items[g] for g in keep], completion_ids=self.completion_ids[rows],
                       eos_mask=self.eos_mask[rows], truncated=self.truncated[rows], guided=self.guided[rows],
                       texts=[self.texts[int(r)] for r in rows],
                       rewards={k: v[rows] for k, v in self.rewards.items()}, gen_seconds=self.gen_seconds)


def concat_rollouts(parts: list[Rollout]) -> Rollout:
    width = max(p.completion_ids.shape[1] for p in parts)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return Rollout(
        items=[i for p in parts for i in p.items],
        completion_ids=torch.cat([pad(p.completion_ids, 0) for p in parts]),
        eos_mask=torch.cat([pad(p.eos_mask, 0) for p in parts]),
        truncated=torch.cat([p.truncated for p in parts]), guided=torch.cat([p.guided for p in parts]),
        texts=[t for p in parts for t in p.texts],
        rewards={k: torch.cat([p.rewards[k] for p in parts]) for k in parts[0].rewards},
        gen_seconds=sum(p.gen_seconds for p in parts),
    )


def sampling_kwargs(model, processor, cfg: GRPOConfig) -> dict[str, Any]:
    """Every sampling knob set explicitly: a checkpoint's generation_config (Qwen2.5-VL-Instruct ships
    top_k=1, temperature 0.1, repetition_penalty 1.05) must not leak in, or the sampler would differ from
    the softmax(z / T) that the loss's log-probs assume."""
    return dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, min_p=None,
                typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=cfg.max_completion_length,
                eos_token_id=stop_token_ids(model, processor), pad_token_id=processor.tokenizer.pad_token_id,
                suppress_tokens=vision_token_ids(model) or None, use_cache=True)


@torch.no_grad()
def generate_group(model, processor, items: Sequence[dict], cfg: GRPOConfig, build_messages) -> dict[str, Any]:
    """The whole step's 2G-per-prompt sampling in one batched `generate`.

    Prompts are laid out [free_1, policy_1, free_2, policy_2, ...] and each is expanded
    num_return_sequences=G times, so group j is rows j*2G ... (j+1)*2G - 1, own first. transformers
    encodes each prompt's images once and expands the features, not the pixels.
    """
    texts_free, images_free = prompt_texts(processor, items, False, build_messages)
    if cfg.policy_rollout:
        texts_pol, images_pol = prompt_texts(processor, items, True, build_messages)
        texts = [t for pair in zip(texts_free, texts_pol) for t in pair]
        images = [i for pair in zip(images_free, images_pol) for i in pair]
    else:
        texts, images = texts_free, images_free
    enc = encode_prompts(processor, texts, images)
    enc.pop("num_images")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    stops = stop_token_ids(model, processor)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    out = model.generate(**enc, **sampling_kwargs(model, processor, cfg), num_return_sequences=cfg.num_generations)
    seconds = time.perf_counter() - start
    model.train(was_training)
    completion_ids = out[:, enc["input_ids"].shape[1]:].cpu()
    return {"completion_ids": completion_ids, "seconds": seconds, "stops": stops}


def rollout(model, processor, items: Sequence[dict], cfg: GRPOConfig, build_messages,
            reward_fn: Callable | None = None) -> Rollout:
    """Sample the groups for `items` and score them (see `generate_group`)."""
    gen = generate_group(model, processor, items, cfg, build_messages)
    completion_ids = gen["completion_ids"]
    eos_mask, truncated = completion_mask(completion_ids, gen["stops"])
    pad = processor.tokenizer.pad_token_id
    texts = processor.tokenizer.batch_decode(completion_ids.masked_fill(eos_mask == 0, pad), skip_special_tokens=True)
    G = cfg.num_generations
    per_origin = 2 if cfg.policy_rollout else 1
    row_items = [item for item in items for _ in range(per_origin * G)]
    guided = torch.tensor(([False] * G + [True] * G) * len(items) if cfg.policy_rollout else [False] * G * len(items))
    reward_fn = reward_fn or (lambda its, txts: combined_rewards(its, txts, RewardWeights(cfg.accuracy_weight, cfg.format_weight)))
    scores = {k: torch.tensor(v, dtype=torch.float32) for k, v in reward_fn(row_items, texts).items()}
    if cfg.truncated_completions == "penalize":
        scores["reward"] = scores["reward"] + overlong_penalty(eos_mask.sum(1), truncated, cfg.max_completion_length,
                                                               cfg.overlong_buffer)
    return Rollout(items=list(items), completion_ids=completion_ids, eos_mask=eos_mask, truncated=truncated,
                   guided=guided, texts=texts, rewards=scores, gen_seconds=gen["seconds"])


# =========================================================================== scoring (log-probs)


@dataclass
class ScoringBatch:
    """Prompt + completion tensors for teacher-forced log-probs, one row per response.

    Each row's prompt is prompt `prompt_index[row]` of the encoded prompts; its images are encoded
    once per prompt (`image_features`) and shared by all rows of that prompt.
    """

    input_ids: torch.Tensor  # (N, P + T)
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor | None
    completion_ids: torch.Tensor  # (N, T)
    prompt_index: torch.Tensor  # (N,)
    prompt_grid: list[torch.Tensor | None]  # per prompt: (num_images, 3) image_grid_thw
    prompt_pixels: list[torch.Tensor | None]  # per prompt: its pixel patches
    image_features: list[list[torch.Tensor]] | None = None  # per prompt: one tensor per image

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]


def build_scoring_batch(processor, texts: list[str], images: list[list], completion_ids: torch.Tensor,
                        completion_attention: torch.Tensor, prompt_index: torch.Tensor) -> ScoringBatch:
    enc = encode_prompts(processor, texts, images)
    counts = enc["num_images"].tolist()
    grid = enc.get("image_grid_thw")
    pixels = enc.get("pixel_values")
    prompt_grid, prompt_pixels, img, patch = [], [], 0, 0
    for n in counts:
        if n == 0 or grid is None:
            prompt_grid.append(None)
            prompt_pixels.append(None)
            continue
        g = grid[img:img + n]
        size = int(g.prod(-1).sum())
        prompt_grid.append(g)
        prompt_pixels.append(pixels[patch:patch + size])
        img, patch = img + n, patch + size
    ids = enc["input_ids"][prompt_index]
    mask = enc["attention_mask"][prompt_index]
    mm = enc.get("mm_token_type_ids")
    mm = None if mm is None else torch.cat([mm[prompt_index], torch.zeros_like(completion_ids)], dim=1)
    return ScoringBatch(
        input_ids=torch.cat([ids, completion_ids], dim=1),
        attention_mask=torch.cat([mask, completion_attention.to(mask.dtype)], dim=1),
        mm_token_type_ids=mm, completion_ids=completion_ids, prompt_index=prompt_index,
        prompt_grid=prompt_grid, prompt_pixels=prompt_pixels,
    )


def _base_model(model):
    """The transformers model under a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_shared_image_features(model) -> bool:
    base = _base_model(model)
    return "mm_encoder_outputs" in inspect.signature(base.forward).parameters and hasattr(base, "get_image_features")


def vision_is_trainable(model) -> bool:
    visual = getattr(getattr(_base_model(model), "model", None), "visual", None)
    return visual is not None and any(p.requires_grad for p in visual.parameters())


def encode_images_once(model, batch: ScoringBatch) -> None:
    """Run the vision tower once per prompt (not once per response) and keep the features.

    With a frozen vision tower (LoRA / QLoRA on the language model) the features are constants of
    the step, reused by the new, old, reference and behaviour passes alike.
    """
    if not supports_shared_image_features(model):
        return
    base = _base_model(model)
    device = next(model.parameters()).device
    feats = []
    ctx = torch.enable_grad() if vision_is_trainable(model) else torch.no_grad()
    with ctx:
        for grid, pixels in zip(batch.prompt_grid, batch.prompt_pixels):
            if grid is None:
                feats.append([])
                continue
            out = base.get_image_features(pixels.to(device), grid.to(device), return_dict=True)
            feats.append(list(out.pooler_output))
    batch.image_features = feats


def forward_log_probs(model, batch: ScoringBatch, rows: torch.Tensor, temperature: float,
                      chunk_size: int | None = None, with_entropy: bool = False):
    """Per-token log pi(o_t | prompt, o_<t) at `temperature` (and entropy) for `rows` of a batch."""
    device = next(model.parameters()).device
    T = batch.completion_ids.shape[1]
    prompts = batch.prompt_index[rows].tolist()
    grids = [batch.prompt_grid[p] for p in prompts if batch.prompt_grid[p] is not None]
    kwargs: dict[str, Any] = dict(
        input_ids=batch.input_ids[rows].to(device), attention_mask=batch.attention_mask[rows].to(device),
        use_cache=False, logits_to_keep=T + 1,
    )
    if batch.mm_token_type_ids is not None:
        kwargs["mm_token_type_ids"] = batch.mm_token_type_ids[rows].to(device)
    if grids:
        kwargs["image_grid_thw"] = torch.cat(grids).to(device)
        if batch.image_features is not None:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            shared = [f for p in prompts for f in batch.image_features[p]]
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=shared)}
        else:  # a model without precomputed-feature support: pixels per row
            kwargs["pixel_values"] = torch.cat([batch.prompt_pixels[p] for p in prompts
                                                if batch.prompt_pixels[p] is not None]).to(device)
    logits = model(**kwargs).logits[:, :-1, :]
    blocked = vision_token_ids(model)
    if blocked:  # the sampler never saw these tokens (suppress_tokens): score on the same support
        logits = logits.index_fill(-1, torch.tensor(blocked, device=logits.device), float("-inf"))
    ids = batch.completion_ids[rows].to(device)
    return chunked_log_probs_and_entropy(logits, ids, temperature, chunk_size, with_entropy)


def _row_chunks(n: int, size: int | None) -> list[torch.Tensor]:
    size = size or n
    return [torch.arange(s, min(s + size, n)) for s in range(0, n, size)]


class StartReference:
    """The KL reference "the policy when RL started": a copy of the trainable weights, swapped in for the
    reference pass and swapped back after. A LoRA copy is small; with lora_r=None it is a whole model."""

    def __init__(self, model):
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("kl_reference='start' needs trainable weights; load the model with trainable=True")
        self.weights = {n: p.detach().clone() for n, p in self.params.items()}

    @contextlib.contextmanager
    def __call__(self, model) -> Iterator[torch.nn.Module]:
        self._swap()
        try:
            yield model
        finally:
            self._swap()

    def _swap(self) -> None:
        # Exchange the storages rather than copy: no third set of weights during the pass. The Parameter
        # objects stay the same, so the optimizer's state and gradient hooks are untouched.
        for n, p in self.params.items():
            p.data, self.weights[n] = self.weights[n], p.data

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: w.detach().cpu() for n, w in self.weights.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.weights):
            raise ValueError("the checkpoint's KL reference does not match this model's trainable weights")
        for n, w in state.items():
            self.weights[n] = w.to(self.weights[n].device, self.weights[n].dtype)


def make_reference(model, cfg: GRPOConfig) -> Callable | None:
    """A context manager factory `reference(model)` for the KL reference pass, or None when beta is 0."""
    if cfg.beta <= 0:
        return None
    if cfg.kl_reference == "start":
        return StartReference(model)
    from mpi.modeling import reference_model

    return reference_model


@torch.no_grad()
def score_no_grad(model, batch: ScoringBatch, cfg: GRPOConfig, reference: Callable | bool | None = None) -> torch.Tensor:
    """Log-probs of every row without gradients, under `reference(model)` when given (True: adapters off)."""
    if reference is True:
        from mpi.modeling import reference_model as reference
    outs = []
    with reference(model) if reference else contextlib.nullcontext():
        for rows in _row_chunks(batch.num_rows, cfg.micro_batch_size):
            lp, _ = forward_log_probs(model, batch, rows, cfg.temperature, cfg.logprob_chunk_size)
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
    texts, images = prompt_texts(processor, ro.items, True, build_messages)
    return build_scoring_batch(processor, texts, images, ro.completion_ids[rows], ro.eos_mask[rows],
                               rows // group_size)


def train_on_rollout(model, optimizer, processor, ro: Rollout, cfg: GRPOConfig, build_messages,
                     reference: Callable | None = None) -> dict[str, float]:
    """Advantages, log-probs, loss and `num_iterations` optimizer updates for one rollout.

    `reference(model)`: the KL reference's context (train_poro passes `make_reference`'s); None with beta > 0
    means the model with its adapters off."""
    N = ro.completion_ids.shape[0]
    G2 = N // ro.num_groups
    adv = group_advantages(ro.rewards["reward"], G2, scale_rewards=cfg.scale_rewards, std=cfg.advantage_std,
                           eps=cfg.advantage_eps)
    loss_mask = mask_truncated(ro.eos_mask, ro.truncated) if cfg.truncated_completions == "mask" else ro.eos_mask
    batch = policy_free_batch(processor, ro, G2, build_messages)
    encode_images_once(model, batch)
    guided = ro.guided

    need_behaviour = bool(guided.any()) and (cfg.offpolicy_rule == "tis" or cfg.log_behaviour_ratio)
    old_logp = score_no_grad(model, batch, cfg) if (cfg.num_iterations > 1 or need_behaviour) else None
    ref_logp = score_no_grad(model, batch, cfg, reference=reference or True) if cfg.beta > 0 else None
    behaviour = torch.zeros_like(loss_mask, dtype=torch.float32)
    if need_behaviour:
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
    model.train()
    for iteration in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for rows in _row_chunks(N, cfg.micro_batch_size):
            logp, ent = forward_log_probs(model, batch, rows, cfg.temperature, cfg.logprob_chunk_size,
                                          with_entropy=iteration == 0)
            dev = logp.device
            old = old_logp[rows].to(dev) if old_logp is not None else logp.detach()
            a = adv[rows].to(dev)
            per_tok, ratio, c_low, c_high = clipped_surrogate(logp, old, a, cfg.epsilon, cfg.epsilon_high)
            per_tok = per_tok * weights[rows].to(dev)
            g = guided[rows].to(dev)
            if cfg.offpolicy_rule == "shaping" and g.any():
                shaped = shaped_offpolicy_loss(logp, a, cfg.shaping_gamma)
                per_tok = torch.where(g.unsqueeze(1), shaped, per_tok)
            if ref_logp is not None:
                kl = k3_kl(logp, ref_logp[rows].to(dev))
                per_tok = per_tok + cfg.beta * kl
                token_stats["kl"][rows] = kl.detach().float().cpu()
            loss = aggregate_loss(per_tok, loss_mask[rows].to(dev), cfg.loss_type,
                                  max_completion_length=cfg.max_completion_length, num_sequences=num_sequences,
                                  num_tokens=num_tokens)
            loss.backward()
            total += float(loss.detach())
            if ent is not None:
                token_stats["entropy"][rows] = ent.float().cpu()
            token_stats["ratio"][rows] = ratio.detach().float().cpu()
            token_stats["clip_low"][rows] = c_low.float().cpu()
            token_stats["clip_high"][rows] = c_high.float().cpu()
        dist.all_reduce_gradients(params)  # sum the processes' shares (no-op on one process)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats["loss"].append(total)
        stats["grad_norm"].append(float(grad_norm))

    metrics = {"loss": float(np.mean(stats["loss"])), "grad_norm": float(np.mean(stats["grad_norm"])),
               "advantage_abs_mean": float(adv.abs().mean())}
    metrics.update(origin_metrics(ro, adv, loss_mask, token_stats, G2, cfg))
    if need_behaviour:
        metrics.update(behaviour_ratio_metrics(old_logp, behaviour, ro.eos_mask, guided, cfg.tis_cap))
    return metrics


def origin_metrics(ro: Rollout, adv: torch.Tensor, loss_mask: torch.Tensor, token_stats: dict, group_size: int,
                   cfg: GRPOConfig) -> dict[str, float]:
    """Reward, accuracy, advantage, KL, entropy, clipping, lengths, ratios: for all rows and per origin."""
    out: dict[str, float] = {}
    lengths = ro.eos_mask.sum(1).float()
    origins = [("all", torch.ones_like(ro.guided))] + [("own", ~ro.guided)] + ([("guided", ro.guided)] if ro.guided.any() else [])
    for name, sel in origins:
        if not sel.any():
            continue
        rows_mask = loss_mask * sel.unsqueeze(1)
        eos_rows = ro.eos_mask * sel.unsqueeze(1)
        r = ro.rewards["reward"][sel]
        out[f"{name}/reward_mean"] = float(r.mean())
        out[f"{name}/reward_std"] = float(r.std(unbiased=False))
        out[f"{name}/accuracy"] = float(ro.rewards["accuracy"][sel].mean())
        if "format" in ro.rewards:
            out[f"{name}/format"] = float(ro.rewards["format"][sel].mean())
        out[f"{name}/advantage_mean"] = float(adv[sel].mean())
        out[f"{name}/completion_length"] = float(lengths[sel].mean())
        out[f"{name}/truncated_frac"] = float(ro.truncated[sel].float().mean())
        out[f"{name}/entropy"] = masked_mean(token_stats["entropy"], eos_rows)
        out[f"{name}/clip_low_frac"] = masked_mean(token_stats["clip_low"], rows_mask)
        out[f"{name}/clip_high_frac"] = masked_mean(token_stats["clip_high"], rows_mask)
        out[f"{name}/ratio_mean"] = masked_mean(token_stats["ratio"], rows_mask)
        out[f"{name}/ratio_max"] = float(token_stats["ratio"][rows_mask.bool()].max()) if rows_mask.any() else math.nan
        if cfg.beta > 0:
            out[f"{name}/kl"] = masked_mean(token_stats["kl"], rows_mask)
        # groups whose rows of this origin all got the same reward
        per_group = ro.rewards["reward"].view(-1, group_size)
        sel_group = sel.view(-1, group_size)[0]
        out[f"{name}/zero_std_frac"] = float(zero_std_groups(per_group[:, sel_group].reshape(-1), int(sel_group.sum())).float().mean())
    return out


def behaviour_ratio_metrics(old_logp: torch.Tensor, behaviour: torch.Tensor, eos_mask: torch.Tensor,
                            guided: torch.Tensor, cap: float) -> dict[str, float]:
    """How far pi_old(o|q) / pi_old(o|q,P) is from 1 on the guided responses (1 = no mismatch)."""
    mask = eos_mask[guided].bool()
    log_ratio = (old_logp[guided] - behaviour[guided])
    tok = log_ratio[mask]
    if tok.numel() == 0:
        return {}
    seq = (log_ratio * mask).sum(1)
    return {
        "guided/is_ratio_mean": float(tok.exp().mean()),
        "guided/is_ratio_min": float(tok.exp().min()),
        "guided/is_ratio_max": float(tok.exp().max()),
        "guided/is_log_ratio_mean": float(tok.mean()),
        "guided/is_seq_log_ratio_mean": float(seq.mean()),
        "guided/is_capped_frac": float((tok.exp() > cap).float().mean()),
    }


# =========================================================================== prompt order, checkpoints


class PromptSampler:
    """Dataset indices in a fresh seeded permutation per epoch; the whole state is one cursor."""

    def __init__(self, size: int, seed: int, cursor: int = 0):
        if size < 1:
            raise ValueError("the RL dataset is empty: build it with mpi.data and pass at least one item")
        self.size, self.seed, self.cursor = size, seed, cursor
        self._epoch, self._perm = -1, None

    def next(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            epoch, pos = divmod(self.cursor, self.size)
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
                self._perm, self._epoch = torch.randperm(self.size, generator=g).tolist(), epoch
            out.append(self._perm[pos])
            self.cursor += 1
        return out


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | Path, step: int, model, optimizer, sampler: PromptSampler, cfg: GRPOConfig,
                    reference: Callable | None = None) -> Path:
    """trainable weights + optimizer + RNG + step + prompt cursor (+ the KL reference's weights, which a resumed
    run cannot rebuild from the model), written to a temp dir then renamed."""
    path = Path(out_dir) / "checkpoints" / f"step_{step:06d}"
    with atomic_directory(path) as tmp:
        trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(trainable, tmp / "trainable.pt")
        if isinstance(reference, StartReference):
            torch.save(reference.state_dict(), tmp / "reference.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "cursor": sampler.cursor, "config": cfg.to_dict()},
                                                   indent=2, default=str))
    checkpoints = sorted((Path(out_dir) / "checkpoints").glob("step_*"))
    for old in checkpoints[:-max(cfg.keep_checkpoints, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = sorted(p for p in (Path(out_dir) / "checkpoints").glob("step_*") if (p / "state.json").exists())
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, reference: Callable | None = None) -> dict[str, Any]:
    state = json.loads((path / "state.json").read_text())
    if isinstance(reference, StartReference):  # before the weights change: it was built from the current model
        if not (path / "reference.pt").exists():
            raise ValueError(f"checkpoint {path} has no KL reference weights (saved with another kl_reference); "
                             "resume with the same GRPOConfig")
        reference.load_state_dict(torch.load(path / "reference.pt", map_location="cpu"))
    trainable = torch.load(path / "trainable.pt", map_location="cpu")
    params = dict(model.named_parameters())
    missing = sorted(set(trainable) - set(params))
    if missing:
        raise ValueError(f"checkpoint {path} has weights the model lacks ({missing[:3]}...): load the same model and LoRA settings")
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu"))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return state


# =========================================================================== sample table


def _thumbnail_b64(image, size: int = 96) -> str:
    img = image.copy()
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_sample_table(out_dir: str | Path, step: int, ro: Rollout, max_groups: int = 2) -> Path:
    """samples/step_XXXXXX.html (image, query, each completion, its origin and reward) and .jsonl."""
    G2 = ro.completion_ids.shape[0] // ro.num_groups
    records, rows_html = [], []
    for g, item in enumerate(ro.items[:max_groups]):
        images = item.get("images") or []
        thumb = f'<img src="data:image/png;base64,{_thumbnail_b64(images[0])}"/>' if images else ""
        for k in range(G2):
            r = g * G2 + k
            rec = {"step": step, "id": item.get("id"), "origin": "guided" if bool(ro.guided[r]) else "own",
                   "answer": item.get("answer"), "completion": ro.texts[r],
                   **{key: float(v[r]) for key, v in ro.rewards.items()}}
            records.append(rec)
            rows_html.append(
                f"<tr><td>{thumb if k == 0 else ''}</td><td>{html.escape(str(item.get('query', '')))[:200] if k == 0 else ''}"
                f"</td><td>{rec['origin']}</td><td><pre>{html.escape(rec['completion'])}</pre></td>"
                f"<td>{html.escape(str(rec['answer']))}</td><td>{rec['reward']:.2f}</td></tr>")
    table = ("<table><tr><th>image</th><th>query</th><th>origin</th><th>completion</th><th>gold</th><th>reward</th></tr>"
             + "".join(rows_html) + "</table>")
    base = Path(out_dir) / "samples" / f"step_{step:06d}"
    atomic_write_text(base.with_suffix(".jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    return atomic_write_text(base.with_suffix(".html"), table)


# =========================================================================== the loop


@dataclass
class TrainResult:
    out_dir: Path
    adapter_dir: Path | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    final_step: int = 0


def collect_rollout(model, processor, dataset, sampler: PromptSampler, cfg: GRPOConfig, build_messages,
                    reward_fn) -> tuple[Rollout | None, int]:
    """A step's groups; with dynamic sampling, only groups with a reward spread, refilled up to N tries."""
    if not cfg.dynamic_sampling:
        items = [dataset[i] for i in sampler.next(cfg.prompts_per_step)]
        return rollout(model, processor, items, cfg, build_messages, reward_fn), 1
    kept: list[Rollout] = []
    have, tries = 0, 0
    while have < cfg.prompts_per_step and tries < cfg.max_resample_tries:
        tries += 1
        items = [dataset[i] for i in sampler.next(cfg.prompts_per_step - have)]
        ro = rollout(model, processor, items, cfg, build_messages, reward_fn)
        flat = zero_std_groups(ro.rewards["reward"], cfg.group_size)
        keep = [g for g in range(ro.num_groups) if not bool(flat[g])]
        if keep:
            kept.append(ro.select_groups(keep, cfg.group_size))
            have += len(keep)
    return (concat_rollouts(kept) if kept else None), tries


def make_optimizer(model, cfg: GRPOConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: load it with lora=LoraSettings(...) or trainable weights")
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=cfg.adam_betas)


PRINT_KEYS = ("loss", "own/reward_mean", "guided/reward_mean", "own/accuracy", "guided/accuracy", "all/kl",
              "all/completion_length", "step_time", "gen_tokens_per_s")


def train_poro(model, processor, dataset, cfg: GRPOConfig, out_dir: str | Path, *, resume: bool = False,
               build_messages: Callable | None = None, reward_fn: Callable | None = None,
               save_adapter: bool = True) -> TrainResult:
    """PolicyRollout GRPO / DAPO on `dataset` (a sequence of mpi.data items) for cfg.steps steps.

    out_dir gets metrics.csv / metrics.jsonl, samples/, checkpoints/ and adapter/ (the final LoRA).
    resume=True continues from the latest checkpoint in out_dir and ends with exactly the weights an
    uninterrupted run would have. reward_fn(items, texts) -> {"reward": [...], "accuracy": [...], ...}
    replaces the default accuracy + format reward.
    """
    from tqdm.auto import tqdm

    from mpi.metrics import MetricsLogger, format_row

    cfg.validate()
    out_dir = Path(out_dir)
    build_messages = build_messages or default_build_messages()
    seed_everything(cfg.seed + dist.process_index())  # each process samples differently
    dist.sync_initial_weights(model)
    optimizer = make_optimizer(model, cfg)
    reference = make_reference(model, cfg)  # before a checkpoint loads: "start" copies the weights RL starts from
    sampler = dist.ShardedSampler(PromptSampler(len(dataset), cfg.seed))  # process p: positions p, p+W, ...
    local_cfg = dataclasses.replace(cfg, prompts_per_step=dist.local_count(cfg.prompts_per_step))
    start = 0
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, reference)
        start, sampler.cursor = state["step"], state["cursor"]
    logger = (MetricsLogger(out_dir, resume_step=start if ckpt is not None else None, echo=False)
              if dist.is_main_process() else dist.NullLogger())
    if dist.is_main_process():
        atomic_write_text(out_dir / "grpo_config.json", json.dumps(cfg.to_dict(), indent=2, default=str))

    bar = tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, desc=f"{cfg.preset}",
               disable=not cfg.progress or not dist.is_main_process())
    for step in bar:
        t0, c0 = time.perf_counter(), time.process_time()
        ro, tries = collect_rollout(model, processor, dataset, sampler, local_cfg, build_messages, reward_fn)
        metrics: dict[str, Any] = {"resample_tries": tries}
        if dist.all_processes(ro is None):
            metrics["skipped"] = 1  # every try gave flat groups: nothing to learn from this step
        elif ro is None:  # this process found only flat groups, others did not: join their update
            dist.idle_update(model, optimizer, num_iterations=cfg.num_iterations, max_grad_norm=cfg.max_grad_norm)
            metrics.update(num_groups=0)
        else:
            metrics.update(train_on_rollout(model, optimizer, processor, ro, cfg, build_messages, reference))
            gen_tokens = int(ro.eos_mask.sum())
            metrics.update(num_groups=ro.num_groups, gen_tokens=gen_tokens,
                           gen_tokens_per_s=gen_tokens / max(ro.gen_seconds, 1e-9), gen_seconds=ro.gen_seconds)
            if cfg.sample_every and step % cfg.sample_every == 0 and dist.is_main_process():
                write_sample_table(out_dir, step, ro)
        metrics["step_time"] = time.perf_counter() - t0
        metrics["step_cpu_s"] = time.process_time() - c0  # CPU seconds of this process (robust to a busy machine)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        row = logger.log(step, **dist.reduce_metrics(metrics))  # one row for all processes
        if cfg.print_every and step % cfg.print_every == 0 and dist.is_main_process():
            tqdm.write(format_row(row, [k for k in PRINT_KEYS if k in row]))
        bar.set_postfix(reward=f"{row.get('all/reward_mean', float('nan')):.3f}")
        if ((cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps) and dist.is_main_process():
            save_checkpoint(out_dir, step, model, optimizer, sampler, cfg, reference)
    bar.close()

    adapter_dir = None
    if save_adapter and hasattr(model, "save_pretrained") and hasattr(model, "peft_config") and dist.is_main_process():
        adapter_dir = out_dir / "adapter"
        with atomic_directory(adapter_dir) as tmp:
            model.save_pretrained(tmp)
    dist.wait_for_everyone()  # nobody returns before process 0 has written the adapter
    if save_adapter and adapter_dir is None and (out_dir / "adapter").exists():
        adapter_dir = out_dir / "adapter"
    return TrainResult(out_dir=out_dir, adapter_dir=adapter_dir, rows=logger.rows, final_step=cfg.steps)


# =========================================================================== the starting point


def start_rl_from(model, lora):
    """Fold the previous stage's adapter into the weights and add a fresh LoRA for RL.

    The KL reference is "the same model with adapters disabled". Continuing to train the SFT adapter
    would make that reference the pre-SFT base; folding it in first makes the reference the SFT policy
    (the paper's pi_ref = the initial policy). On a 4-bit model peft re-quantizes the merged weights
    (small rounding error; it warns). `lora`: a mpi.modeling.LoraSettings.
    """
    from peft import get_peft_model

    base = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    return get_peft_model(base, lora.to_peft())


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
