"""Prompt lengths measured before RL, so a prompt longer than RunConfig.max_length is refused, never cut.

The supervised collator already refuses a sequence over max_length (mpi.collate). The RL prompts (the
policy-free one and the guided one with the policy in context) were never truncated either (mpi.poro encodes
them without truncation), but nothing bounded them: the memory estimate takes max_length as the guided
prompt's length, so a longer prompt would exceed the estimate, and a truncating encoder (TRL's
max_prompt_length) cuts through the image tokens ("Image features and image tokens do not match"). Here every
training prompt is measured with the real processor (images expanded to their tokens) and the longest is
checked against max_length, naming the item, its length, its image tokens and the fix.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence


class PromptTooLong(ValueError):
    """A prompt longer than max_length: truncating it would drop image tokens or the policy."""


def prompt_lengths(processor, items: Sequence[dict], *, with_policy: bool, build_messages: Callable | None = None,
                   chunk: int = 16) -> list[tuple[str, int, int]]:
    """(item id, prompt tokens, image tokens) of each item's chat-templated generation prompt, as mpi.poro
    encodes it (the processor expands each image to its <|image_pad|> tokens; no truncation)."""
    from mpi.poro import default_build_messages
    from mpi.sampling import encode_prompts, prompt_texts

    build_messages = build_messages or default_build_messages()
    image_id = getattr(processor, "image_token_id", None)
    if image_id is None:
        image_id = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<|image_pad|>"))
    out = []
    for start in range(0, len(items), chunk):
        part = [items[i] for i in range(start, min(len(items), start + chunk))]
        texts, images = prompt_texts(processor, part, with_policy, build_messages)
        enc = encode_prompts(processor, texts, images)
        lengths = enc["attention_mask"].sum(1).tolist()
        image_tokens = ((enc["input_ids"] == image_id) & (enc["attention_mask"] == 1)).sum(1).tolist()
        out += [(str(it.get("id", start + k)), int(n), int(m)) for k, (it, n, m) in enumerate(zip(part, lengths, image_tokens))]
    return out


def check_prompt_lengths(processor, items: Sequence[dict], max_length: int, *, with_policy: Sequence[bool] = (False, True),
                         build_messages: Callable | None = None, where: str = "RL") -> dict[str, Any]:
    """Raise PromptTooLong if any prompt of `items` (policy-free and / or with the policy) exceeds max_length;
    else return {"longest_prompt", "longest_item", "items"}."""
    longest = (None, -1, 0, False)
    for policy in with_policy:
        for item_id, n, image_tokens in prompt_lengths(processor, items, with_policy=policy, build_messages=build_messages):
            if n > longest[1]:
                longest = (item_id, n, image_tokens, policy)
    item_id, n, image_tokens, policy = longest
    if n > max_length:
        raise PromptTooLong(
            f"{where}: the prompt of item {item_id} ({'with' if policy else 'without'} the policy) is {n} tokens "
            f"({image_tokens} of them image tokens), longer than max_length={max_length}. It is not truncated: "
            f"that would cut its image tokens or its policy. Fix: --set max_length={n} (RunConfig.max_length; check "
            "memory with --dry-run), or a smaller image_size, or shorter policies")
    return {"longest_prompt": n, "longest_item": item_id, "items": len(items)}
