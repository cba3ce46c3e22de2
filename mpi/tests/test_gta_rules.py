"""GTAPolicy follows the paper's 24 tool-calling rules (its Figure 20).

The expected calls here are written by hand from the spec's table, never by asking `Rulebook`:
`paper_version` is a from-scratch implementation of Rules 1-20, `expected_next_call` adds Rules
7, 21 and 22, and `disagreements` checks one record against them (plus Rules 23 and 24) without
reading the policy text. `agreement` is the figure reported for issue #13.
"""

from __future__ import annotations

import json
import re

import pytest

from mpi.data.gta import Rulebook, gta_records, override_rulebook

VERSIONS = {"ImageDescription": 5, "OCR": 5, "GoogleSearch": 3, "TextToImage": 3, "RegionAttributeDescription": 2,
            "CountGivenObject": 4, "ImageStylization": 3}


def paper_rule(tool: str, p: dict) -> tuple[int, int]:
    """(rule number, version) by the spec's table for Rules 1-20 (Rule 7 is the image's, see below)."""
    a, c, g = p["account_type"], p["credits"], p["age"]
    if tool == "ImageDescription":
        if a == "A":
            return 1, 5
        if a in ("B", "C"):
            return 2, (4 if c > 500 else 3)
        return 3, (2 if c > 500 else 1)
    if tool == "OCR":
        if c <= 250:
            return 4, 5
        if c <= 750:
            return 5, (4 if a in ("A", "B") else 3)
        return 6, (2 if g < 21 else 1)
    if tool == "GoogleSearch":
        if g < 21:
            return 8, 1
        return 9, (2 if c < 500 else 3)
    if tool == "TextToImage":
        if a in ("A", "B", "C"):
            return 10, 1
        return 11, (2 if c > 500 else 3)
    if tool == "RegionAttributeDescription":
        return (12, 2) if a in ("A", "B") else (13, 1)
    if tool == "CountGivenObject":
        if c < 250:
            return 14, 1
        if c < 500:
            return 15, 2
        if c < 750:
            return 16, 3
        return 17, 4
    if tool == "ImageStylization":
        if g < 21:
            return 18, 1
        if g < 60:
            return 19, 2
        return 20, 3
    raise KeyError(tool)


def paper_version(tool: str, p: dict, override: bool = False) -> str:
    """The call name; the override policy renumbers versions backwards as the paper's Figure 10 does for OCR."""
    version = paper_rule(tool, p)[1]
    return f"{tool}_v{VERSIONS[tool] + 1 - version if override else version}"


# Which tool each task's request needs, read off the task (not off the code that builds it).
NEEDS = {"ocr": "OCR", "mathocr": "OCR", "count": "CountGivenObject", "describe": "ImageDescription",
         "locate": "TextToBbox", "locate_all": "TextToBbox", "region": "RegionAttributeDescription",
         "region_first": "RegionAttributeDescription", "drawbox": "DrawBox", "receipt": "Calculator",
         "search": "GoogleSearch", "solve": "Solver", "plot": "Plot", "addtext": "AddText",
         "generate": "TextToImage", "stylize": "ImageStylization"}
IMAGE_TOOLS = ("ImageDescription", "OCR", "MathOCR", "CountGivenObject", "RegionAttributeDescription", "TextToBbox",
               "DrawBox", "AddText", "ImageStylization")


def _base(name: str) -> str:
    return name.split("_v")[0]


def _has_math(extra: dict, path: str) -> bool:
    kinds = extra.get("image_kinds")
    if kinds is None:  # records from before image_kinds existed: only these tasks showed formulas
        return extra["task"] in ("mathocr", "solve", "plot")
    return kinds[extra["image_paths"].index(path)] == "formula"


