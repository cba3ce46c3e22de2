"""The one place where prompt text is made: every stage builds its chat messages here.

    messages, images = build_messages(item, with_policy=True, response=format_response(item["cot"], item["answer"]))
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    batch = processor(text=[text], images=images or None, return_tensors="pt")

With the policy (training-time teacher view, VM-CPT, PolicyRollout's second half): the policy text,
with each "<image>" replaced in order by one of the item's policy images, then the input images,
then the query. Without it (what is left at inference): only images and query, plus the GTA user
profile and interaction history, which belong to the input, not to the policy. Override items
open with the paper's "Suppose we have an updated Policy:" wording.
"""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image

from .policies import IMAGE_PLACEHOLDER

CLEVR_INSTRUCTION = "Give the final response as \\boxed{Case k}."
GTA_INSTRUCTION = "What is the next tool call? Give it as JSON inside \\boxed{}."
OVERRIDE_PREFIX = "Suppose we have an updated Policy:\n"


def format_response(cot: str | None, answer: str) -> str:
    """CoT: '<think>' + cot + '</think>\\n\\boxed{answer}'; direct (cot None/empty): '\\boxed{answer}'."""
    if cot:
        return "<think>" + cot + "</think>\n\\boxed{" + answer + "}"
    return "\\boxed{" + answer + "}"


def to_pil(image: Any) -> Image.Image:
    """Accept a PIL image, a datasets-style {"bytes": ..., "path": ...} dict, raw bytes or a path."""
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, dict):
        if image.get("bytes"):
            return to_pil(image["bytes"])
        if image.get("path"):
            return to_pil(image["path"])
        raise ValueError("image dict has neither 'bytes' nor 'path'")
    if isinstance(image, (bytes, bytearray)):
        with Image.open(io.BytesIO(image)) as img:
            return img.convert("RGB")
    if isinstance(image, str):
        with Image.open(image) as img:
            return img.convert("RGB")
    raise TypeError(f"cannot turn {type(image).__name__} into an image")


class _Content:
    """Accumulates a Qwen content list, merging neighbouring text pieces."""

    def __init__(self) -> None:
        self.parts: list[dict[str, Any]] = []
        self.images: list[Image.Image] = []

    def text(self, text: str) -> None:
        if not text:
            return
        if self.parts and self.parts[-1]["type"] == "text":
            self.parts[-1]["text"] += text
        else:
            self.parts.append({"type": "text", "text": text})

    def image(self, image: Any) -> None:
        self.parts.append({"type": "image"})
        self.images.append(to_pil(image))


def _policy(content: _Content, item: dict[str, Any]) -> None:
    pieces = item["policy_text"].split(IMAGE_PLACEHOLDER)
    policy_images = list(item.get("policy_images") or [])
    if len(pieces) - 1 != len(policy_images):
        raise ValueError(
            f"item {item.get('id', '?')}: policy_text has {len(pieces) - 1} '{IMAGE_PLACEHOLDER}' placeholders but "
            f"policy_images has {len(policy_images)} images; they must match one to one")
    if item.get("override"):
        content.text(OVERRIDE_PREFIX)
    for k, piece in enumerate(pieces):
        content.text(piece)
        if k < len(policy_images):
            content.image(policy_images[k])
    content.text("\n")


def _gta_input(content: _Content, item: dict[str, Any]) -> None:
    extra = json.loads(item["extra"]) if isinstance(item.get("extra"), str) else (item.get("extra") or {})
    profile = extra.get("profile", {})
    content.text("User profile: " + ", ".join(f"{k} {v}" for k, v in profile.items()) + "\n")
    paths = extra.get("image_paths") or [f"image_{k + 1}" for k in range(len(item["images"]))]
    for path, image in zip(paths, item["images"]):
        content.text(f"{path}:")
        content.image(image)
        content.text("\n")
    history = extra.get("history") or []
    if history:
        content.text("Calls so far:\n")
        for k, h in enumerate(history, 1):
            call = json.dumps({"name": h["name"], "arguments": h["arguments"]}, ensure_ascii=False)
            content.text(f"{k}. {call}\n   Result: {h.get('result', '')}\n")
    content.text(f"Request: {item['query']}\n{GTA_INSTRUCTION}")


def build_messages(
    item: dict[str, Any], *, with_policy: bool, response: str | None = None
) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """Qwen chat messages for one item and its images in placeholder order."""
    content = _Content()
    if with_policy:
        _policy(content, item)
    if item["dataset"] == "gta":
        _gta_input(content, item)
    else:
        for image in item["images"]:
            content.image(image)
        content.text(f"\n{item['query']}\n{CLEVR_INSTRUCTION}")
    messages: list[dict[str, Any]] = [{"role": "user", "content": content.parts}]
    if response is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return messages, content.images
