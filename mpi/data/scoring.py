"""GTAPolicy scoring: overall = 0.5 * tool accuracy + 0.5 * argument score (the paper's metric).

Per argument (mean over the gold call's arguments):
- exact match: image, position, color, k, top1;
- eval() equality: expression, computed by `safe_eval`, an AST evaluator (numbers, + - * / // % **,
  unary +/-, parentheses, a whitelist of `math` functions and constants) with an operation and
  magnitude budget, so no model output can run code or make the scorer hang;
- IoU: bbox ("(x1, y1, x2, y2)" strings or lists);
- text similarity for everything else: token F1 offline, or any function set with
  `set_text_similarity` (e.g. a sentence-embedding cosine when a user has a model).

An optional argument that the prediction omits counts as given with the called tool's default
(`mpi.data.gta.TOOL_BY_NAME[...].args[...].default`): `{"query": "x"}` equals `{"query": "x", "k": 10}`.
A non-finite number (NaN, inf) anywhere in a predicted argument scores 0 for that argument.
Malformed JSON, a missing "name" or "arguments", or any odd value scores 0 and never raises; every
score is a finite number in [0, 1].
"""

from __future__ import annotations

import ast
import functools
import json
import math
import operator
import re
from collections import Counter
from typing import Any, Callable

_TEXT_SIMILARITY: Callable[[str, str], float] | None = None

# Budgets of the expression evaluator. Each is far above what an arithmetic tool call needs and far
# below what takes the scorer more than a few milliseconds.
MAX_EXPRESSION_CHARS = 500
MAX_EVAL_NODES = 400  # AST nodes evaluated per expression
MAX_INT_BITS = 10_000  # ~3000 decimal digits; a product of two such ints costs microseconds
MAX_FLOAT = 1e308  # larger or non-finite intermediate results are refused
MAX_COMBINATORIC_ARG = 1000  # factorial(1000) has 2568 digits; comb/perm(n, k) need n <= this
MAX_ROUND_DIGITS = 400  # round(x, n) with a huge |n| builds 10**n
MAX_TEXT_CHARS = 100_000  # free text beyond this is cut before token F1 (a linear-time guard)


def set_text_similarity(fn: Callable[[str, str], float] | None) -> None:
    """Use a stronger similarity (returns 0..1) for free-text arguments; None restores token F1."""
    global _TEXT_SIMILARITY
    _TEXT_SIMILARITY = fn


def token_f1(pred: str, gold: str) -> float:
    """SQuAD-style token F1 on lower-cased word tokens."""
    p = re.findall(r"\w+", str(pred)[:MAX_TEXT_CHARS].lower())
    g = re.findall(r"\w+", str(gold)[:MAX_TEXT_CHARS].lower())
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
            value = float(_TEXT_SIMILARITY(str(pred), str(gold)))
            if math.isfinite(value):
                return min(1.0, max(0.0, value))
        except Exception:  # a broken similarity model must not crash an RL step
            pass
    return token_f1(pred, gold)


# ----------------------------------------------------------------------------- expressions
class ExpressionError(ValueError):
    """An expression that the evaluator refuses: not arithmetic, or over a budget."""


