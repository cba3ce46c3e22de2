"""Evaluation: scores on hand-computed predictions, referral on hand-written CoTs, token counts."""

import math

import pytest

from mpi.evaluate import (
    cited_conditions,
    majority_baseline,
    mean_and_spread,
    referral_score,
    score_predictions,
)


def clevr(answer, name="L2-Pol", depth=2, variant="T", path=("1", "1.1")):
    return {"id": f"c-{answer}", "dataset": "clevr", "variant": variant, "depth": depth, "policy_name": name,
            "answer": answer, "gold_path": list(path)}


def gta(answer):
    return {"id": "g", "dataset": "gta", "variant": "gta", "depth": 0, "policy_name": "tools", "answer": answer,
            "gold_path": []}


def test_clevr_exact_match_hand_computed():
    items = [clevr("Case 1"), clevr("Case 2"), clevr("Case 3"), clevr("Case 4")]
    preds = [
        "<think>x</think>\n\\boxed{Case 1}",  # right
        "\\boxed{ case  2 }",  # right: case and whitespace do not matter
        "<think>x</think>\n\\boxed{Case 4}",  # wrong answer
        "Case 4",  # right words but no box: a format failure scores 0
    ]
    out = score_predictions(items, preds)
    assert out["accuracy"] == pytest.approx(2 / 4)
    assert out["parsed_rate"] == pytest.approx(3 / 4)
    assert [p["score"] for p in out["per_item"]] == [1.0, 1.0, 0.0, 0.0]
    assert out["groups"]["clevr-T-N2"]["n"] == 4


def test_groups_split_by_variant_and_depth():
    items = [clevr("Case 1", depth=2), clevr("Case 1", depth=4), clevr("Case 2", depth=4, variant="M")]
    out = score_predictions(items, ["\\boxed{Case 1}", "\\boxed{Case 2}", "\\boxed{Case 2}"])
    assert out["groups"]["clevr-T-N2"]["accuracy"] == 1.0
    assert out["groups"]["clevr-T-N4"]["accuracy"] == 0.0
    assert out["groups"]["clevr-M-N4"]["accuracy"] == 1.0
    assert out["accuracy"] == pytest.approx(2 / 3)


def test_gta_tool_and_argument_score_hand_computed():
    gold = '{"name": "OCR_v1", "arguments": {"image": "image/image_1.jpg"}}'
    items = [gta(gold), gta(gold), gta(gold)]
    preds = [
        '\\boxed{{"name": "OCR_v1", "arguments": {"image": "image/image_1.jpg"}}}',  # 0.5*1 + 0.5*1 = 1
        '\\boxed{{"name": "OCR_v2", "arguments": {"image": "image/image_1.jpg"}}}',  # wrong version: 0.5*0 + 0.5*1
        '\\boxed{{"name": "OCR_v1", "arguments": {"image": "image/image_2.jpg"}}}',  # wrong image: 0.5*1 + 0.5*0
    ]
    out = score_predictions(items, preds)
    g = out["groups"]["gta"]
    assert g["tool_accuracy"] == pytest.approx(2 / 3)
    assert g["arg_score"] == pytest.approx(2 / 3)
    assert out["accuracy"] == pytest.approx((1.0 + 0.5 + 0.5) / 3)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="one text per item"):
        score_predictions([clevr("Case 1")], [])


def test_majority_baseline_is_most_common_answer_per_policy():
    items = [clevr("Case 1", name="A"), clevr("Case 1", name="A"), clevr("Case 2", name="A"),
             clevr("Case 3", name="B")]
    # A: always "Case 1" -> 2/3 right; B: "Case 3" -> 1/1 right; overall 3/4
    assert majority_baseline(items)["accuracy"] == pytest.approx(3 / 4)


def test_referral_on_hand_written_cots():
    gold = ["1", "1.2", "1.2.1"]
    exact = ("I follow Policy L3-X from # Condition 1.\n# Condition 1: is there a red cube? No. Go to # Condition 1.2.\n"
             "# Condition 1.2: is there a metal object? Yes. Go to # Condition 1.2.1.\n"
             "# Condition 1.2.1: is there a cyan object? No. So the response is Case 5.")
    r = referral_score(exact, gold)
    assert r["exact"] and r["f1"] == 1.0 and r["score"] == 10.0
    # skipped a hop and cited a wrong section: cited {1, 1.1, 1.2.1} vs gold {1, 1.2, 1.2.1}
    wrong = "# Condition 1: yes. Go to # Condition 1.1. # Condition 1.2.1: no."
    r = referral_score(wrong, gold)
    assert r["cited"] == ["1", "1.1", "1.2.1"]
    assert not r["exact"]
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["score"] == pytest.approx(10 * 2 / 3)
    # no policy reference at all
    r = referral_score("I see a red cube, so Case 2.", gold)
    assert r["cited"] == [] and r["score"] == 0.0
    with pytest.raises(ValueError, match="gold_path"):
        referral_score("x", [])


def test_cited_conditions_order_and_dedup():
    assert cited_conditions("Condition 1.1 then # Condition 1 then Condition 1.1 again") == ["1.1", "1"]


def test_referral_on_the_data_modules_forward_cot():
    """The gold CoT of real items cites exactly its gold path (an independent route: the tree walk)."""
    from mpi.data import clevr_policies, forward_cot
    from mpi.data.clevr import clevr_records

    policies = clevr_policies(3, 1, seed=0)
    for rec in clevr_records(policies, 4, split="test", seed=0, image_size=56):
        r = referral_score(forward_cot(rec["policy"], rec["scene"]), rec["gold_path"])
        assert r["exact"], (r["cited"], rec["gold_path"])


def test_mean_and_spread():
    s = mean_and_spread([0.5, 0.7, 0.9])
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.2) and s["n"] == 3
    assert mean_and_spread([0.4])["std"] == 0.0
    assert math.isnan(mean_and_spread([])["mean"])


def test_prompt_token_counts_on_a_fixed_item(toy_model_and_processor):
    """Counted independently: the tokenizer on the templated text, plus image_tokens per image placeholder."""
    from PIL import Image

    from mpi.data import format_response  # noqa: F401 - the data module must import
    from mpi.evaluate import prompt_token_counts

    _, processor = toy_model_and_processor
    img = Image.new("RGB", (56, 56), (120, 30, 30))
    item = {"id": "x", "dataset": "clevr", "variant": "T", "depth": 1, "policy_name": "L1-Test",
            "policy_text": "Policy: L1-Test\n# Condition 1\nCheck whether there is a red cube.\n",
            "policy_images": [], "images": [img], "query": "According to the Policy: L1-Test, what is it?",
            "cot": "", "answer": "Case 1", "gold_path": ["1"], "override": False, "extra": "{}"}
    counts = prompt_token_counts(processor, item)
    from mpi.data.messages import build_messages

    tok = processor.tokenizer
    per_image = (56 // 14) ** 2 // 4  # 4 image tokens per 56 px image for toy-tiny
    expected = {}
    for with_policy in (True, False):
        messages, images = build_messages(item, with_policy=with_policy)
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # one <|image_pad|> in the text becomes per_image tokens
        expected[with_policy] = len(tok(text)["input_ids"]) + len(images) * (per_image - 1)
    assert counts["with_policy"] == expected[True]
    assert counts["without_policy"] == expected[False]
    assert counts["policy_tokens"] == expected[True] - expected[False] > 0
    assert counts["saved"] == pytest.approx(1 - expected[False] / expected[True])
