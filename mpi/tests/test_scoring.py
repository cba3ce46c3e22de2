"""GTAPolicy scorer: hand-computed scores, optional-argument defaults, non-finite numbers, a bounded
expression evaluator on hostile inputs, and a fuzz of junk that must never raise or give NaN."""

from __future__ import annotations

import json
import math
import random
import time

import pytest

from mpi.data.gta import TOOL_BY_NAME
from mpi.data.scoring import ExpressionError, safe_eval, score_tool_call, set_text_similarity
from mpi.rewards import gta_accuracy


def calc(expression):
    return {"name": "Calculator", "arguments": {"expression": expression}}


def _finite_unit(score: dict) -> bool:
    return set(score) == {"tool", "args", "overall"} and all(
        isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0 for v in score.values())


# ----------------------------------------------------------------------------- normal calls
@pytest.mark.parametrize("pred, gold", [
    ("2**10", "1024"), ("math.sqrt(16) + math.pi", "4 + pi"), ("math.factorial(5)", "120"), ("7 // 2", "3"),
    ("7 % 4", "3"), ("-(2 - 5) * 1.5", "4.5"), ("round(2.675, 1) + abs(-1)", "3.7"), ("math.comb(5, 2)", "10"),
    ("math.log(math.e ** 2)", "2"), ("(1 + 2) / 4", "0.75"),
])
def test_expression_equality_by_value(pred, gold):
    assert score_tool_call(calc(pred), calc(gold)) == {"tool": 1.0, "args": 1.0, "overall": 1.0}


def test_expression_mismatch_and_text_fallback():
    assert score_tool_call(calc("3.5 + 2"), calc("5.75"))["args"] == 0.0
    # neither side evaluates (division by zero): whitespace-free text equality decides
    assert score_tool_call(calc("1 / 0"), calc("1/0"))["args"] == 1.0
    assert score_tool_call(calc("1/0"), calc("2"))["args"] == 0.0
    # names other than math's are refused, never looked up
    assert score_tool_call(calc("__import__('os').getcwd()"), calc("5"))["args"] == 0.0
    with pytest.raises(ExpressionError):
        safe_eval("open('x')")
    with pytest.raises(ExpressionError):
        safe_eval("(1).__class__")


def test_hand_computed_search_call():
    gold = {"name": "GoogleSearch_v2", "arguments": {"query": "weather in Paris", "k": 5}}
    # query F1: pred {paris, weather}, gold {weather, in, paris}: P = 1, R = 2/3, F1 = 0.8; k "5" == 5
    pred = {"name": "GoogleSearch_v2", "arguments": {"query": "Paris weather", "k": "5"}}
    assert score_tool_call(pred, gold) == pytest.approx({"tool": 1.0, "args": 0.9, "overall": 0.95})
    wrong = {"name": "GoogleSearch_v1", "arguments": {"query": "Paris weather", "k": 3}}
    assert score_tool_call(wrong, gold) == pytest.approx({"tool": 0.0, "args": 0.4, "overall": 0.2})


# ----------------------------------------------------------------------------- defaults
def _default(tool: str, arg: str):
    (value,) = [a.default for a in TOOL_BY_NAME[tool].args if a.name == arg and not a.required]
    return value


def test_omitted_optional_argument_equal_to_default_counts_as_given():
    k = _default("GoogleSearch", "k")
    gold = {"name": "GoogleSearch_v1", "arguments": {"query": "paris weather", "k": k}}
    bare = {"name": "GoogleSearch_v1", "arguments": {"query": "paris weather"}}
    assert score_tool_call(bare, gold) == {"tool": 1.0, "args": 1.0, "overall": 1.0}
    # a gold value other than the default: omitting it is wrong (query 1, k 0)
    other = {"name": "GoogleSearch_v1", "arguments": {"query": "paris weather", "k": k + 1}}
    assert score_tool_call(bare, other)["args"] == 0.5
    for tool, required, optional in [("TextToBbox", {"image": "image/image_1.png", "text": "red cube"}, "top1"),
                                     ("DrawBox", {"image": "image/image_1.png", "bbox": "(0, 0, 4, 4)"}, "annotation"),
                                     ("AddText", {"image": "image/image_1.png", "text": "hi", "position": "lt"}, "color")]:
        gold = {"name": tool, "arguments": {**required, optional: _default(tool, optional)}}
        assert score_tool_call({"name": tool, "arguments": required}, gold)["args"] == 1.0, tool


