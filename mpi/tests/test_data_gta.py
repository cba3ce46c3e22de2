"""GTAPolicy: the scorer on hand-written cases, the OCR rule, items, the rule override and determinism.

The rule-by-rule checks of the paper's 24 rules are in test_gta_rules.py."""

from __future__ import annotations

import json

import pytest

from mpi.data import Rulebook, build_gta_policy, build_messages, get_data_config, override_rulebook, score_tool_call
from mpi.data.gta import TOOLS, gta_records
from mpi.data.build import dataset_fingerprint
from mpi.data.clevr import make_rng

GOLD_REGION = {"name": "RegionAttributeDescription_v1",
               "arguments": {"image": "image/image_7.png", "bbox": "(0, 0, 10, 10)", "attribute": "color"}}


def test_score_exact_and_partial():
    assert score_tool_call(json.dumps(GOLD_REGION), GOLD_REGION) == {"tool": 1.0, "args": 1.0, "overall": 1.0}
    wrong_version = dict(GOLD_REGION, name="RegionAttributeDescription_v2")
    assert score_tool_call(wrong_version, GOLD_REGION) == {"tool": 0.0, "args": 1.0, "overall": 0.5}
    # half the box (IoU 50/100), right image, attribute "the color" vs "color": P=1/2, R=1 -> F1 2/3
    partial = {"name": "RegionAttributeDescription_v1",
               "arguments": {"image": "image/image_7.png", "bbox": [0, 0, 10, 5], "attribute": "the color"}}
    s = score_tool_call(partial, GOLD_REGION)
    assert s["tool"] == 1.0
    assert s["args"] == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    assert s["overall"] == pytest.approx(0.5 + 0.5 * (1 + 0.5 + 2 / 3) / 3)
    # a missing gold argument scores 0 for that argument; extra arguments are ignored
    missing = {"name": "RegionAttributeDescription_v1", "arguments": {"image": "image/image_7.png", "extra": 1}}
    assert score_tool_call(missing, GOLD_REGION)["args"] == pytest.approx(1 / 3)


def test_score_expression_eval_equality_and_exact_args():
    gold = {"name": "Calculator", "arguments": {"expression": "3.50 + 2.25"}}
    assert score_tool_call({"name": "Calculator", "arguments": {"expression": "2.25+3.5"}}, gold)["overall"] == 1.0
    assert score_tool_call({"name": "Calculator", "arguments": {"expression": "3.5 + 2"}}, gold)["args"] == 0.0
    # never executes anything but arithmetic
    evil = {"name": "Calculator", "arguments": {"expression": "__import__('os').getcwd()"}}
    assert score_tool_call(evil, gold) == {"tool": 1.0, "args": 0.0, "overall": 0.5}
    gold_box = {"name": "TextToBbox", "arguments": {"image": "image/image_1.png", "text": "red cube", "top1": True}}
    pred = {"name": "TextToBbox", "arguments": {"image": "image/image_2.png", "text": "cube", "top1": "true"}}
    # image wrong (0), text F1("cube","red cube") = 2*1*0.5/1.5 = 2/3, top1 "true" == True (1)
    assert score_tool_call(pred, gold_box)["args"] == pytest.approx((0 + 2 / 3 + 1) / 3)


@pytest.mark.parametrize("bad", ["not json", "{\"name\": \"OCR_v1\"}", None, 42, "[]", "{\"name\": 3, \"arguments\": {}}",
                                 "{\"name\": \"OCR_v1\", \"arguments\": [1]}", "{" * 5000])
def test_malformed_scores_zero_and_never_raises(bad):
    gold = {"name": "OCR_v1", "arguments": {"image": "image/image_1.png"}}
    assert score_tool_call(bad, gold) == {"tool": 0.0, "args": 0.0, "overall": 0.0}
    assert score_tool_call(gold, bad) == {"tool": 0.0, "args": 0.0, "overall": 0.0}


def _paper_ocr(p):  # the reference notes' OCR rule, written out independently
    if p["credits"] <= 250:
        return "OCR_v5"
    if p["credits"] <= 750:
        return "OCR_v4" if p["account_type"] in ("A", "B") else "OCR_v3"
    return "OCR_v2" if p["age"] < 21 else "OCR_v1"


@pytest.mark.parametrize("profile", [
    {"account_type": "A", "credits": 250, "age": 40}, {"account_type": "C", "credits": 251, "age": 40},
    {"account_type": "B", "credits": 751, "age": 20}, {"account_type": "D", "credits": 751, "age": 21},
    {"account_type": "B", "credits": 600, "age": 70}, {"account_type": "D", "credits": 0, "age": 13},
])
def test_ocr_rule_is_the_papers(profile):
    assert Rulebook("x").version("OCR", profile) == _paper_ocr(profile)


def test_items_are_consistent():
    ds = build_gta_policy(get_data_config("toy", n_gta_train=32), "train")
    names = {n for t in TOOLS for n in t.call_names()}
    tasks = set()
    for item in ds:
        extra = json.loads(item["extra"])
        tasks.add(extra["task"])
        gold = json.loads(item["answer"])
        assert gold["name"] in names
        assert len(item["images"]) == len(extra["image_paths"]) >= 1
        if "image" in gold["arguments"]:
            assert gold["arguments"]["image"] in extra["image_paths"]
        if gold["name"].startswith("OCR_"):
            assert gold["name"] == _paper_ocr(extra["profile"])
        if gold["name"].startswith("RegionAttributeDescription"):
            assert extra["history"] and extra["history"][0]["name"] == "TextToBbox"
            assert gold["arguments"]["bbox"] == extra["history"][0]["result"]
        assert score_tool_call(item["answer"], gold)["overall"] == 1.0
        messages, images = build_messages(item, with_policy=False)
        text = "".join(p.get("text", "") for p in messages[0]["content"])
        assert len(images) == len(item["images"]) and item["query"] in text and "## Rules" not in text
        assert all(path in text for path in extra["image_paths"])
    assert {"ocr", "mathocr", "count", "region", "receipt", "search", "solve"} <= tasks


def test_rule_override_is_the_papers_permutation():
    base = Rulebook("GTA-X")
    new = override_rulebook(base, make_rng(0, "t"))  # the rng is accepted and unused: the permutation is fixed
    # the paper's Figure 10: OCR's five branches get v1..v5 instead of v5..v1, conditions unchanged
    assert [v for _, v in base.branches("OCR")] == [5, 4, 3, 2, 1]
    assert [v for _, v in new.branches("OCR")] == [1, 2, 3, 4, 5]
    assert [r.when.text for r in new.rules] == [r.when.text for r in base.rules]
    assert new.render_text() != base.render_text() and new.name == base.name
    over = gta_records(14, split="override", seed=0, image_size=56, override=True)
    for rec in over:
        extra = json.loads(rec["extra"])
        gold = json.loads(rec["answer"])
        tool = gold["name"].split("_v")[0]
        assert rec["override"] and gold["name"] == new.version(tool, extra["profile"])
        assert gold["name"] != base.version(tool, extra["profile"])  # override items tell the two policies apart
        assert rec["policy_text"] == override_rulebook(Rulebook(rec["policy_name"])).render_text()


def test_built_split_is_byte_identical_for_the_same_seed():
    cfg = get_data_config("toy", n_gta_train=10)
    a, b = build_gta_policy(cfg, "train"), build_gta_policy(cfg, "train")
    assert dataset_fingerprint(a) == dataset_fingerprint(b)
    assert dataset_fingerprint(a) != dataset_fingerprint(build_gta_policy(get_data_config("toy", n_gta_train=10,
                                                                                          seed=1), "train"))
