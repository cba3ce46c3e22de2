"""A hand-written sampling loop for the GRPO rollout, and the shared-prompt scoring forward.

Why not `model.generate`: at toy scale the step is dominated by per-token Python overhead, not by
arithmetic. This loop does per step only what sampling needs (one decoder forward on the new token,
the suppress / temperature / top-k / top-p of `sampling_kwargs`, one multinomial draw) and it

* runs each prompt's prefill ONCE and copies its KV cache to the G rows that sample from it
  (`generate(num_return_sequences=G)` prefills, and encodes the images of, every copy);
* folds the LoRA update into a temporary copy of each adapted weight for the sampling pass
  (`lora_merged`), so a decode step runs one matmul per projection instead of three;
* stops as soon as every row has emitted a stop token.

The distribution is the one `generate` samples from: softmax((z with the vision ids at -inf) / T),
then HF's top-k and top-p filters, in HF's order, and one categorical draw per step from the float32
probabilities (inverse CDF by default; `torch.multinomial`, generate's own draw, on request). Finished rows get the pad token, as in `generate`. Only the Qwen2-VL family (and the
toy model, which is one) is supported; `supports_fast_sampling` says when, else callers use `generate`.

`shared_prompt_log_probs` is the scoring-side twin: the policy-free prompt of a group is the same for
all 2G rows, so it runs once per group (with gradients when enabled) and its KV cache is indexed out
to the rows; only the completions run per row. Same log-probs as the full forward up to float rounding.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Sequence

import torch

# Temporary merged copies of the adapted weights may cost at most this much extra memory; above it (a 7B
# model) the loop keeps peft's unmerged LoRA forward, whose overhead is small next to the matmuls there.
MERGE_BUDGET_BYTES = 512 * 2**20


def base_model(model):
    """The transformers model under a peft wrapper (the model itself when it has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _vl_parts(model):
    """(the *ForConditionalGeneration, its multimodal model, its language model) or None."""
    base = base_model(model)
    inner = getattr(base, "model", None)
    lm = getattr(inner, "language_model", None)
    if lm is None or not hasattr(inner, "get_rope_index") or not hasattr(base, "lm_head"):
        return None
    return base, inner, lm


def supports_fast_sampling(model) -> bool:
    """The loop needs a Qwen2-VL-style model: get_rope_index for the 3-D positions, a language model that
    takes a cache and position ids, and an lm_head."""
    return _vl_parts(model) is not None


# =========================================================================== LoRA folded in for sampling


def _mergeable_lora_layers(model) -> list:
    out = []
    for module in model.modules():
        base_layer = getattr(module, "base_layer", None)
        if not (hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")
                and isinstance(base_layer, torch.nn.Linear) and type(base_layer) is torch.nn.Linear):
            continue  # a quantized (bitsandbytes) base layer cannot take a float delta: keep its LoRA forward
        if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
            continue
        if not base_layer.weight.dtype.is_floating_point:
            continue
        active = [a for a in getattr(module, "active_adapters", []) if a in module.lora_A]
        if any(a in getattr(module, "lora_variant", {}) for a in active):
            continue  # DoRA and other variants are not a plain B @ A delta
        if active:
            out.append((module, active))
    return out


@contextlib.contextmanager
def lora_merged(model, budget_bytes: int = MERGE_BUDGET_BYTES) -> Iterator[bool]:
    """Inside the block each plain-Linear LoRA layer computes with W + scale * B @ A in one matmul.

    The merged weight is a NEW tensor swapped in for the block; the original W is swapped back on exit,
    bit for bit (peft's merge / unmerge would add and subtract the delta in place and drift W by a
    rounding error every step). No gradients inside. Yields whether it merged (False: over the budget)."""
    layers = _mergeable_lora_layers(model)
    extra = sum(m.base_layer.weight.numel() * m.base_layer.weight.element_size() for m, _ in layers)
    if not layers or extra > budget_bytes:
        yield False
        return
    saved = []
    try:
        with torch.no_grad():
            for module, active in layers:
                weight = module.base_layer.weight
                merged = weight.detach().clone()
                for adapter in active:
                    merged += module.get_delta_weight(adapter).to(merged.dtype)
                saved.append((module, weight.data, module._disable_adapters))
                weight.data = merged
                module._disable_adapters = True  # peft's forward is then base_layer(x): the merged matmul only
        yield True
    finally:
        for module, original, flag in saved:
            module.base_layer.weight.data = original
            module._disable_adapters = flag


# =========================================================================== the distribution


def filter_logits(scores: torch.Tensor, temperature: float | None, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """HF's TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper, in generate's order, on float32
    scores (min_tokens_to_keep=1, filter value -inf)."""
    if temperature is not None and temperature != 1.0:
        scores = scores / temperature
    if top_k:
        k = min(max(int(top_k), 1), scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), float("-inf"))
    return scores


def draw(probs: torch.Tensor, method: str = "inverse_cdf") -> torch.Tensor:
    """One token per row from `probs` (N, V). "inverse_cdf": the first index whose cumulative probability
    exceeds u * total, u ~ U[0, 1) (exactly the categorical distribution; a zero-probability token has an
    empty interval and is never drawn), ~20x cheaper than torch.multinomial on CPU. "multinomial": what
    generate calls, so that with the same seed the same tokens come out (the tests use this)."""
    if method == "multinomial":
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    if method != "inverse_cdf":
        raise ValueError(f"draw method must be 'inverse_cdf' or 'multinomial', got {method!r}")
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(probs.shape[-1] - 1)


# =========================================================================== the loop


def _preallocated_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A DynamicLayer whose keys / values live in a buffer sized for the whole rollout: a decode step
        writes its token in place instead of `torch.cat`-copying the whole cache (which, with 2G rows
        behind a long policy prompt, moved ~100 MB per step on the toy). `keys` / `values` are views of
        the filled part, so attention sees exactly what a DynamicLayer would hold."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
            super().__init__()
            n, h, length, _ = keys.shape
            self._k = keys.new_empty(n, h, capacity, keys.shape[-1])
            self._v = values.new_empty(n, h, capacity, values.shape[-1])
            self._k[:, :, :length] = keys
            self._v[:, :, :length] = values
            self.length, self.device, self.is_initialized = length, keys.device, True
            self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[-2]
            if self.length + n > self._k.shape[2]:  # past the planned length: grow as a DynamicLayer would
                self._k = torch.cat([self._k, torch.empty_like(self._k)], dim=2)
                self._v = torch.cat([self._v, torch.empty_like(self._v)], dim=2)
            self._k[:, :, self.length:self.length + n] = key_states
            self._v[:, :, self.length:self.length + n] = value_states
            self.length += n
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]
            return self.keys, self.values

    return PreallocatedLayer