def test_required_or_foreign_arguments_get_no_default():
    gold = {"name": "GoogleSearch_v1", "arguments": {"query": "paris weather", "k": 10}}
    # OCR has no optional k: the default belongs to the tool that was called
    assert score_tool_call({"name": "OCR_v1", "arguments": {"query": "paris weather"}}, gold) == \
        {"tool": 0.0, "args": 0.5, "overall": 0.25}
    # a required argument (image) has no default
    box_gold = {"name": "TextToBbox", "arguments": {"image": "image/image_1.png", "text": "red cube", "top1": True}}
    assert score_tool_call({"name": "TextToBbox", "arguments": {"text": "red cube"}}, box_gold)["args"] == \
        pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- non-finite numbers
def test_non_finite_numbers_score_zero_for_their_argument():
    gold = {"name": "RegionAttributeDescription_v1",
            "arguments": {"image": "image/image_7.png", "bbox": "(0, 0, 10, 10)", "attribute": "color"}}
    for bad_box in ([0, 0, math.nan, 10], [0, 0, math.inf, 10], [-math.inf, 0, 10, 10], [0, 0, 1e300, 1e300]):
        pred = {"name": gold["name"], "arguments": dict(gold["arguments"], bbox=bad_box)}
        assert score_tool_call(pred, gold) == pytest.approx({"tool": 1.0, "args": 2 / 3, "overall": 5 / 6})
    # the same through JSON, which accepts NaN / Infinity literals
    text = '{"name": "GoogleSearch_v1", "arguments": {"query": NaN, "k": Infinity}}'
    assert score_tool_call(text, {"name": "GoogleSearch_v1", "arguments": {"query": "nan", "k": "inf"}}) == \
        {"tool": 1.0, "args": 0.0, "overall": 0.5}  # str(nan) == "nan" would have matched without the guard
    assert score_tool_call(calc(math.nan), calc("nan"))["args"] == 0.0
    assert gta_accuracy('{"name": "OCR_v1", "arguments": {"image": NaN}}', '{"name": "OCR_v1", "arguments": {"image": "nan"}}') == 0.5


def test_broken_text_similarity_falls_back_to_token_f1():
    gold = {"name": "ImageStylization_v1", "arguments": {"image": "a", "instruction": "make it blue"}}
    try:
        for broken in (lambda a, b: math.nan, lambda a, b: 1 / 0, lambda a, b: "x"):
            set_text_similarity(broken)
            # image exact (1), instruction F1("make it blue", "make it blue") = 1
            assert score_tool_call(gold, gold)["overall"] == 1.0
    finally:
        set_text_similarity(None)


# ----------------------------------------------------------------------------- hostile expressions
HOSTILE = [
    "(((10**100)**100)**100)**100", "math.comb(10**7, 5*10**6)", "math.factorial(10**6)", "10**10**10",
    "9**9**9**9", "2**9999 * 2**9999", "math.perm(10**6)", "round(1.5, 10**9)", "1**(10**3000)",
    "math.lcm(" + ",".join(f"2**9999-{i}" for i in range(1, 35)) + ")", "math.exp(1000)", "(-8)**(1/3)",
    "math.isqrt(10**3000)", "1e308 * 10", "-" * 499 + "1", "(" * 150 + "1" + ")" * 150, "9" * 499,
    "max(" + ",".join(["2**9999"] * 40) + ")", "math.pow(10, 400)", "math.gamma(500)", "1" + "+1" * 249,
    "x" * 10**6, "((2**99)**99)", "math.factorial(1000) * math.factorial(1000)",
]


