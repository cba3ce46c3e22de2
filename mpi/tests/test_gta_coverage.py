"""GTAPolicy's paper-size splits reach every leaf of Rules 1-20 (issue 28, point 5), each split on its own.

A leaf is a branch of a rule's decision tree and the call it decides ("5a" -> OCR_v4): 25 in Rules 1-20 (Rule 7,
MathOCR, is the image's, not the profile's: mpi/tests/test_gta_rules.py). The override split uses only the 20
leaves whose version the override changes (an item there must tell the two rulebooks apart). Before, the test
split (106 items) reached 23 of 25: CountGivenObject's branch advanced once per four counting items, so Rules 16
and 17 needed a longer split."""

import json

import pytest

from mpi.data import get_data_config
from mpi.data.build import split_item_counts
from mpi.data.gta import Rulebook, gta_policy_name, gta_records, override_rulebook, rule_leaf_coverage

SIZES = split_item_counts(get_data_config("paper"), "gta")  # train 451, val 200, test 106, override 106


def _hand_leaves():
    """The 25 leaves written out from the paper's table (Figure 20), independently of mpi.data.gta."""
    leaves = {("1", "ImageDescription_v5"), ("2a", "ImageDescription_v4"), ("2b", "ImageDescription_v3"),
              ("3a", "ImageDescription_v2"), ("3b", "ImageDescription_v1"), ("4", "OCR_v5"), ("5a", "OCR_v4"),
              ("5b", "OCR_v3"), ("6a", "OCR_v2"), ("6b", "OCR_v1"), ("8", "GoogleSearch_v1"),
              ("9a", "GoogleSearch_v2"), ("9b", "GoogleSearch_v3"), ("10", "TextToImage_v1"),
              ("11a", "TextToImage_v2"), ("11b", "TextToImage_v3"), ("12", "RegionAttributeDescription_v2"),
              ("13", "RegionAttributeDescription_v1"), ("14", "CountGivenObject_v1"), ("15", "CountGivenObject_v2"),
              ("16", "CountGivenObject_v3"), ("17", "CountGivenObject_v4"), ("18", "ImageStylization_v1"),
              ("19", "ImageStylization_v2"), ("20", "ImageStylization_v3")}
    assert len(leaves) == 25
    return leaves


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_each_paper_size_split_reaches_every_leaf_of_rules_1_to_20(split):
    records = gta_records(SIZES[split], split=split, seed=0, image_size=56)
    reached = {(json.loads(r["extra"])["rule_branch"], json.loads(r["answer"])["name"]) for r in records}
    missing = _hand_leaves() - reached
    assert not missing, f"{split} ({len(records)} items) misses {sorted(missing)}"
    got, leaves = rule_leaf_coverage(records)
    assert leaves == _hand_leaves() and got == leaves
    assert ("7", "MathOCR") in reached


def test_the_override_split_reaches_every_leaf_the_override_changes():
    base = Rulebook(gta_policy_name(0))
    records = gta_records(SIZES["override"], split="override", seed=0, image_size=56, override=True)
    got, leaves = rule_leaf_coverage(records, override_rulebook(base), base)
    assert len(leaves) == 20 and got == leaves, sorted(leaves - got)