def expected_next_call(extra: dict, history: list[dict], override: bool = False) -> tuple[str, str | None, str]:
    """(call name, image argument or None, the deciding rule as "21"/"22"/"7"/"<n>"/"") for the next call."""
    p, paths = extra["profile"], extra["image_paths"]
    if len(paths) > 1:  # Rule 21
        described = {h["arguments"].get("image") for h in history if _base(h["name"]) == "ImageDescription"}
        todo = [x for x in paths if x not in described]
        if todo:
            return paper_version("ImageDescription", p, override), todo[0], "21"
    need = NEEDS[extra["task"]]
    if need == "RegionAttributeDescription" and not any(h["name"] == "TextToBbox" for h in history):
        return "TextToBbox", paths[0], "22"  # Rule 22
    if need == "OCR" and _has_math(extra, paths[0]):
        return "MathOCR", paths[0], "7"  # Rule 7 overrides 4-6
    if need in VERSIONS:
        return paper_version(need, p, override), None, str(paper_rule(need, p)[0])
    return need, None, ""


def disagreements(rec: dict, *, open_ended_default: bool | None = None) -> list[str]:
    """Every way the record's gold call and history break Rules 1-24; [] when it follows them all."""
    extra = json.loads(rec["extra"])
    gold = json.loads(rec["answer"])
    over = bool(rec["override"])
    bad = []
    history = extra["history"]
    for i, h in enumerate(history):  # history calls follow the rules too
        base = _base(h["name"])
        if base in VERSIONS and h["name"] != paper_version(base, extra["profile"], over):
            bad.append(f"history[{i}] {h['name']} != {paper_version(base, extra['profile'], over)}")
        if base == "OCR" and _has_math(extra, h["arguments"]["image"]):
            bad.append(f"history[{i}] {h['name']} on a formula image (Rule 7: MathOCR)")
    name, image, rule = expected_next_call(extra, history, over)
    if gold["name"] != name:
        bad.append(f"gold {gold['name']} != {name} (rule {rule or '-'})")
    if image is not None and gold["arguments"].get("image") != image:
        bad.append(f"gold image {gold['arguments'].get('image')} != {image}")
    if _base(gold["name"]) in IMAGE_TOOLS and gold["arguments"].get("image") not in extra["image_paths"]:
        bad.append("Rule 23: image argument is not an exact image name")
    if _base(gold["name"]) == "GoogleSearch":
        open_ended = extra.get("open_ended", open_ended_default)
        if open_ended is None:
            bad.append("no open_ended field for Rule 24")
        elif gold["arguments"].get("k") != (4 if open_ended else 1):
            bad.append(f"Rule 24: k = {gold['arguments'].get('k')}, open_ended {open_ended}")
    if _base(gold["name"]) == "RegionAttributeDescription":
        boxes = [h["result"] for h in history if h["name"] == "TextToBbox"]
        if not boxes or gold["arguments"].get("bbox") != boxes[-1]:
            bad.append("Rule 22: bbox is not the TextToBbox result")
    return bad


def agreement(records: list[dict], **kw) -> tuple[int, int]:
    return sum(not disagreements(r, **kw) for r in records), len(records)


@pytest.fixture(scope="module")
def paper_records():
    # build.py's "paper" (and "small") preset: n_gta_train=451, n_gta_test=106
    return (gta_records(451, split="train", seed=0, image_size=224)
            + gta_records(106, split="test", seed=0, image_size=224))


# ----------------------------------------------------------------------------- hand-built profiles
def P(a, c, g):
    return {"account_type": a, "credits": c, "age": g}