@pytest.mark.parametrize("expression", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_expressions_return_finite_quickly(expression):
    start = time.perf_counter()
    score = score_tool_call(calc(expression), calc("5"))
    elapsed = time.perf_counter() - start
    assert _finite_unit(score) and score["tool"] == 1.0 and score["args"] == 0.0
    assert elapsed < 1.0, f"{expression[:40]!r} took {elapsed:.2f}s"  # a hang guard, not a speed target


# ----------------------------------------------------------------------------- fuzz
def _junk(rng: random.Random, depth: int = 0):
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([0, -1, 10**30, 10**5000, True, False])  # str(10**5000) raises in Python >= 3.11
    if kind == 2:
        return rng.choice([math.nan, math.inf, -math.inf, 1e308, -0.0, 2.5])
    if kind == 3:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(40)))
    if kind == 4:
        return rng.choice(["{", "}" * 3, "\\boxed{", "NaN", "(0, 0, nan, 1)", "[1,2,3,4]", "2**" * 100 + "2"])
    if kind == 5:
        return "word " * rng.choice([1, 1000, 40_000])  # up to 200 kB of text (past the 100k-char cut)
    if kind == 6:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(20)))
    if kind == 7:
        return rng.choice(["OCR_v1", "GoogleSearch_v9", "TextToBbox", "", " Calculator "])
    if kind == 8:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(5))]
    if kind == 9:
        return {rng.choice(["image", "k", "", "x" * 50]): _junk(rng, depth + 1) for _ in range(rng.randrange(4))}
    if kind == 10:
        return {"name": _junk(rng, depth + 1), "arguments": _junk(rng, depth + 1)}
    args = {k: _junk(rng, depth + 1) for k in rng.sample(["image", "bbox", "expression", "k", "top1", "query",
                                                          "text", "annotation"], rng.randrange(1, 4))}
    return {"name": rng.choice(["GoogleSearch_v1", "TextToBbox", "Calculator", "DrawBox", 7]), "arguments": args}


def _to_json(value) -> str:
    try:
        return json.dumps(value, default=repr)
    except (ValueError, RecursionError):  # a 5000-digit int, a self-referencing list
        return "{junk"


def test_fuzz_never_raises_and_stays_finite():
    rng = random.Random(13)
    loop = []
    loop.append(loop)  # a self-referencing list: str() and traversal must not recurse forever
    golds = [calc("3.5 + 2.25"), {"name": "GoogleSearch_v1", "arguments": {"query": "paris", "k": 10}},
             {"name": "TextToBbox", "arguments": {"image": "image/image_1.png", "text": "cube", "top1": True}},
             {"name": "DrawBox", "arguments": {"image": "a", "bbox": "(1, 2, 3, 4)", "annotation": ""}}]
    cases = [(loop, golds[0]), ({"name": "Calculator", "arguments": {"expression": loop}}, golds[0]),
             (b'{"name": "OCR_v1", "arguments": {}}', golds[0]), (golds[1], loop)]
    for _ in range(400):
        junk = _junk(rng)
        cases.append((junk, rng.choice(golds)))
        cases.append((rng.choice(golds), junk))  # a broken gold must not raise either
        cases.append((_to_json(junk) if rng.random() < 0.3 else junk, junk))
    start = time.perf_counter()
    for pred, gold in cases:
        score = score_tool_call(pred, gold)
        assert _finite_unit(score), (pred, gold, score)
        reward = gta_accuracy(pred if isinstance(pred, str) else _to_json(pred),
                              gold if isinstance(gold, str) else _to_json(gold))
        assert math.isfinite(reward) and 0.0 <= reward <= 1.0
    assert time.perf_counter() - start < 30.0  # hang guard over ~1200 cases