def _check_number(value: Any) -> int | float:
    """Refuse complex numbers, non-finite floats and oversized values (the magnitude budget)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ExpressionError(f"not a real number: {type(value).__name__}")
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise ExpressionError(f"integer over {MAX_INT_BITS} bits")
    elif not math.isfinite(value) or abs(value) > MAX_FLOAT:
        raise ExpressionError("float result is not finite or over 1e308")
    return value


def _power(base: int | float, exponent: int | float) -> int | float:
    # Decide from the sizes alone whether the result fits, before Python spends minutes on it.
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent * math.log2(abs(base)) > MAX_INT_BITS:
            raise ExpressionError("power over the integer budget")
        return base**exponent
    if abs(exponent) > 1e6 and abs(base) not in (0, 1):
        raise ExpressionError("exponent too large")
    try:
        result = float(base) ** float(exponent) if isinstance(base, float) or isinstance(exponent, float) \
            else base**exponent  # int ** (negative or 0) is a float or 1: cheap
    except OverflowError as exc:
        raise ExpressionError("power overflows") from exc
    return result


def _combinatoric(fn: Callable[..., int]) -> Callable[..., int]:
    def guarded(*args: Any) -> int:
        if any(not isinstance(a, int) or abs(a) > MAX_COMBINATORIC_ARG for a in args):
            raise ExpressionError(f"{fn.__name__} needs integer arguments up to {MAX_COMBINATORIC_ARG}")
        return fn(*args)
    return guarded


def _round(x: int | float, ndigits: int | None = None) -> int | float:
    if ndigits is not None and (not isinstance(ndigits, int) or abs(ndigits) > MAX_ROUND_DIGITS):
        raise ExpressionError(f"round() digits beyond {MAX_ROUND_DIGITS}")
    return round(x) if ndigits is None else round(x, ndigits)


def _int_op(fn: Callable[..., int]) -> Callable[..., int]:
    """gcd/lcm/isqrt take only ints (inputs are already within the integer budget)."""
    def guarded(*args: Any) -> int:
        if any(not isinstance(a, int) for a in args):
            raise ExpressionError(f"{fn.__name__.lstrip('_')} needs integers")
        return fn(*args)
    return guarded


def _lcm(*args: int) -> int:
    # Pairwise, checking the budget after each step: lcm of many big ints grows without bound.
    result = 1
    for a in args:
        result = _check_number(math.lcm(result, a))
    return result


# Float functions run in microseconds on any in-budget input; the int-valued ones are guarded.
_FLOAT_FUNCS = ("sqrt", "exp", "expm1", "log", "log10", "log2", "log1p", "sin", "cos", "tan", "asin", "acos",
                "atan", "atan2", "sinh", "cosh", "tanh", "asinh", "acosh", "atanh", "degrees", "radians",
                "floor", "ceil", "trunc", "fabs", "hypot", "pow", "fmod", "copysign", "erf", "erfc",
                "gamma", "lgamma", "cbrt", "exp2", "dist", "fsum", "prod")
FUNCTIONS: dict[str, Callable[..., Any]] = {name: getattr(math, name) for name in _FLOAT_FUNCS if hasattr(math, name)}
FUNCTIONS.update({
    "factorial": _combinatoric(math.factorial), "comb": _combinatoric(math.comb), "perm": _combinatoric(math.perm),
    "gcd": _int_op(math.gcd), "lcm": _int_op(_lcm), "isqrt": _int_op(math.isqrt),
    "abs": abs, "round": _round, "min": min, "max": max,
})
FUNCTIONS.pop("fsum", None)  # take iterables, which the grammar has no way to build
FUNCTIONS.pop("prod", None)
FUNCTIONS.pop("dist", None)
CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _power}
_UNOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _name_of(node: ast.AST) -> str | None:
    """`name` or `math.name`; anything else (attributes of other objects, subscripts) is None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "math":
        return node.attr
    return None