# (tool, profile, expected call, expected branch label), each written from the spec table; boundaries included.
HAND = [
    ("ImageDescription", P("A", 900, 30), "ImageDescription_v5", "1"),
    ("ImageDescription", P("B", 501, 30), "ImageDescription_v4", "2a"),
    ("ImageDescription", P("C", 500, 30), "ImageDescription_v3", "2b"),
    ("ImageDescription", P("D", 501, 30), "ImageDescription_v2", "3a"),
    ("ImageDescription", P("D", 500, 30), "ImageDescription_v1", "3b"),
    ("OCR", P("C", 250, 30), "OCR_v5", "4"),
    ("OCR", P("A", 251, 30), "OCR_v4", "5a"),
    ("OCR", P("C", 750, 30), "OCR_v3", "5b"),
    ("OCR", P("D", 751, 20), "OCR_v2", "6a"),
    ("OCR", P("A", 751, 21), "OCR_v1", "6b"),
    ("GoogleSearch", P("A", 900, 20), "GoogleSearch_v1", "8"),
    ("GoogleSearch", P("A", 499, 21), "GoogleSearch_v2", "9a"),
    ("GoogleSearch", P("A", 500, 21), "GoogleSearch_v3", "9b"),
    ("TextToImage", P("C", 900, 30), "TextToImage_v1", "10"),
    ("TextToImage", P("D", 501, 30), "TextToImage_v2", "11a"),
    ("TextToImage", P("D", 500, 30), "TextToImage_v3", "11b"),
    ("RegionAttributeDescription", P("B", 10, 30), "RegionAttributeDescription_v2", "12"),
    ("RegionAttributeDescription", P("C", 990, 30), "RegionAttributeDescription_v1", "13"),
    ("CountGivenObject", P("A", 249, 30), "CountGivenObject_v1", "14"),
    ("CountGivenObject", P("A", 250, 30), "CountGivenObject_v2", "15"),
    ("CountGivenObject", P("A", 499, 30), "CountGivenObject_v2", "15"),
    ("CountGivenObject", P("A", 500, 30), "CountGivenObject_v3", "16"),
    ("CountGivenObject", P("A", 749, 30), "CountGivenObject_v3", "16"),
    ("CountGivenObject", P("A", 750, 30), "CountGivenObject_v4", "17"),
    ("ImageStylization", P("A", 500, 20), "ImageStylization_v1", "18"),
    ("ImageStylization", P("A", 500, 21), "ImageStylization_v2", "19"),
    ("ImageStylization", P("A", 500, 59), "ImageStylization_v2", "19"),
    ("ImageStylization", P("A", 500, 60), "ImageStylization_v3", "20"),
]


@pytest.mark.parametrize("tool,profile,expected,branch", HAND)
def test_every_rule_branch_on_a_hand_built_profile(tool, profile, expected, branch):
    decision = Rulebook("x").decide(tool, profile)
    assert (decision.name, decision.branch) == (expected, branch)
    rule_number = branch.rstrip("ab")
    assert f"Rule {rule_number} applies" in decision.reason


@pytest.mark.parametrize("profile", [P("A", 100, 30), P("C", 600, 30), P("B", 900, 15), P("D", 900, 70)])
def test_rule_7_mathocr_overrides_4_to_6_for_any_profile(profile):
    decision = Rulebook("x").decide("OCR", profile, math=True)
    assert (decision.name, decision.branch) == ("MathOCR", "7")


# The paper's override example (Figure 10), written out: OCR v1/v2/v3/v4/v5 on the same conditions.
OVERRIDE_HAND = [
    ("OCR", P("A", 250, 30), "OCR_v1"), ("OCR", P("B", 600, 30), "OCR_v2"), ("OCR", P("C", 600, 30), "OCR_v3"),
    ("OCR", P("A", 800, 20), "OCR_v4"), ("OCR", P("A", 800, 21), "OCR_v5"),
    ("ImageDescription", P("A", 0, 30), "ImageDescription_v1"), ("GoogleSearch", P("A", 0, 20), "GoogleSearch_v3"),
    ("CountGivenObject", P("A", 0, 30), "CountGivenObject_v4"), ("ImageStylization", P("A", 0, 70),
                                                                  "ImageStylization_v1"),
    ("RegionAttributeDescription", P("A", 0, 30), "RegionAttributeDescription_v1"),
    ("TextToImage", P("D", 600, 30), "TextToImage_v2"),
]


@pytest.mark.parametrize("tool,profile,expected", OVERRIDE_HAND)
def test_override_permutes_versions_like_the_papers_ocr_example(tool, profile, expected):
    assert override_rulebook(Rulebook("x")).version(tool, profile) == expected


def test_override_text_is_the_papers_example():
    text = override_rulebook(Rulebook("GTA-X")).render_text()
    assert "Rule 4: if (credits <= 250) then use OCR_v1." in text
    assert ("Rule 5: if (credits > 250 and credits <= 750) then (if (account_type is A or B) then use OCR_v2; "
            "otherwise use OCR_v3).") in text
    assert "Rule 6: if (credits > 750) then (if (age < 21) then use OCR_v4; otherwise use OCR_v5)." in text
    assert "Policy: GTA-X" in text and text != Rulebook("GTA-X").render_text()


