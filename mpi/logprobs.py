"""Teacher-forced log-probs of sampled completions: the scoring passes of the RL loss (`mpi.poro`).

A `ScoringBatch` holds every response behind one prompt each (`build_scoring_batch`); `encode_images_once`
runs the vision tower once per prompt; `forward_log_probs` returns log pi(o_t | prompt, o_<t) at the
sampling temperature (and the entropy), running each distinct prompt once and reusing its KV cache for its
rows (`mpi.sampling.shared_prompt_logits`), or prompt + completion per row. The vision placeholder ids are
scored out exactly as the sampler suppressed them, so the scored and the sampled distributions agree.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from mpi import sampling
from mpi.grpo import chunked_log_probs_and_entropy
from mpi.sampling import base_model, encode_prompts, vision_token_ids


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
    # the encoded prompts themselves (one row per prompt, left-padded): the shared-prompt forward runs these
    # once and reuses their KV cache for every row (None: only the per-row forward is possible)
    prompt_ids: torch.Tensor | None = None  # (num_prompts, P)
    prompt_attention: torch.Tensor | None = None
    prompt_mm_token_type_ids: torch.Tensor | None = None

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
        prompt_ids=enc["input_ids"], prompt_attention=enc["attention_mask"],
        prompt_mm_token_type_ids=enc.get("mm_token_type_ids"),
    )


def supports_shared_image_features(model) -> bool:
    base = base_model(model)
    return "mm_encoder_outputs" in inspect.signature(base.forward).parameters and hasattr(base, "get_image_features")


def vision_is_trainable(model) -> bool:
    visual = getattr(getattr(base_model(model), "model", None), "visual", None)
    return visual is not None and any(p.requires_grad for p in visual.parameters())


def encode_images_once(model, batch: ScoringBatch) -> None:
    """Run the vision tower once per prompt (not once per response) and keep the features.

    With a frozen vision tower (LoRA / QLoRA on the language model) the features are constants of
    the step, reused by the new, old, reference and behaviour passes alike.
    """
    if not supports_shared_image_features(model):
        return
    base = base_model(model)
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


def _shared_prompt_forward(model, batch: ScoringBatch, rows: torch.Tensor) -> torch.Tensor:
    """Logits (rows, T, V) from `mpi.sampling.shared_prompt_logits`: each distinct prompt of `rows` once."""
    device = next(model.parameters()).device
    prompt_of_row = batch.prompt_index[rows]
    unique, prompt_rows = torch.unique(prompt_of_row, sorted=True, return_inverse=True)
    ps = unique.tolist()
    prompt: dict[str, Any] = {"input_ids": batch.prompt_ids[unique].to(device),
                              "attention_mask": batch.prompt_attention[unique].to(device)}
    if batch.prompt_mm_token_type_ids is not None:
        prompt["mm_token_type_ids"] = batch.prompt_mm_token_type_ids[unique].to(device)
    grids = [batch.prompt_grid[p] for p in ps if batch.prompt_grid[p] is not None]
    if grids:
        prompt["image_grid_thw"] = torch.cat(grids).to(device)
        if batch.image_features is not None:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            shared = [f for p in ps for f in batch.image_features[p]]
            prompt["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=shared)}
        else:
            prompt["pixel_values"] = torch.cat([batch.prompt_pixels[p] for p in ps
                                                if batch.prompt_pixels[p] is not None]).to(device)
    P = batch.prompt_ids.shape[1]
    completion_attention = batch.attention_mask[rows][:, P:].to(device)
    return sampling.shared_prompt_logits(model, prompt, prompt_rows.to(device), batch.completion_ids[rows].to(device),
                                         completion_attention)


def forward_log_probs(model, batch: ScoringBatch, rows: torch.Tensor, temperature: float,
                      chunk_size: int | None = None, with_entropy: bool = False, *, shared_prompt: bool = True):
    """Per-token log pi(o_t | prompt, o_<t) at `temperature` (and entropy) for `rows` of a batch.

    shared_prompt=True (when the batch carries its prompts and the model supports it): each distinct prompt
    of `rows` runs once and its KV cache serves all its rows; else prompt + completion run per row. The two
    agree up to float rounding."""
    if shared_prompt and batch.prompt_ids is not None and sampling.shared_prompt_supported(model):
        logits = _shared_prompt_forward(model, batch, rows)
        blocked = vision_token_ids(model)
        if blocked:  # the sampler never saw these tokens (suppress_tokens): score on the same support
            logits = logits.index_fill(-1, torch.tensor(blocked, device=logits.device), float("-inf"))
        ids = batch.completion_ids[rows].to(logits.device)
        return chunked_log_probs_and_entropy(logits, ids, temperature, chunk_size, with_entropy)
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


def row_chunks(n: int, size: int | None) -> list[torch.Tensor]:
    size = size or n
    return [torch.arange(s, min(s + size, n)) for s in range(0, n, size)]