def safe_eval(expr: Any) -> float:
    """Evaluate an arithmetic expression (numbers, + - * / // % **, math.* functions/constants).

    Raises ExpressionError (a ValueError) for anything else or anything over a budget: an
    expression longer than MAX_EXPRESSION_CHARS, more than MAX_EVAL_NODES nodes, integers over
    MAX_INT_BITS bits, floats beyond 1e308 or non-finite, factorial/comb/perm beyond
    MAX_COMBINATORIC_ARG. Each check comes before the costly operation, so this returns in
    milliseconds on any input.
    """
    text = expr if isinstance(expr, str) else str(expr)
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError("expression too long")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ExpressionError(f"not a Python expression: {exc}") from exc
    budget = [MAX_EVAL_NODES]

    def ev(node: ast.AST) -> int | float:
        budget[0] -= 1
        if budget[0] < 0:
            raise ExpressionError("expression has too many operations")
        if isinstance(node, ast.Constant):
            return _check_number(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            return _check_number(_BINOPS[type(node.op)](left, right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
            return _check_number(_UNOPS[type(node.op)](ev(node.operand)))
        if isinstance(node, ast.Call) and not node.keywords:
            name = _name_of(node.func)
            if name in FUNCTIONS and not any(isinstance(a, ast.Starred) for a in node.args):
                return _check_number(FUNCTIONS[name](*[ev(a) for a in node.args]))
        name = _name_of(node) if isinstance(node, (ast.Name, ast.Attribute)) else None
        if name in CONSTANTS:
            return CONSTANTS[name]
        raise ExpressionError(f"not allowed in an expression: {type(node).__name__}")

    try:
        return float(ev(tree.body))
    except ExpressionError:
        raise
    except (ArithmeticError, TypeError, ValueError, RecursionError, MemoryError) as exc:
        # 1/0, math.sqrt(-1), math.log(0), wrong arity, int too large for a float, ...
        raise ExpressionError(f"cannot evaluate: {type(exc).__name__}: {exc}") from exc


def eval_equal(pred: Any, gold: Any) -> float:
    """1.0 if both expressions evaluate to the same number (rel 1e-6); else whitespace-free text equality."""
    try:
        return float(math.isclose(safe_eval(pred), safe_eval(gold), rel_tol=1e-6, abs_tol=1e-9))
    except ExpressionError:
        return float(re.sub(r"\s+", "", str(pred)[:MAX_TEXT_CHARS]) == re.sub(r"\s+", "", str(gold)[:MAX_TEXT_CHARS]))


# ----------------------------------------------------------------------------- boxes, exact, text
def parse_bbox(value: Any) -> tuple[float, float, float, float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 4:
        nums = value
    else:
        nums = re.findall(r"-?\d+(?:\.\d+)?", str(value)[:1000])  # a box is short; a long string is not one
        if len(nums) != 4:
            return None
    try:
        x1, y1, x2, y2 = (float(v) for v in nums)
    except (TypeError, ValueError, OverflowError):
        return None
    if not all(math.isfinite(c) and abs(c) < 1e150 for c in (x1, y1, x2, y2)):  # areas must stay finite
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
    # true / "true" / True and 10 / "10" compare equal, as the paper's string match of JSON values does
    return float(str(pred).strip().lower() == str(gold).strip().lower())


def _has_non_finite(value: Any, depth: int = 0) -> bool:
    """NaN or inf anywhere in a (nested) value; too-deep nesting counts as bad too."""
    if depth > 20:
        return True
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v, depth + 1) for v in value)
    return False


@functools.lru_cache(maxsize=1)
def _arg_kinds() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    from .gta import BBOX_ARGS, EVAL_ARGS, EXACT_ARGS  # lazy: gta may one day import the scorer

    return tuple(EXACT_ARGS), tuple(EVAL_ARGS), tuple(BBOX_ARGS)


def argument_score(name: str, pred: Any, gold: Any) -> float:
    """The paper's metric for one argument, by argument name: a finite number in [0, 1], never raises."""
    try:
        if _has_non_finite(pred):
            return 0.0
        exact_args, eval_args, bbox_args = _arg_kinds()
        if name in exact_args:
            score = _exact(pred, gold)
        elif name in eval_args:
            score = eval_equal(pred, gold)
        elif name in bbox_args:
            score = bbox_iou(pred, gold)
        else:
            score = text_similarity(pred, gold)
        score = float(score)
    except Exception:  # e.g. str() of a 5000-digit int or of a self-referencing list
        return 0.0
    return min(1.0, max(0.0, score)) if math.isfinite(score) else 0.0


_VERSION_SUFFIX = re.compile(r"_v\d+$")


def tool_default(call_name: str, arg_name: str) -> tuple[bool, Any]:
    """(True, default) if the tool called `call_name` (versions stripped) has `arg_name` as an optional argument."""
    from .gta import TOOL_BY_NAME  # lazy, as above

    tool = TOOL_BY_NAME.get(_VERSION_SUFFIX.sub("", call_name.strip()))
    for arg in tool.args if tool is not None else ():
        if arg.name == arg_name and not arg.required:
            return True, arg.default
    return False, None


def _as_call(value: Any) -> dict[str, Any] | None:
    if isinstance(value, (bytes, bytearray)):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError, MemoryError):  # JSONDecodeError is a ValueError
            return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not isinstance(value.get("arguments"), dict):
        return None
    return value


def _predicted_value(pred_call: dict[str, Any], arg_name: str) -> tuple[bool, Any]:
    """The value the called tool would see: the given one, or its default when omitted."""
    if arg_name in pred_call["arguments"]:
        return True, pred_call["arguments"][arg_name]
    return tool_default(pred_call["name"], arg_name)


def score_tool_call(pred: Any, gold: Any) -> dict[str, float]:
    """{"tool": 0|1, "args": 0..1, "overall": 0.5 tool + 0.5 args}; never raises, always finite.

    `pred` and `gold` are JSON strings or dicts {"name": ..., "arguments": {...}}. Arguments the
    gold call does not have are ignored; a gold argument missing from `pred` scores 0, unless the
    called tool has it as an optional argument, whose default is then scored in its place.
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
            total = 0.0
            for k, v in gargs.items():
                given, value = _predicted_value(p, str(k))
                total += argument_score(str(k), value, v) if given else 0.0
            args = total / len(gargs)
        else:
            args = float(not pargs)
        if not math.isfinite(args):
            args = 0.0
        args = min(1.0, max(0.0, args))
        return {"tool": tool, "args": float(args), "overall": 0.5 * tool + 0.5 * float(args)}
    except Exception:
        return zero