def _preallocate(cache, extra: int) -> None:
    """Swap each filled DynamicLayer of `cache` for a PreallocatedLayer with room for `extra` more tokens."""
    layer_class = _preallocated_layer_class()
    for i, layer in enumerate(cache.layers):
        if type(layer).__name__ != "DynamicLayer" or not layer.is_initialized:
            continue  # sliding-window or other layer kinds keep their own update
        cache.layers[i] = layer_class(layer.keys, layer.values, layer.keys.shape[2] + extra)


def _prompt_positions(inner, enc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D rope positions of the (left-padded) prompts and each row's delta: the text position of a token
    appended after n real tokens is n + delta, as `compute_3d_position_ids` continues it in generate."""
    kwargs = {k: enc[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if enc.get(k) is not None}
    mm = enc.get("mm_token_type_ids")
    if mm is None:
        mm = torch.zeros_like(enc["input_ids"], dtype=torch.int32)
    position_ids, deltas = inner.get_rope_index(enc["input_ids"], mm_token_type_ids=mm,
                                                attention_mask=enc["attention_mask"], **kwargs)
    return position_ids, deltas.view(-1)


# A prompt joins a prefill bucket while its length is at most this many times the bucket's shortest.
PREFILL_BUCKET_RATIO = 1.25


def length_buckets(lengths: Sequence[int], ratio: float = PREFILL_BUCKET_RATIO) -> list[list[int]]:
    """Prompt indices grouped by real (unpadded) length, shortest first: PoRo's policy-free prompts (83 tokens
    on the toy) and its policy prompts (300) land in two buckets; plain GRPO's prompts in one."""
    buckets: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        if buckets and lengths[i] <= ratio * max(lengths[buckets[-1][0]], 1):
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def _bucket_inputs(inner, enc: dict[str, torch.Tensor], position_ids: torch.Tensor, rows: list[int],
                   width: int) -> dict[str, Any] | None:
    """The prefill inputs of prompts `rows`, their left padding cut to `width` columns; None when `enc`
    holds a key this function does not know how to split (the caller then prefills all prompts at once)."""
    P = enc["input_ids"].shape[1]
    idx = torch.tensor(rows, device=enc["input_ids"].device)
    out: dict[str, Any] = {"position_ids": position_ids[:, idx, P - width:]}
    for key, value in enc.items():
        if key == "num_images" or value is None:
            continue
        if key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            out[key] = value[idx, P - width:]
        elif key not in ("pixel_values", "image_grid_thw"):
            return None
    grid = enc.get("image_grid_thw")
    if grid is not None:
        start_id = getattr(inner.config, "vision_start_token_id", None)
        if start_id is None:
            return None
        per_prompt = (enc["input_ids"] == start_id).sum(1).tolist()  # images of each prompt, in order
        if sum(per_prompt) != grid.shape[0]:
            return None
        first = [0]
        for n in per_prompt:
            first.append(first[-1] + n)
        patches = grid.prod(-1)
        patch_start = torch.cat([patches.new_zeros(1), patches.cumsum(0)]).tolist()
        images = [j for r in rows for j in range(first[r], first[r + 1])]
        if images:
            out["image_grid_thw"] = grid[images]
            out["pixel_values"] = torch.cat([enc["pixel_values"][patch_start[j]:patch_start[j + 1]] for j in images])
    return out


