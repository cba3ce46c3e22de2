"""The look-up circuit set into a random-init toy (mpi.toy_circuit): it copies the word after an id by content."""

import random

import pytest
import torch

from mpi.toy_base import circuit_calibration_text

CALIBRATION = circuit_calibration_text()  # what a build measures the residual's scale on


def _fresh_toy():
    from mpi.modeling import load_model_and_processor

    return load_model_and_processor("toy-tiny", quantization=None, lora=None, seed=0, trainable=False)


def _word_after_id_accuracy(model, processor, shuffled: bool) -> tuple[float, int]:
    """Teacher-forced: the share of CoT condition words (the attribute word right after an internal section id)
    the model predicts, on unseen depth-2 compact policies given in the prompt."""
    import re

    from mpi.data.scenes import ATTRIBUTES
    from mpi.toy_base import encode_examples, policy_items, shuffle_sections

    words = {f" {v}" for vs in ATTRIBUTES.values() for v in vs}
    items = policy_items("toy-tiny", 12, seed=0, depths=(2,), n_objects=(1, 4), world="sprites",
                         policy_format="compact")
    if shuffled:
        rng = random.Random(3)
        items = [{**i, "policy_text": shuffle_sections(rng, i["policy_text"])} for i in items]
    batch = encode_examples(processor, items, model.config.image_token_id)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    tok, hits = processor.tokenizer, []
    target, predicted = batch["labels"][:, 1:], logits[:, :-1].argmax(-1)
    for row in range(len(items)):
        positions = (target[row] != -100).nonzero().flatten().tolist()
        for prev, pos in zip(positions, positions[1:]):
            after_id = re.fullmatch(r"#[\d.]+", tok.decode([int(target[row, prev])]))
            if after_id and tok.decode([int(target[row, pos])]) in words:
                hits.append(float(predicted[row, pos] == target[row, pos]))
    return sum(hits) / len(hits), len(hits)


def test_codes_match_themselves_twice_as_well_as_any_other():
    from mpi.toy_circuit import _codes

    codes = torch.stack(_codes(3))
    assert len(codes) == 4 * 3  # (+-e_i +-e_j) for the 3 pairs i < j
    dots = codes @ codes.T
    assert torch.allclose(dots.diagonal(), torch.ones(12))
    assert (dots - torch.eye(12) * 2).max() <= 0.5 + 1e-6  # off the diagonal: at most half a match


def test_the_previous_token_head_attends_to_the_previous_token(toy_tiny_path):
    from mpi.toy_circuit import install_lookup_circuit

    model, processor = _fresh_toy()
    where = install_lookup_circuit(model, processor.tokenizer, CALIBRATION)
    lm = model.model.language_model
    before, lm.config._attn_implementation = lm.config._attn_implementation, "eager"
    ids = processor.tokenizer("Policy: L2-Abc.\n#1 red\n#1.1 cube\n#1.2 metal\n" * 8, return_tensors="pt")["input_ids"]
    try:
        attn = lm(input_ids=ids, output_attentions=True).attentions
    finally:
        lm.config._attn_implementation = before
    layer, head = where["previous_token_head"]
    a = attn[layer][0, head]
    n = a.shape[0]
    assert a[torch.arange(1, n), torch.arange(n - 1)].min() > 0.99


def test_a_random_init_toy_copies_the_word_after_an_id_only_with_the_circuit(toy_tiny_path):
    from mpi.toy_circuit import install_lookup_circuit

    model, processor = _fresh_toy()
    without, n = _word_after_id_accuracy(model, processor, shuffled=True)
    install_lookup_circuit(model, processor.tokenizer, CALIBRATION)
    with_circuit, _ = _word_after_id_accuracy(model, processor, shuffled=True)
    in_order, _ = _word_after_id_accuracy(model, processor, shuffled=False)
    assert n >= 24
    # untrained, nothing copies; with the circuit most condition words are copied, wherever their line sits
    assert without <= 0.05
    assert with_circuit >= 0.5 and in_order >= 0.5


def test_training_moves_every_weight_but_the_frozen_circuit(toy_tiny_path):
    from mpi.toy_base import encode_examples, lookup_example, toy_base_loss
    from mpi.toy_circuit import freeze_lookup_circuit, install_lookup_circuit

    model, processor = _fresh_toy()
    model.train()
    frozen = install_lookup_circuit(model, processor.tokenizer, CALIBRATION)["frozen"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks = freeze_lookup_circuit(model, frozen)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)  # no weight decay: frozen means exactly equal
    batch = encode_examples(processor, [lookup_example(random.Random(k), 2) for k in range(4)],
                            model.config.image_token_id)
    for _ in range(3):
        loss, _ = toy_base_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    params = dict(model.named_parameters())
    for name, mask in frozen.items():
        assert torch.equal(params[name][mask], before[name][mask]), name
        if "visual" not in name and (~mask).any():  # a text-only batch gives the vision tower no gradient
            assert not torch.equal(params[name][~mask], before[name][~mask]), name
    for hook in hooks:  # lifted: the same entries now train
        hook.remove()
    loss, _ = toy_base_loss(model, batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    emb = "model.language_model.embed_tokens.weight"
    assert not torch.equal(params[emb][frozen[emb]], before[emb][frozen[emb]])


def test_a_build_with_the_circuit_keeps_it_as_set_and_trains_the_rest(toy_tiny_path):
    """build_toy_base with the shipped recipe's knobs (circuit, evidence-first existence, check drill) on toy-tiny:
    the built base holds the circuit's entries as set at init (to AdamW's weight decay: lr x 0.01 x steps), and
    the rest of the model moved."""
    from mpi.modeling import load_model_and_processor
    from mpi.toy_base import build_toy_base, toy_base_config
    from mpi.toy_circuit import install_lookup_circuit

    cfg = toy_base_config("tiny", steps=4, lookup_circuit=True, exists_evidence=True, progress=False,
                          task_weights={"policy": 1.0, "lookup": 1.0, "check": 1.0, "exists": 1.0})
    built, _ = load_model_and_processor(str(build_toy_base(cfg)), quantization=None, lora=None, trainable=False)
    fresh, processor = _fresh_toy()
    with torch.no_grad():
        frozen = install_lookup_circuit(fresh, processor.tokenizer, CALIBRATION)["frozen"]
    got, want = dict(built.named_parameters()), dict(fresh.named_parameters())
    for name, mask in frozen.items():
        torch.testing.assert_close(got[name][mask], want[name][mask], rtol=1e-4, atol=1e-8, msg=name)
    moved = [n for n, m in frozen.items() if (~m).any() and not torch.equal(got[n][~m], want[n][~m])]
    assert "model.language_model.embed_tokens.weight" in moved


def test_the_circuit_needs_two_key_value_heads():
    from types import SimpleNamespace

    from mpi.toy_circuit import install_lookup_circuit

    lm = SimpleNamespace(config=SimpleNamespace(hidden_size=64, num_attention_heads=4, num_key_value_heads=1),
                         layers=[None, None])
    model = SimpleNamespace(model=SimpleNamespace(language_model=lm))
    with pytest.raises(ValueError, match="key-value heads"):
        install_lookup_circuit(model, None, "")
