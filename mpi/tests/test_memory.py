"""mpi.scale.memory: parameter counts against real modules, terms against hand arithmetic, and the refusal."""

import dataclasses

import pytest
import torch

from mpi.device import DeviceInfo
from mpi.scale.memory import (GiB, KNOWN_MODELS, NF4_BYTES_PER_PARAM, MemoryKnobs, MemoryTooLarge, ModelFacts,
                        check_fits, estimate_peak_memory, facts_from_config, format_estimate, generation_parts,
                        layer_activation_bytes, model_facts, scoring_parts, supervised_parts)

T4 = DeviceInfo(type="cuda", name="Tesla T4", bf16_supported=False, compute_capability=(7, 5), total_memory_gb=14.74)
H100 = DeviceInfo(type="cuda", name="NVIDIA H100 80GB HBM3", bf16_supported=True, compute_capability=(9, 0),
                  total_memory_gb=79.1)
# A made-up model small enough to do every term by hand.
HAND = ModelFacts("hand", vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                  num_kv_heads=1, tie_embeddings=False, vision_depth=1, vision_hidden=4, vision_intermediate=8)


def test_parameter_counts_match_the_toy_model(toy_model_and_processor):
    model, _ = toy_model_and_processor
    facts = model_facts("toy-tiny")
    assert facts.total_params() == sum(p.numel() for p in model.parameters())
    assert facts.vision_params() == sum(p.numel() for p in model.model.visual.parameters())
    layer = model.model.language_model.layers[0]
    linears = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert facts.layer_linear_params() == linears


def test_lora_parameter_count_matches_peft(toy_model_and_processor):
    import copy

    from peft import get_peft_model

    from mpi.modeling import LoraSettings, count_parameters

    model = get_peft_model(copy.deepcopy(toy_model_and_processor[0]), LoraSettings(r=4).to_peft())
    assert model_facts("toy-tiny").lora_params(4) == count_parameters(model)[0]


def test_hub_facts_count_like_the_real_architecture():
    """Qwen2.5-VL-3B built on the meta device (no memory) from the published config values."""
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

    f = KNOWN_MODELS["Qwen/Qwen2.5-VL-3B-Instruct"]
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=f.vocab_size, hidden_size=f.hidden_size, intermediate_size=f.intermediate_size,
                         num_hidden_layers=f.num_layers, num_attention_heads=f.num_heads,
                         num_key_value_heads=f.num_kv_heads, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048),
        tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert f.total_params() == sum(p.numel() for p in model.parameters())
    assert facts_from_config(config, "x").total_params() == f.total_params()
    # the published sizes (model cards: 8.29B, 3.75B, 2.21B parameters)
    assert round(KNOWN_MODELS["Qwen/Qwen2.5-VL-7B-Instruct"].total_params() / 1e9, 2) == 8.29
    assert round(f.total_params() / 1e9, 2) == 3.75
    assert round(KNOWN_MODELS["Qwen/Qwen2-VL-2B-Instruct"].total_params() / 1e9, 2) == 2.21


def test_terms_by_hand():
    k = MemoryKnobs(dtype="fp32", lora_r=2, batch_size=3, max_length=5, num_generations=2, prompts_per_process=1,
                    max_completion_length=6, policy_prompt_tokens=10, free_prompt_tokens=4, image_size=28)
    # KV cache: 1 prompt x 2G=4 sequences x (10 + 6) tokens x 2 (K,V) x 2 layers x kv_dim 4 x 4 bytes
    assert generation_parts(HAND, k)["kv_cache"] == 4 * 16 * 2 * 2 * 4 * 4
    # per token per layer, fp32: norms 2*12*8 + (2*8 + 2*4 + 4*16)*4 + LoRA 7*2*4
    assert layer_activation_bytes(HAND, k) == 192 + 352 + 56
    sft = supervised_parts(HAND, k)
    assert sft["activations"] == 15 * (2 * 600 + 12 * 8)  # 15 tokens, 2 layers + final norm
    assert sft["logits"] == 15 * 10 * 4 * 3  # fp32 log-softmax + 2 gradients of (tokens x vocab)
    score = scoring_parts(HAND, dataclasses.replace(k, micro_batch_size=2))
    assert score["logits"] == 2 * 7 * 10 * 4 * 3  # 2 rows x (T + 1) kept logits
    assert score["activations"] == 2 * (4 + 6) * (2 * 600 + 12 * 8)


def test_quantization_and_dtype_change_the_weights_term():
    f = KNOWN_MODELS["Qwen/Qwen2.5-VL-3B-Instruct"]
    bf16 = estimate_peak_memory(f, "sft", dtype="bf16", lora_r=8).parts["weights"]
    assert bf16 == pytest.approx(f.total_params() * 2 / GiB)
    q = estimate_peak_memory(f, "sft", dtype="fp16", quantization="4bit").parts["weights"]
    quantised = f.num_layers * f.layer_linear_params()
    assert q == pytest.approx((quantised * NF4_BYTES_PER_PARAM + (f.total_params() - quantised) * 4) / GiB)
    with pytest.raises(ValueError, match="full fine-tuning of a 4-bit"):
        estimate_peak_memory(f, "sft", quantization="4bit", lora_r=None)


def test_knobs_lower_the_estimate():
    f = KNOWN_MODELS["Qwen/Qwen2.5-VL-7B-Instruct"]
    base = estimate_peak_memory(f, "sft", batch_size=2, max_length=4096)
    assert estimate_peak_memory(f, "sft", batch_size=2, max_length=4096, gradient_checkpointing=True).peak_gib < base.peak_gib
    assert estimate_peak_memory(f, "sft", batch_size=1, max_length=4096).peak_gib < base.peak_gib
    rl = estimate_peak_memory(f, "rl", num_generations=8, max_completion_length=1024)
    assert estimate_peak_memory(f, "rl", num_generations=8, max_completion_length=1024,
                                micro_batch_size=2).peak_gib < rl.peak_gib
    with pytest.raises(ValueError, match="stage must be"):
        estimate_peak_memory(f, "dpo")


def test_check_fits_refuses_with_the_knobs():
    est = estimate_peak_memory(KNOWN_MODELS["Qwen/Qwen2.5-VL-7B-Instruct"], "rl", dtype="fp16",
                               num_generations=8, max_completion_length=1024, policy_prompt_tokens=4096)
    with pytest.raises(MemoryTooLarge) as err:
        check_fits(est, T4)
    text = str(err.value)
    for knob in ("num_generations", "max_completion_length", "gradient_checkpointing", "micro_batch_size",
                 "quantization", "Tesla T4"):
        assert knob in text
    small = estimate_peak_memory(model_facts("toy-tiny"), "rl", dtype="fp32")
    assert check_fits(small, H100) == pytest.approx((79.1 - 0.5) * 0.95)
    assert check_fits(small, DeviceInfo(type="mps")) is None  # unknown capacity: nothing refused
    assert "expected peak for rl" in format_estimate(small)


def test_presets_fit_their_hardware():
    """The colab-t4 preset on a T4 (fp16) and the paper preset on 80 GB GPUs x 8 (bf16), every stage."""
    from mpi.config import get_config

    for preset, device, dtype, procs in (("colab-t4", T4, "fp16", 1), ("paper", H100, "bf16", 8)):
        cfg = get_config(preset)
        for stage in ("cpt", "sft", "rl"):
            est = estimate_peak_memory(cfg, stage, dtype=dtype, num_processes=procs)
            check_fits(est, device)