def prefill(base, inner, lm, enc: dict[str, torch.Tensor], position_ids: torch.Tensor):
    """Run the (left-padded) prompts of `enc` through the model once: (DynamicCache, last hidden state per prompt).

    Prompts of very different lengths (PoRo: policy-free and with-policy) are prefilled in length buckets, each
    padded only to its own longest prompt, and their caches are then left-padded (zero keys and values, masked
    out by the attention mask) into one cache as wide as `enc`: the same attention as one padded prefill, but the
    short prompts no longer run through the long prompts' padding (4 x 83 + 4 x 300 tokens instead of 8 x 300)."""
    from transformers import DynamicCache

    prompt_kwargs = {k: v for k, v in enc.items() if k not in ("num_images",)}
    lengths = enc["attention_mask"].sum(1).tolist()
    buckets = length_buckets(lengths)
    full_attention = all(t == "full_attention" for t in (getattr(lm.config, "layer_types", None) or ["full_attention"]))
    parts = ([_bucket_inputs(inner, enc, position_ids, rows, max(lengths[r] for r in rows)) for rows in buckets]
             if len(buckets) > 1 and full_attention else [None])
    if any(p is None for p in parts):  # one bucket (plain GRPO), another layer kind, or inputs it cannot split
        cache = DynamicCache(config=lm.config)
        out = inner(**prompt_kwargs, position_ids=position_ids, cache=cache, use_cache=True)
        return cache, out.last_hidden_state[:, -1]
    n, P = enc["input_ids"].shape
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    hidden = None
    for rows, kwargs in zip(buckets, parts):
        part_cache = DynamicCache(config=lm.config)
        out = inner(**kwargs, cache=part_cache, use_cache=True)
        last = out.last_hidden_state[:, -1]
        if hidden is None:
            hidden = last.new_zeros(n, last.shape[-1])
        idx = torch.tensor(rows, device=last.device)
        hidden[idx] = last
        for i, layer in enumerate(part_cache.layers):
            k, v = layer.keys, layer.values
            if len(keys) <= i:
                keys.append(k.new_zeros(n, k.shape[1], P, k.shape[-1]))
                values.append(v.new_zeros(n, v.shape[1], P, v.shape[-1]))
            keys[i][idx, :, P - k.shape[2]:] = k
            values[i][idx, :, P - v.shape[2]:] = v
    cache = DynamicCache(config=lm.config)
    for i, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, i)
    return cache, hidden


