"""One collator for both supervised stages: which tokens carry loss is the only difference.

    collate = SupervisedCollator(processor, mode="cpt")        # VM-CPT: policy in context
    batch = collate([item0, item1])                            # input_ids, attention_mask, labels, pixel_values, ...

Modes (labels equal to -100 carry no loss):

- "cpt"        (VM-CPT)    x = (policy text, policy images, input images, query, CoT, answer).
               Loss on every token except the visual tokens, i.e. the `<|image_pad|>` tokens of the input
               *and* the policy images, and (by default, `mask_vision_markers=True`) the
               `<|vision_start|>` / `<|vision_end|>` markers around them: they are part of the image's span
               that the processor writes, and "an image starts here" is layout, not policy knowledge.
               Set `mask_vision_markers=False` to train on the markers too.
- "cot-sft"    (CoT SFT)   prompt (query, images) *without* the policy; loss on "<think>CoT</think>\\n\\boxed{A}"
               plus the closing `<|im_end|>` (so the model learns to stop), nothing else.
- "direct-sft" (direct SFT) the same prompt; loss on "\\boxed{A}<|im_end|>" only.

`policy_in_context_frac` (SFT modes): that fraction of *batches* keeps the policy in the prompt (loss still on
the response only). A batch is picked by a hash of (seed, its item ids), so a resumed run, which replays the
same batches, picks the same ones. Whole batches rather than single items, because one long policy prompt
pads every row of its batch: per item, half the items with the policy cost about as much as all of them.
0 is the paper's policy-free SFT. A small model forgets how to read a policy in context after policy-free
SFT, and PolicyRollout's guided half needs exactly that skill (see `mpi.config`'s toy preset).

Padding never carries loss. Prompts come from `mpi.data.messages.build_messages`, the one place prompt
text is made, so training, evaluation and RL read the same words.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

IGNORE_INDEX = -100
MODES = ("cpt", "cot-sft", "direct-sft")


def _message_builders():
    from mpi.data.messages import build_messages, format_response

    return build_messages, format_response


def visual_token_ids(processor, mask_vision_markers: bool = True) -> list[int]:
    """Token ids that are never targets: the image pad token (and the vision start/end markers)."""
    tokenizer = processor.tokenizer
    names = ["<|image_pad|>", "<|video_pad|>"]
    if mask_vision_markers:
        names += ["<|vision_start|>", "<|vision_end|>"]
    ids = []
    for name in names:
        token_id = tokenizer.convert_tokens_to_ids(name)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            ids.append(int(token_id))
    image_id = getattr(processor, "image_token_id", None)
    if image_id is not None and int(image_id) not in ids:
        ids.append(int(image_id))
    return sorted(set(ids))


@dataclass
class Encoded:
    """The pieces of one training sequence before padding (kept for inspection and for `check_config`)."""

    text: str  # the full chat text (image pads not yet expanded)
    images: list
    target_text: str | None  # SFT: the supervised suffix (response + eos); CPT: None (everything non-visual)
    tail_text: str = ""  # SFT: what the chat template writes after the eos (a newline), never a target


class SupervisedCollator:
    """Turns dataset items into a padded training batch with labels.

    processor: a Qwen2.5-VL processor (toy or real).
    mode: "cpt" | "cot-sft" | "direct-sft" (see the module docstring).
    max_length: sequences longer than this raise (truncating would cut image tokens or the target);
        `mpi.supervised.check_config` finds such items before training starts.
    """

    def __init__(self, processor, mode: str = "cpt", *, max_length: int | None = None,
                 mask_vision_markers: bool = True, build_messages=None, format_response=None,
                 policy_in_context_frac: float = 0.0, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"SupervisedCollator mode must be one of {MODES}, got {mode!r}")
        if not 0.0 <= policy_in_context_frac <= 1.0:
            raise ValueError(f"policy_in_context_frac must be in [0, 1], got {policy_in_context_frac!r}")
        if policy_in_context_frac and mode == "cpt":
            raise ValueError("policy_in_context_frac is for the SFT modes; mode='cpt' always has the policy in context")
        self.policy_in_context_frac = float(policy_in_context_frac)
        self.seed = int(seed)
        default_build, default_format = _message_builders() if build_messages is None or format_response is None else (None, None)
        self.processor = processor
        self.mode = mode
        self.max_length = max_length
        self.mask_vision_markers = mask_vision_markers
        self.build_messages = build_messages or default_build
        self.format_response = format_response or default_format
        self.visual_ids = torch.tensor(visual_token_ids(processor, mask_vision_markers))
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.eos_token = tokenizer.eos_token
        if self.pad_id is None:
            raise ValueError("the processor's tokenizer has no pad token; set tokenizer.pad_token (e.g. '<|endoftext|>')")

    # ------------------------------------------------------------------ text
    def shows_policy(self, items: Sequence[Mapping[str, Any]]) -> bool:
        """Whether this batch's prompts carry the policy: always in "cpt", a hashed share of batches in SFT."""
        if self.mode == "cpt":
            return True
        if self.policy_in_context_frac <= 0.0:
            return False
        key = "\x1f".join(str(item.get("id", "")) for item in items)
        digest = hashlib.sha256(f"{self.seed}:{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64 < self.policy_in_context_frac

    def response(self, item: Mapping[str, Any]) -> str:
        if self.mode == "direct-sft":
            return self.format_response(None, item["answer"])
        if not item.get("cot"):
            raise ValueError(
                f"item {item.get('id', '?')}: mode {self.mode!r} needs a chain of thought but the 'cot' field is "
                "empty; use mode='direct-sft' for answer-only items or filter them out")
        return self.format_response(item["cot"], item["answer"])

    def encode_text(self, item: Mapping[str, Any], with_policy: bool | None = None) -> Encoded:
        """The chat text and images of one item (no tokenization); with_policy=None: the mode's default."""
        response = self.response(item)
        with_policy = self.mode == "cpt" if with_policy is None else with_policy
        messages, images = self.build_messages(item, with_policy=with_policy, response=response)
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        if self.mode == "cpt":
            return Encoded(text, images, None)
        prompt = self.processor.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        target = response + self.eos_token
        if not text.startswith(prompt) or not text[len(prompt):].startswith(target):
            raise ValueError(
                "the chat template does not render the assistant turn as prompt + response + eos; "
                f"cannot locate the SFT target of item {item.get('id', '?')}")
        return Encoded(text, images, target, text[len(prompt) + len(target):])

    # ------------------------------------------------------------------ batch
    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(items) == 0:
            raise ValueError("SupervisedCollator got an empty batch")
        with_policy = self.shows_policy(items)
        encoded = [self.encode_text(item, with_policy) for item in items]
        images = [img for e in encoded for img in e.images]
        tokenizer = self.processor.tokenizer
        # Right padding: targets sit at the end of each row, so a row's target is the last tokens before padding.
        side, tokenizer.padding_side = tokenizer.padding_side, "right"
        try:
            batch = self.processor(text=[e.text for e in encoded], images=images or None,
                                   return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = side
        lengths = batch["attention_mask"].sum(dim=1)
        if self.max_length is not None and int(lengths.max()) > self.max_length:
            k = int(lengths.argmax())
            raise ValueError(
                f"item {items[k].get('id', '?')} is {int(lengths[k])} tokens, longer than max_length="
                f"{self.max_length}; raise max_length (RunConfig.max_length) or drop long items. Truncation is "
                "not done because it would cut image tokens or the target.")
        batch["labels"] = self.labels(batch["input_ids"], batch["attention_mask"], encoded)
        batch.pop("token_type_ids", None)
        return dict(batch)

    def labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, encoded: Sequence[Encoded]) -> torch.Tensor:
        if self.mode == "cpt":
            labels = input_ids.clone()
            labels[torch.isin(input_ids, self.visual_ids.to(input_ids.device))] = IGNORE_INDEX
            labels[attention_mask == 0] = IGNORE_INDEX
            return labels
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        tokenizer = self.processor.tokenizer
        for row, e in enumerate(encoded):
            n = int(attention_mask[row].sum())
            tail = e.tail_text
            target_ids = tokenizer(e.target_text, add_special_tokens=False)["input_ids"]
            tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
            start, stop = n - len(tail_ids) - len(target_ids), n - len(tail_ids)
            if start < 0 or input_ids[row, start:stop].tolist() != target_ids or input_ids[row, stop:n].tolist() != tail_ids:
                raise ValueError(
                    "the SFT target does not tokenize the same alone as inside the full sequence (a merge across "
                    "the prompt/response boundary); cannot build an exact target mask for this tokenizer")
            labels[row, start:stop] = input_ids[row, start:stop]
        return labels


def describe_labels(processor, batch: Mapping[str, torch.Tensor], row: int = 0) -> list[tuple[str, bool]]:
    """(token, carries_loss) for every non-pad token of one row: what the notebooks draw."""
    ids = batch["input_ids"][row]
    labels = batch["labels"][row]
    keep = batch["attention_mask"][row].bool()
    tokens = [processor.tokenizer.decode([i]) for i in ids[keep].tolist()]
    return [(t, bool(lab != IGNORE_INDEX)) for t, lab in zip(tokens, labels[keep].tolist())]


def mask_summary(processor, batch: Mapping[str, torch.Tensor], row: int = 0) -> dict[str, int]:
    """Counts for one row: tokens, supervised tokens, image-pad tokens, images, vision markers, masked text tokens."""
    tok = processor.tokenizer
    real = batch["attention_mask"][row].bool()
    ids, labels = batch["input_ids"][row][real], batch["labels"][row][real]
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    markers = torch.tensor([tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|vision_end|>")])
    visual = (ids == pad) | torch.isin(ids, markers)
    supervised = labels != IGNORE_INDEX
    return {"tokens": int(real.sum()), "supervised": int(supervised.sum()), "image_pad": int((ids == pad).sum()),
            "images": int((ids == markers[0]).sum()), "supervised_visual": int((supervised & visual).sum()),
            "masked_text": int((~supervised & ~visual).sum())}


def render_loss_mask(pairs: Sequence[tuple[str, bool]], max_tokens: int | None = None, collapse_images: bool = False) -> str:
    """HTML with supervised tokens in green and masked tokens greyed out (struck through)."""
    import html

    out = []
    shown = pairs if max_tokens is None else pairs[:max_tokens]
    run = 0
    for k, (token, supervised) in enumerate(shown):
        if collapse_images and token == "<|image_pad|>":
            run += 1
            nxt = shown[k + 1][0] if k + 1 < len(shown) else None
            if nxt == "<|image_pad|>":
                continue
            token, run = f"<|image_pad|>×{run}", 0
        text = html.escape(token).replace("\n", "\\n<br>")
        style = ("background:#c8f7c5;color:#000" if supervised
                 else "background:#eee;color:#999;text-decoration:line-through")
        out.append(f'<span style="{style};font-family:monospace;white-space:pre-wrap">{text}</span>')
    more = "" if max_tokens is None or len(pairs) <= max_tokens else f" … (+{len(pairs) - max_tokens} tokens)"
    return "<div style='line-height:1.9'>" + "".join(out) + more + "</div>"
