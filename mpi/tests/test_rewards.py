"""Reward parsers: hand-written completions, including garbage that must never raise."""

import pytest

from mpi.rewards import RewardWeights, accuracy_reward, combined_rewards, format_reward, parse_boxed

GOOD = "<think>Condition 1 holds, go to 1.1.</think>\n\\boxed{Case 3}"


@pytest.mark.parametrize("text, expected", [
    (GOOD, "Case 3"),
    ("\\boxed{Case 1} then \\boxed{Case 2}", "Case 2"),                 # the last one counts
    ('\\boxed{{"name": "OCR_v1", "arguments": {"image": "a.jpg"}}}', '{"name": "OCR_v1", "arguments": {"image": "a.jpg"}}'),
    ("\\boxed{Case 1} \\boxed{unclosed", "Case 1"),                    # unclosed last box -> earlier one
    ("\\boxed{}", ""),
    ("no box here", None), ("\\boxed{never closed", None), ("", None), (None, None), (123, None),
    ("}}}{{{\\boxed", None),
])
def test_parse_boxed(text, expected):
    assert parse_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    (GOOD, 1.0),
    ("  " + GOOD + "  \n", 1.0),
    ("<think></think>\\boxed{x}", 1.0),
    ("\\boxed{Case 3}", 0.0),                                   # no think
    ("<think>a</think>", 0.0),                                   # no box
    ("<think>a</think>\\boxed{x} more", 0.0),                    # text after the box
    ("<think>a</think>\\boxed{x}\\boxed{y}", 0.0),               # two boxes
    ("<think>a<think>b</think>\\boxed{x}", 0.0),                 # two think tags
    ("<think>\\boxed{x}</think>", 0.0),                          # box inside think
    ("hello <think>a</think>\\boxed{x}", 0.0),                   # text before think
    ("<think>a</think>\\boxed{x", 0.0),                          # unclosed box
    (None, 0.0), ("", 0.0), ("<<<think>>>", 0.0),
])
def test_format_reward(text, expected):
    assert format_reward(text) == expected


def test_clevr_accuracy():
    item = {"id": "c1", "dataset": "clevr", "answer": "Case 3"}
    assert accuracy_reward(item, GOOD) == 1.0
    assert accuracy_reward(item, "\\boxed{ case  3 }") == 1.0     # whitespace/case normalised
    assert accuracy_reward(item, "\\boxed{Case 13}") == 0.0
    assert accuracy_reward(item, "garbage") == 0.0
    with pytest.raises(ValueError, match="dataset"):
        accuracy_reward({"id": "x", "dataset": "mnist", "answer": "1"}, GOOD)


def test_combined_rewards_weights():
    item = {"id": "c1", "dataset": "clevr", "answer": "Case 3"}
    out = combined_rewards([item] * 3, [GOOD, "\\boxed{Case 3}", "<think>x</think>\\boxed{Case 2}"],
                           RewardWeights(accuracy_weight=0.9, format_weight=0.1))
    assert out["accuracy"] == [1.0, 1.0, 0.0] and out["format"] == [1.0, 0.0, 1.0]
    assert out["reward"] == pytest.approx([1.0, 0.9, 0.1])
    with pytest.raises(ValueError, match="one item per completion"):
        combined_rewards([item], [GOOD, GOOD])


def test_gta_accuracy_is_tool_call_score():
    gold = '{"name": "OCR_v1", "arguments": {"image": "image/image_203.jpg"}}'
    item = {"id": "g1", "dataset": "gta", "answer": gold}
    assert accuracy_reward(item, "<think>credits 900, age 30</think>\n\\boxed{" + gold + "}") == 1.0
    # right arguments, wrong version: 0.5 * tool(0) + 0.5 * args(1) = 0.5
    wrong = '{"name": "OCR_v2", "arguments": {"image": "image/image_203.jpg"}}'
    assert accuracy_reward(item, "\\boxed{" + wrong + "}") == 0.5
    assert accuracy_reward(item, "\\boxed{not json}") == 0.0
    assert accuracy_reward(item, "\\boxed{{\"name\": 3}}") == 0.0