# ----------------------------------------------------------------------------- rendered text
def test_rendered_rules_are_the_24_unambiguous_ones():
    text = Rulebook("GTA-X").render_text()
    ids = [int(m) for m in re.findall(r"^Rule (\d+)[ :]", text, flags=re.M)]
    assert ids == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]
    assert "checked in order and the first rule that applies decides" in text
    assert "Rule 7 overrides Rules 4-6" in text and "Rule 21 before Rule 22" in text
    # the two readings of "account_type is B or C and credits > 500" are gone: the outer test is parenthesized
    assert ("Rule 2: if (account_type is B or C) then (if (credits > 500) then use ImageDescription_v4; "
            "otherwise use ImageDescription_v3).") in text
    assert ("Rule 9: if (age >= 21) then (if (credits < 500) then use GoogleSearch_v2; otherwise use "
            "GoogleSearch_v3).") in text
    assert "set k to 1; otherwise" in text and "set k to 4" in text
    assert "exact image name" in text and "TextToBbox" in text.split("\nRule 22 (")[1].split("\nRule 23 (")[0]
    assert '- k (int, optional, default 10)' in text and '- top1 (bool, optional, default true)' in text
    assert '- annotation (text, optional, default null)' in text and '- color (text, optional, default "red")' in text


# ----------------------------------------------------------------------------- the data
def test_every_paper_size_gold_call_follows_the_rules(paper_records):
    bad = {r["id"]: disagreements(r) for r in paper_records}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"{len(bad)} of {len(paper_records)} items break the rules, e.g. {list(bad.items())[:3]}"


def test_every_rule_branch_is_reached_by_the_paper_size_data(paper_records):
    reached = set()
    for r in paper_records:
        extra, gold = json.loads(r["extra"]), json.loads(r["answer"])
        name, _, rule = expected_next_call(extra, extra["history"])
        reached.add((rule, gold["name"]))
        if _base(gold["name"]) == "GoogleSearch":
            reached.add(("24", gold["arguments"]["k"]))
    want = {("1", "ImageDescription_v5"), ("2", "ImageDescription_v4"), ("2", "ImageDescription_v3"),
            ("3", "ImageDescription_v2"), ("3", "ImageDescription_v1"),
            ("4", "OCR_v5"), ("5", "OCR_v4"), ("5", "OCR_v3"), ("6", "OCR_v2"), ("6", "OCR_v1"), ("7", "MathOCR"),
            ("8", "GoogleSearch_v1"), ("9", "GoogleSearch_v2"), ("9", "GoogleSearch_v3"),
            ("10", "TextToImage_v1"), ("11", "TextToImage_v2"), ("11", "TextToImage_v3"),
            ("12", "RegionAttributeDescription_v2"), ("13", "RegionAttributeDescription_v1"),
            ("14", "CountGivenObject_v1"), ("15", "CountGivenObject_v2"), ("16", "CountGivenObject_v3"),
            ("17", "CountGivenObject_v4"), ("18", "ImageStylization_v1"), ("19", "ImageStylization_v2"),
            ("20", "ImageStylization_v3"), ("22", "TextToBbox"), ("24", 1), ("24", 4)}
    assert want <= reached, sorted(want - reached, key=str)
    assert any(rule == "21" for rule, _ in reached)


def test_recorded_branch_and_cot_name_the_deciding_rule(paper_records):
    for r in paper_records:
        extra = json.loads(r["extra"])
        _, _, rule = expected_next_call(extra, extra["history"])
        recorded = extra["rule_branch"]
        assert (re.match(r"\d+", recorded).group() if recorded else "") == rule, r["id"]
        if rule:
            assert f"Rule {rule} applies" in r["cot"], (r["id"], r["cot"])
        gold = json.loads(r["answer"])
        if "image" in gold["arguments"]:
            assert f"Rule 23: the image argument is the exact name {gold['arguments']['image']}." in r["cot"]
        if "k" in gold["arguments"]:
            assert "Rule 24: the question is " in r["cot"] and f"so k = {gold['arguments']['k']}." in r["cot"]