@torch.no_grad()
def sample(model, enc: dict[str, torch.Tensor], *, num_return_sequences: int, max_new_tokens: int,
           stop_ids: Sequence[int], pad_id: int | None, suppress_ids: Sequence[int] = (),
           temperature: float | None = 1.0, top_p: float | None = 1.0, top_k: int | None = 0, greedy: bool = False,
           merge_lora: bool = True, return_log_probs: bool = False, draw_method: str = "inverse_cdf") -> dict[str, Any]:
    """Completions for left-padded prompts `enc` (from `mpi.poro.encode_prompts`, on the model's device):
    num_return_sequences rows per prompt, prompt after prompt, as `generate` lays them out.

    Returns completion_ids (N, steps) on CPU with pad after a row's stop token, and, with return_log_probs,
    log_probs (N, steps): log softmax((z, vision ids at -inf) / T) of each sampled token (no top-k / top-p:
    the distribution the loss scores; pad positions are 0). draw_method: see `draw`. Call in eval mode."""
    parts = _vl_parts(model)
    if parts is None:
        raise ValueError("mpi.sampling.sample needs a Qwen2-VL-family model (get_rope_index, language_model, "
                         "lm_head); use model.generate for others (GRPOConfig(sampler='hf'))")
    base, inner, lm = parts
    device = enc["input_ids"].device
    stops = torch.tensor(sorted(set(stop_ids)), device=device)
    fill = int(pad_id) if pad_id is not None else int(stops[0])
    blocked = torch.tensor(sorted(set(suppress_ids)), device=device, dtype=torch.long) if suppress_ids else None
    G = int(num_return_sequences)
    position_ids, deltas = _prompt_positions(inner, enc)
    merge = lora_merged(model) if merge_lora else contextlib.nullcontext(False)
    with merge:
        # prefill once per prompt (images encoded once per prompt), then G copies of its cache
        cache, hidden = prefill(base, inner, lm, enc, position_ids)
        rows = torch.arange(hidden.shape[0], device=device).repeat_interleave(G)
        cache.batch_select_indices(rows)
        _preallocate(cache, max_new_tokens)
        hidden = hidden[rows]
        mask = enc["attention_mask"][rows]
        next_position = (mask.sum(1) + deltas.to(device)[rows]).long()  # text position of the first new token
        N = hidden.shape[0]
        unfinished = torch.ones(N, dtype=torch.bool, device=device)
        tokens, log_probs = [], []
        embed = lm.get_input_embeddings()
        for step in range(max_new_tokens):
            logits = base.lm_head(hidden).float()
            if blocked is not None:
                logits = logits.index_fill(-1, blocked, float("-inf"))
            if greedy:
                token = logits.argmax(-1)
            else:
                scores = filter_logits(logits, temperature, top_k, top_p)
                token = draw(scores.softmax(-1), draw_method)
            token = torch.where(unfinished, token, torch.full_like(token, fill))
            if return_log_probs:
                scaled = logits / temperature if (temperature and not greedy) else logits
                lp = scaled.log_softmax(-1).gather(1, token[:, None]).squeeze(1)
                log_probs.append(torch.where(unfinished, lp, torch.zeros_like(lp)))
            tokens.append(token)
            unfinished = unfinished & ~torch.isin(token, stops)
            if step + 1 == max_new_tokens or not bool(unfinished.any()):
                break
            mask = torch.cat([mask, mask.new_ones(N, 1)], dim=1)
            pos = next_position.view(1, N, 1).expand(3, N, 1)
            out = lm(inputs_embeds=embed(token[:, None]), attention_mask=mask, position_ids=pos, cache=cache,
                     use_cache=True)
            hidden = out.last_hidden_state[:, -1]
            next_position = next_position + 1
    result = {"completion_ids": torch.stack(tokens, 1).cpu()}
    if return_log_probs:
        result["log_probs"] = torch.stack(log_probs, 1).cpu()
    return result


# =========================================================================== shared-prompt scoring


def shared_prompt_supported(model) -> bool:
    """The shared-prompt forward needs the cache path; gradient checkpointing drops the cache in a
    gradient-tracking forward, so it is used then only without gradients."""
    if _vl_parts(model) is None:
        return False
    base = base_model(model)
    if not (base.training and torch.is_grad_enabled()):
        return True
    return not any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules())


