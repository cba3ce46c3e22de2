"""Rewards for PolicyRollout GRPO: outcome accuracy and response format, combined with weights.

Every parser here takes whatever a model wrote, including garbage, empty strings or None, and
returns a value; nothing raises on model output (a crash mid-run would lose the step).

    parse_boxed("<think>...</think>\\n\\boxed{Case 3}")   -> "Case 3"
    format_reward("<think>a</think>\\n\\boxed{Case 3}")    -> 1.0
    accuracy_reward(item, text)   ClevrPolicy: exact match of the boxed outcome; GTAPolicy: tool-call score
    combined_rewards(items, texts, accuracy_weight=0.9, format_weight=0.1)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

BOXED = "\\boxed{"
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


def parse_boxed(text: Any) -> str | None:
    """Content of the last \\boxed{...}, braces matched (so JSON inside survives); None if absent.

    The last one counts, as in math graders: a model that revises its answer means the final one.
    An unclosed \\boxed{ gives None.
    """
    if not isinstance(text, str):
        return None
    start = text.rfind(BOXED)
    while start != -1:
        content = _match_braces(text, start + len(BOXED))
        if content is not None:
            return content
        start = text.rfind(BOXED, 0, start)  # an unclosed last box: try an earlier complete one
    return None


def _match_braces(text: str, pos: int) -> str | None:
    depth = 1
    for i in range(pos, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[pos:i]
    return None


def _boxed_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every complete \\boxed{...} in order; end is one past the closing brace."""
    spans, pos = [], 0
    while True:
        start = text.find(BOXED, pos)
        if start == -1:
            return spans
        content = _match_braces(text, start + len(BOXED))
        if content is None:
            return spans
        end = start + len(BOXED) + len(content) + 1
        spans.append((start, end))
        pos = end


def format_reward(text: Any) -> float:
    """1.0 for `<think>...</think>` then `\\boxed{...}` and nothing else, else 0.0.

    Exactly one <think>, one </think>, one complete \\boxed{}; the text starts with <think> (leading
    whitespace allowed), the box comes after </think>, and only whitespace follows the box.
    """
    if not isinstance(text, str):
        return 0.0
    body = text.strip()
    if not body.startswith(_THINK_OPEN) or body.count(_THINK_OPEN) != 1 or body.count(_THINK_CLOSE) != 1:
        return 0.0
    close = body.index(_THINK_CLOSE)
    spans = _boxed_spans(body)
    if len(spans) != 1 or body.count(BOXED) != 1:
        return 0.0
    start, end = spans[0]
    if start < close + len(_THINK_CLOSE) or body[end:].strip():
        return 0.0
    return 1.0


def normalize_answer(text: str | None) -> str:
    """Whitespace-collapsed, case-folded answer for exact match ("case  3 " == "Case 3")."""
    return re.sub(r"\s+", " ", text or "").strip().casefold()


def clevr_accuracy(prediction: str | None, gold: str) -> float:
    if prediction is None:
        return 0.0
    return float(normalize_answer(prediction) == normalize_answer(gold))


def gta_accuracy(prediction: str | None, gold: str) -> float:
    """GTAPolicy's score (0.5 tool accuracy + 0.5 argument score) from the data module's scorer."""
    if prediction is None:
        return 0.0
    from mpi.data.scoring import score_tool_call

    try:
        score = score_tool_call(prediction, gold)
    except Exception:  # noqa: BLE001 - a scorer bug on odd model output must not end the run
        return 0.0
    if isinstance(score, Mapping):
        score = score.get("overall", 0.0)
    try:
        score = float(score)
    except (TypeError, ValueError):
        return 0.0
    # NaN would poison every advantage of its group; the scorer promises [0, 1], this keeps the promise here too
    return min(1.0, max(0.0, score)) if math.isfinite(score) else 0.0


def accuracy_reward(item: Mapping[str, Any], text: Any) -> float:
    """Outcome reward of one completion for one data item (see the module docstring)."""
    dataset = item.get("dataset")
    prediction = parse_boxed(text)
    if dataset == "clevr":
        return clevr_accuracy(prediction, item["answer"])
    if dataset == "gta":
        return gta_accuracy(prediction, item["answer"])
    raise ValueError(f"item['dataset'] must be 'clevr' or 'gta', got {dataset!r} (item id {item.get('id')!r})")


@dataclass
class RewardWeights:
    """reward = accuracy_weight * accuracy + format_weight * format (the paper gives no weights;
    0.9 / 0.1 keeps the outcome dominant while a format failure still costs something)."""

    accuracy_weight: float = 0.9
    format_weight: float = 0.1


def combined_rewards(items: Sequence[Mapping[str, Any]], texts: Sequence[str],
                     weights: RewardWeights | None = None) -> dict[str, list[float]]:
    """Per completion: {"accuracy": [...], "format": [...], "reward": [...]}; items[i] goes with texts[i]."""
    weights = weights or RewardWeights()
    if len(items) != len(texts):
        raise ValueError(f"combined_rewards: {len(items)} items but {len(texts)} texts; pass one item per completion")
    acc = [accuracy_reward(item, text) for item, text in zip(items, texts)]
    fmt = [format_reward(text) for text in texts]
    total = [weights.accuracy_weight * a + weights.format_weight * f for a, f in zip(acc, fmt)]
    return {"accuracy": acc, "format": fmt, "reward": total}