def test_two_image_items_describe_each_image_first(paper_records):
    two = [r for r in paper_records if len(json.loads(r["extra"])["image_paths"]) == 2]
    seen = set()
    for r in two:
        extra, gold = json.loads(r["extra"]), json.loads(r["answer"])
        paths, history = extra["image_paths"], extra["history"]
        n_described = len([h for h in history if h["name"].startswith("ImageDescription_v")])
        seen.add(n_described)
        assert [h["arguments"]["image"] for h in history] == paths[:n_described]
        if n_described < 2:
            assert gold["name"].startswith("ImageDescription_v") and gold["arguments"]["image"] == paths[n_described]
        else:
            assert gold["name"].startswith("CountGivenObject_v")
    assert seen == {0, 1, 2}


def test_search_k_follows_whether_the_question_is_open_ended(paper_records):
    searches = [r for r in paper_records if json.loads(r["answer"])["name"].startswith("GoogleSearch")]
    kinds = set()
    for r in searches:
        extra, k = json.loads(r["extra"]), json.loads(r["answer"])["arguments"]["k"]
        # the open-ended questions ask for "some" results; the others for one fact (who / which year)
        open_ended = " some " in r["query"]
        assert extra["open_ended"] is open_ended and k == (4 if open_ended else 1), r["query"]
        kinds.add(open_ended)
    assert kinds == {True, False}


def test_override_split_follows_the_permuted_rules_and_differs_from_the_base():
    over = gta_records(106, split="override", seed=0, image_size=224, override=True)
    assert not [disagreements(r) for r in over if disagreements(r)]
    for r in over:
        extra, gold = json.loads(r["extra"]), json.loads(r["answer"])
        base_name, _, _ = expected_next_call(extra, extra["history"], override=False)
        assert gold["name"] != base_name, (r["id"], gold["name"])  # every override item tells the policies apart


def test_checker_catches_a_wrong_version_and_a_wrong_k(paper_records):
    rec = next(r for r in paper_records if json.loads(r["answer"])["name"].startswith("GoogleSearch"))
    gold = json.loads(rec["answer"])
    wrong_k = dict(rec, answer=json.dumps({**gold, "arguments": {**gold["arguments"], "k": 10}}))
    wrong_v = dict(rec, answer=json.dumps({**gold, "name": "GoogleSearch_v9"}))
    assert disagreements(wrong_k) and disagreements(wrong_v) and not disagreements(rec)


def test_records_are_deterministic_per_seed():
    def dump(recs):
        return json.dumps([{**r, "specs": [vars(s) for s in r["specs"]]} for r in recs], sort_keys=True)

    a = dump(gta_records(40, split="train", seed=3, image_size=56))
    assert a == dump(gta_records(40, split="train", seed=3, image_size=56))
    assert a != dump(gta_records(40, split="train", seed=4, image_size=56))


if __name__ == "__main__":  # the issue-#13 figure: python -m mpi.tests.test_gta_rules [path/to/an/older/gta.py]
    import importlib.util
    import sys

    if len(sys.argv) > 1:  # e.g. `git show HEAD:mpi/data/gta.py > /tmp/gta_before.py`
        spec = importlib.util.spec_from_file_location("mpi.data._gta_measured", sys.argv[1])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        make = module.gta_records
    else:
        make = gta_records
    recs = make(451, split="train", seed=0, image_size=224) + make(106, split="test", seed=0, image_size=224)
    # records without open_ended: the older code's two search questions (who wrote / when first published) are factual
    ok = [not disagreements(r, open_ended_default=False) for r in recs]
    versioned = [good for r, good in zip(recs, ok) if _base(json.loads(r["answer"])["name"]) in VERSIONS]
    print(f"gold calls agreeing with Rules 1-24: {sum(ok)}/{len(ok)}; "
          f"versioned gold calls: {sum(versioned)}/{len(versioned)}")
