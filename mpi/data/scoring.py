"""GTAPolicy scoring: overall = 0.5 * tool accuracy + 0.5 * argument score (the paper's metric).

Per argument (mean over the gold call's arguments):
- exact match: image, position, color, k, top1;
- eval() equality: expression (a safe arithmetic evaluator, no builtins, no names but `math`'s);
- IoU: bbox ("(x1, y1, x2, y2)" strings or lists);
- text similarity for everything else: token F1 offline, or any function set with
  `set_text_similarity` (e.g. a sentence-embedding cosine when a user has a model).
Malformed JSON, a missing "name" or "arguments", or any odd value scores 0 and never raises.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections import Counter
from typing import Any, Callable

from .gta import BBOX_ARGS, EVAL_ARGS, EXACT_ARGS

_TEXT_SIMILARITY: Callable[[str, str], float] | None = None


def set_text_similarity(fn: Callable[[str, str], float] | None) -> None:
    """Use a stronger similarity (returns 0..1) for free-text arguments; None restores token F1."""
    global _TEXT_SIMILARITY
    _TEXT_SIMILARITY = fn


def token_f1(pred: str, gold: str) -> float:
    """SQuAD-style token F1 on lower-cased word tokens."""
    p = re.findall(r"\w+", str(pred).lower())
    g = re.findall(r"\w+", str(gold).lower())
    if not p and not g:
        return 1.0
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def text_similarity(pred: str, gold: str) -> float:
    if _TEXT_SIMILARITY is not None:
        try:
            return float(min(1.0, max(0.0, _TEXT_SIMILARITY(str(pred), str(gold)))))
        except Exception:  # a broken similarity model must not crash an RL step
            pass
    return token_f1(pred, gold)


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def safe_eval(expr: str) -> float:
    """Evaluate an arithmetic expression (numbers, + - * / // % **, math.* functions/constants)."""
    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 100:
                raise ValueError("exponent too large")
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
            return _UNOPS[type(node.op)](ev(node.operand))
        if isinstance(node, ast.Call) and not node.keywords:
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) and fn.value.id == "math" \
                else (fn.id if isinstance(fn, ast.Name) else None)
            if name and (name in ("abs", "round", "min", "max") or callable(getattr(math, name, None))):
                f = {"abs": abs, "round": round, "min": min, "max": max}.get(name) or getattr(math, name)
                return f(*[ev(a) for a in node.args])
        if isinstance(node, (ast.Name, ast.Attribute)):
            name = node.attr if isinstance(node, ast.Attribute) else node.id
            if name in ("pi", "e", "tau"):
                return getattr(math, name)
        raise ValueError(f"not allowed in an expression: {ast.dump(node)[:60]}")

    if len(str(expr)) > 500:
        raise ValueError("expression too long")
    return float(ev(ast.parse(str(expr), mode="eval")))


def eval_equal(pred: Any, gold: Any) -> float:
    try:
        return float(math.isclose(safe_eval(pred), safe_eval(gold), rel_tol=1e-6, abs_tol=1e-9))
    except Exception:
        return float(re.sub(r"\s+", "", str(pred)) == re.sub(r"\s+", "", str(gold)))


def parse_bbox(value: Any) -> tuple[float, float, float, float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 4:
        nums = value
    else:
        nums = re.findall(r"-?\d+(?:\.\d+)?", str(value))
        if len(nums) != 4:
            return None
    try:
        x1, y1, x2, y2 = (float(v) for v in nums)
    except (TypeError, ValueError):
        return None
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def bbox_iou(pred: Any, gold: Any) -> float:
    a, b = parse_bbox(pred), parse_bbox(gold)
    if a is None or b is None:
        return 0.0
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    if union <= 0:
        return float(a == b)
    return inter / union


def _exact(pred: Any, gold: Any) -> float:
    if isinstance(gold, bool) or isinstance(pred, bool):
        norm = lambda v: str(v).strip().lower()  # noqa: E731  (true / "true" / True)
        return float(norm(pred) == norm(gold))
    return float(str(pred).strip().lower() == str(gold).strip().lower())


def argument_score(name: str, pred: Any, gold: Any) -> float:
    """The paper's metric for one argument, by argument name."""
    if name in EXACT_ARGS:
        return _exact(pred, gold)
    if name in EVAL_ARGS:
        return eval_equal(pred, gold)
    if name in BBOX_ARGS:
        return bbox_iou(pred, gold)
    return text_similarity(pred, gold)


def _as_call(value: Any) -> dict[str, Any] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, ValueError, RecursionError):
            return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not isinstance(value.get("arguments"), dict):
        return None
    return value


def score_tool_call(pred: Any, gold: Any) -> dict[str, float]:
    """{"tool": 0|1, "args": 0..1, "overall": 0.5 tool + 0.5 args}; never raises.

    `pred` and `gold` are JSON strings or dicts {"name": ..., "arguments": {...}}. Arguments the
    gold call does not have are ignored; a gold argument missing from `pred` scores 0.
    """
    zero = {"tool": 0.0, "args": 0.0, "overall": 0.0}
    try:
        g = _as_call(gold)
        p = _as_call(pred)
        if g is None or p is None:
            return zero
        tool = float(p["name"].strip() == g["name"].strip())
        gargs, pargs = g["arguments"], p["arguments"]
        if gargs:
            args = sum(argument_score(k, pargs[k], v) if k in pargs else 0.0 for k, v in gargs.items()) / len(gargs)
        else:
            args = float(not pargs)
        return {"tool": tool, "args": float(args), "overall": 0.5 * tool + 0.5 * float(args)}
    except Exception:
        return zero
