import json

import pytest
import torch

from mpi.modeling import (
    QUANTIZATION_SKIP_MODULES, LoraSettings, check_model_available, load_model_and_processor,
    lora_module_names, reference_model,
)
from mpi.tests.conftest import chat_batch
from mpi.toy import TOY_SPECS, build_toy


def test_tokenizer_has_qwen_special_tokens(toy_model_and_processor):
    _, processor = toy_model_and_processor
    tok = processor.tokenizer
    for token in ["<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>"]:
        ids = tok.encode(token, add_special_tokens=False)
        assert len(ids) == 1, f"{token} must be a single token, got {ids}"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = "Case 12: a cyan metal cylinder — ünïcode too"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level: lossless


def test_chat_template_matches_qwen_layout(toy_model_and_processor):
    _, processor = toy_model_and_processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("n_images", [1, 3])
def test_image_tokens_expand_to_spec(toy_model_and_processor, n_images):
    model, processor = toy_model_and_processor
    batch = chat_batch(processor, n_images=n_images)
    n_image_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == n_images * TOY_SPECS["toy-tiny"].image_tokens == n_images * 4


def test_forward_with_masked_image_labels_and_generate(toy_model_and_processor):
    model, processor = toy_model_and_processor
    batch = chat_batch(processor, answer="A red square.")
    labels = batch["input_ids"].clone()
    image_positions = labels == model.config.image_token_id
    labels[image_positions] = -100
    with torch.no_grad():
        out = model(**batch, labels=labels)
    # Independent route: the same loss from the logits, ignoring image positions.
    logits = out.logits[0, :-1]
    targets = labels[0, 1:]
    keep = targets != -100
    manual = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(out.loss, manual, atol=1e-5)
    assert keep.sum() == labels.shape[1] - 1 - image_positions.sum()
    prompt = chat_batch(processor)
    gen = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > prompt["input_ids"].shape[1]


def test_build_is_deterministic_and_reloads_identically(tmp_path, toy_tiny_path, toy_model_and_processor):
    from transformers import AutoModelForImageTextToText

    model, processor = toy_model_and_processor
    again = build_toy("toy-tiny", seed=0, path=tmp_path / "again")
    assert (again / "tokenizer.json").read_text() == (toy_tiny_path / "tokenizer.json").read_text()
    reloaded = AutoModelForImageTextToText.from_pretrained(again).eval()
    batch = chat_batch(processor)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
    other_seed = build_toy("toy-tiny", seed=1, path=tmp_path / "seed1")
    assert json.loads((other_seed / "toy_spec.json").read_text())["seed"] == 1


def test_save_and_reload_identical_logits(tmp_path, toy_model_and_processor):
    from transformers import AutoModelForImageTextToText

    from mpi.modeling import load_processor

    model, processor = toy_model_and_processor
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "toy_spec.json").write_text((build_toy("toy-tiny") / "toy_spec.json").read_text())
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "m").eval()
    processor2 = load_processor(tmp_path / "m")
    a, b = chat_batch(processor), chat_batch(processor2)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**a).logits, reloaded(**b).logits)


def test_lora_only_on_language_model():
    model, _ = load_model_and_processor("toy-tiny", quantization=None, lora=LoraSettings(r=4))
    names = lora_module_names(model)
    spec = TOY_SPECS["toy-tiny"]
    assert len(names) == spec.num_hidden_layers * 7  # q,k,v,o + gate,up,down per layer
    assert all(".language_model.layers." in n for n in names)
    assert not any("visual" in n for n, p in model.named_parameters() if p.requires_grad)


def test_lora_with_embeddings_option():
    model, _ = load_model_and_processor("toy-tiny", quantization=None, lora=LoraSettings(r=4, train_embeddings=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("embed_tokens" in n for n in trainable) and any("lm_head" in n for n in trainable)
    assert not any("visual" in n for n in trainable)


def test_qlora_4bit_keeps_vision_full_precision_and_trains_on_cpu():
    import bitsandbytes as bnb

    model, processor = load_model_and_processor("toy-tiny", quantization="4bit", lora=LoraSettings(r=4))
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "no 4-bit layer: quantization did not happen"
    assert all("language_model" in n for n in four_bit)
    assert not any(n.split("base_model.model.", 1)[-1].startswith(tuple(QUANTIZATION_SKIP_MODULES)) for n in four_bit)
    batch = chat_batch(processor, answer="A red square.")
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def test_reference_model_is_base_with_adapters_disabled():
    model, processor = load_model_and_processor("toy-tiny", quantization=None, lora=LoraSettings(r=4))
    base, _ = load_model_and_processor("toy-tiny", quantization=None, trainable=False)
    batch = chat_batch(processor)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if "lora_B" in n):
            p.add_(0.5)  # make the adapter matter
        adapted = model(**batch).logits
        with reference_model(model):
            ref = model(**batch).logits
        assert not torch.allclose(adapted, ref)
        assert torch.allclose(ref, base(**batch).logits, atol=1e-6)
    with pytest.raises(ValueError, match="beta=0"):
        with reference_model(base):
            pass


def test_unreachable_hub_id_fails_fast_with_offline_hint(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(OSError, match="HF_HUB_OFFLINE") as err:
        load_model_and_processor("Qwen/Qwen2.5-VL-3B-Instruct")
    assert "toy" in str(err.value)
    assert time.perf_counter() - t0 < 10
    # Online but unreachable: the reachability probe decides, without transformers' retries.
    with pytest.raises(OSError, match="cannot reach huggingface.co"):
        check_model_available("Qwen/Qwen2-VL-2B-Instruct", offline=False, reachable=lambda: False)
    with pytest.raises(ValueError, match="neither a toy name"):
        check_model_available("not-a-model")


def test_qlora_on_cpu_trains_after_an_eval_mode_pass():
    """RL samples in eval mode, then trains. On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for
    inference on its first eval-mode no-grad call, and the next trained forward then fails; the loader switches
    that repacking off for trainable 4-bit models (on other CPUs the repacking never happens)."""
    import bitsandbytes as bnb

    model, processor = load_model_and_processor("toy-tiny", quantization="4bit", lora=LoraSettings(r=4))
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(getattr(m, "support_avx512bf16_for_cpu", False) is False for m in four_bit)
    batch = chat_batch(processor, answer="A red square.")
    model.eval()
    with torch.no_grad():
        model(**batch)  # the sampling pass
    model.train()
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