def shared_prompt_logits(model, prompt: dict[str, torch.Tensor], prompt_rows: torch.Tensor,
                         completion_ids: torch.Tensor, completion_attention: torch.Tensor) -> torch.Tensor:
    """Logits (N, T, V) predicting each completion token: the prompts (U of them, left-padded, with their
    image inputs) run once, their KV cache is indexed out to the N rows (prompt_rows[n] = the prompt of
    row n), and the completions run on top. Gradients flow into the shared prompt pass (summed over its
    rows, as the per-row forward's would be)."""
    base, inner, lm = _vl_parts(model)
    from transformers import DynamicCache

    device = completion_ids.device
    position_ids, deltas = _prompt_positions(inner, prompt)
    cache = DynamicCache(config=lm.config)
    prompt_kwargs = {k: v for k, v in prompt.items() if k not in ("num_images",)}
    out = inner(**prompt_kwargs, position_ids=position_ids, cache=cache, use_cache=True)
    cache.batch_select_indices(prompt_rows)
    last = out.last_hidden_state[:, -1][prompt_rows]  # predicts completion token 0
    mask = torch.cat([prompt["attention_mask"][prompt_rows], completion_attention.to(prompt["attention_mask"].dtype)], 1)
    N, T = completion_ids.shape
    start = prompt["attention_mask"][prompt_rows].sum(1) + deltas.to(device)[prompt_rows]
    pos = (start.view(N, 1) + torch.arange(T, device=device).view(1, T)).long()
    hidden = last[:, None]
    if T > 1:
        rest = lm(inputs_embeds=lm.get_input_embeddings()(completion_ids[:, :-1]), attention_mask=mask[:, :-1],
                  position_ids=pos[:, :-1].unsqueeze(0).expand(3, N, T - 1), cache=cache, use_cache=True)
        hidden = torch.cat([hidden, rest.last_hidden_state], dim=1)
    return base.lm_head(hidden)


# =========================================================================== prompts in, completions out
# What the RL loop (mpi.poro) and its validation call: chat-templated prompts, left-padded tensors, and G
# samples per prompt with every sampling knob explicit. `cfg` is a GRPOConfig (temperature, top_p, top_k,
# max_completion_length, num_generations, sampler).

SAMPLERS = ("fast", "hf")  # `sample` here, or transformers' `model.generate` (the same distribution)


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
    config = base_model(model).config
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


def sampling_kwargs(model, processor, cfg) -> dict[str, Any]:
    """Every sampling knob set explicitly: a checkpoint's generation_config (Qwen2.5-VL-Instruct ships
    top_k=1, temperature 0.1, repetition_penalty 1.05) must not leak in, or the sampler would differ from
    the softmax(z / T) that the loss's log-probs assume."""
    return dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, min_p=None,
                typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=cfg.max_completion_length,
                eos_token_id=stop_token_ids(model, processor), pad_token_id=processor.tokenizer.pad_token_id,
                suppress_tokens=vision_token_ids(model) or None, use_cache=True)


@torch.no_grad()
def generate_from_prompts(model, processor, texts: list[str], images: list[list], cfg, *,
                          num_return_sequences: int | None = None, greedy: bool = False,
                          return_log_probs: bool = False) -> dict[str, Any]:
    """`num_return_sequences` (default cfg.num_generations) completions per prompt, prompt after prompt,
    sampled with `sampling_kwargs` in eval mode (no dropout); greedy=True decodes the argmax instead.
    cfg.sampler="fast" uses `mpi.sampling.sample` (same distribution, ~2x faster on the toy), "hf" generate.
    return_log_probs: also "log_probs" (N, T), each drawn token's log-prob at the sampling temperature, from
    the fast sampler (None from generate)."""
    enc = encode_prompts(processor, texts, images)
    enc.pop("num_images")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    stops = stop_token_ids(model, processor)
    kwargs = sampling_kwargs(model, processor, cfg)
    if greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    n = num_return_sequences or cfg.num_generations
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    log_probs = None
    try:
        completion_ids, log_probs = _sample(model, enc, cfg, n, stops, kwargs, greedy, return_log_probs)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    return {"completion_ids": completion_ids, "seconds": seconds, "stops": stops, "log_probs": log_probs}


def _sample(model, enc, cfg, n: int, stops, kwargs, greedy: bool, return_log_probs: bool):
    """(completion_ids on CPU, log_probs or None) from the fast sampler, else from model.generate."""
    if getattr(cfg, "sampler", "hf") == "fast" and supports_fast_sampling(model):
        out = sample(
            model, enc, num_return_sequences=n, max_new_tokens=cfg.max_completion_length, stop_ids=stops,
            pad_id=kwargs["pad_token_id"], suppress_ids=kwargs["suppress_tokens"] or (),
            temperature=kwargs["temperature"], top_p=kwargs["top_p"], top_k=kwargs["top_k"],
            greedy=greedy, return_log_probs=return_log_probs and not greedy)
        return out["completion_ids"], out.get("log_probs")
    out = model.generate(**enc, **kwargs, num_return_sequences=n)
    return out[:, enc["input_ids"].shape[1]:].cpu(), None
