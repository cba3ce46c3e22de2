"""Presets, tokenizer corpus, token report and the committed samples."""

from __future__ import annotations

import json
import re

import pytest

from mpi.data import (COLUMNS, DATA_PRESETS, build_split, get_data_config, load_samples, split_item_counts,
                      token_report, tokenizer_corpus)


def test_presets_and_unknown_fields():
    paper = get_data_config("paper")
    assert (paper.n_policies, paper.n_train_per_policy, paper.n_test, paper.depths) == (10, 2000, 2000, (2, 4, 6))
    assert (paper.n_gta_train, paper.n_gta_test) == (451, 106)
    assert get_data_config("toy").image_size == 56 and get_data_config("small").image_size == 112
    assert set(DATA_PRESETS) == {"toy", "small", "colab", "paper"}
    with pytest.raises(ValueError, match="n_polices"):
        get_data_config("toy", n_polices=3)
    with pytest.raises(ValueError, match="variant"):
        get_data_config("toy", variant="X")


def test_tokenizer_corpus_is_deterministic_and_covers_both_datasets():
    a, b = tokenizer_corpus(seed=0, n=300), tokenizer_corpus(seed=0, n=300)
    assert a == b and len(a) == 300
    text = "\n".join(a)
    for needle in ("# Condition 1.1", "According to the Policy:", "<think>", "\\boxed{Case", "OCR_v", '"arguments"',
                   "Suppose we have an updated Policy", "<image>", "account_type"):
        assert needle in text, needle
    assert tokenizer_corpus(seed=1, n=300) != a


class WordTokenizer:
    """A stand-in tokenizer: one token per word or punctuation mark."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": re.findall(r"\w+|[^\w\s]", text)}


def test_token_report_counts_what_the_policy_adds():
    rows = token_report(tokenizers={"words": WordTokenizer()}, depths=(2, 4), n_items=4)
    by = {(r["dataset"], r["variant"], r["N"]): r for r in rows}
    assert set(by) == {("clevr", "T", 2), ("clevr", "M", 2), ("clevr", "T", 4), ("clevr", "M", 4), ("gta", "gta", 0)}
    # a full binary tree of N layers has 2**N - 1 sections; 4 layers cost far more than 2
    assert by[("clevr", "T", 4)]["policy_tokens"] > 3 * by[("clevr", "T", 2)]["policy_tokens"]
    for r in rows:
        assert r["policy_tokens"] > r["query_tokens"] > 0
        # ratio comes from unrounded means: allow its own rounding (0.05) and that of query_tokens (relative)
        assert r["ratio"] == pytest.approx(r["policy_tokens"] / r["query_tokens"], rel=0.005, abs=0.06)
    assert by[("clevr", "M", 2)]["n_policy_images"] >= 1 and by[("clevr", "T", 2)]["n_policy_images"] == 0


def test_token_report_without_tokenizers_names_where_to_get_them():
    # mpi.data cannot load the toy tokenizer itself (the toy is trained on mpi.data's text): the caller passes it
    with pytest.raises(ValueError, match="available_tokenizers"):
        token_report(depths=(2,), n_items=2)


def test_split_item_counts_are_what_build_split_makes():
    cfg = get_data_config("toy", n_policies=2, n_train_per_policy=3, n_test=5, depths=(2,), n_gta_train=4,
                          n_gta_test=2, image_size=56, num_proc=1)
    # by hand: train 2 policies x 3; test 5 spread over the policies; override defaults to the test count
    assert split_item_counts(cfg, "clevr") == {"train": 6, "val": 8, "test": 5, "override": 5}
    assert split_item_counts(cfg, "gta") == {"train": 4, "val": 8, "test": 2, "override": 2}
    assert split_item_counts(get_data_config("toy", n_override=3), "gta")["override"] == 3
    assert len(build_split(cfg, "clevr", "test")) == 5  # the counts match a real (small) build


def test_committed_samples_load_with_the_schema():
    clevr, gta = load_samples("clevr"), load_samples("gta")
    assert list(clevr.column_names) == list(COLUMNS) == list(gta.column_names)
    assert len(clevr) >= 24 and len(gta) >= 24
    assert {"T", "M"} <= set(clevr["variant"]) and any(clevr["override"]) and any(gta["override"])
    m = clevr[clevr["variant"].index("M")]
    assert m["policy_text"].count("<image>") == len(m["policy_images"]) >= 1


def test_n_objects_bounds_every_scene_and_bad_values_name_the_field():
    from mpi.data import build_split, get_data_config

    cfg = get_data_config("toy", n_objects=(1, 2), n_train_per_policy=8, n_test=4)
    ds = build_split(cfg, "clevr", "train")
    counts = {len(json.loads(e)["scene"]["objects"]) for e in ds["extra"]}
    assert counts <= {1, 2} and counts
    with pytest.raises(ValueError, match="n_objects"):
        get_data_config("toy", n_objects=(0, 4))


def test_validation_split_is_unseen_and_apart_from_test():
    """val (model selection only) is drawn like test: no training object set under the same policy, and its own
    stream, so no val item is a test item."""
    from mpi.data import split_overlap

    cfg = get_data_config("toy", n_policies=2, n_train_per_policy=6, n_test=6, n_val=6, image_size=56, num_proc=1)
    train, val, test = (build_split(cfg, "clevr", s) for s in ("train", "val", "test"))
    assert len(val) == 6 and sorted(set(val["policy_name"])) == sorted(set(train["policy_name"]))
    assert split_overlap(train, val)["n_seen"] == 0
    assert not set(val["id"]) & set(test["id"])
    key = lambda ds: [(r["policy_name"], r["extra"]) for r in ds]  # the scene lives in extra
    assert not set(key(val)) & set(key(test))
    assert len(build_split(cfg, "gta", "val")) == 6
