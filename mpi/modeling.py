"""One loader for every stage: the toy VLM or a hub checkpoint, optionally 4-bit (QLoRA) and LoRA.

    model, processor = load_model_and_processor("toy-small", lora=LoraSettings(r=8))
    model, processor = load_model_and_processor("Qwen/Qwen2.5-VL-3B-Instruct", quantization="auto", lora=LoraSettings())

Each decision (dtype, quantization, processor classes, hub reachability) is a small function of its
inputs so that the branches for hardware we do not have here (a T4, an A100, Colab's torchvision) are
unit-tested as decisions.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from mpi.device import DeviceInfo, describe_device, get_device, pick_dtype, seed_everything
from mpi.toy import build_toy, is_toy, load_toy_processor, load_toy_tokenizer, toy_processor_class

# LoRA goes on the language model only. Qwen2.5-VL's vision blocks reuse the names
# gate_proj/up_proj/down_proj, so a plain name list would put adapters on the vision tower too.
LANGUAGE_MODEL_LORA_TARGETS = (
    r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)
# Modules kept in full precision under 4-bit: matched by name prefix by transformers' bnb integration.
QUANTIZATION_SKIP_MODULES = ["model.visual", "lm_head"]


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | list[str] = LANGUAGE_MODEL_LORA_TARGETS
    # Continual-pretraining recipes also adapt the embeddings and output layer (with a smaller
    # learning rate, see mpi.supervised); off by default.
    train_embeddings: bool = False
    extra: dict = field(default_factory=dict)

    def to_peft(self):
        from peft import LoraConfig

        targets = self.target_modules
        if self.train_embeddings:
            # peft matches a string target by full regex: extend it with the two embedding layers.
            if not isinstance(targets, str):
                raise ValueError("train_embeddings=True needs target_modules as one regex string")
            targets = f"(?:{targets})|(?:.*language_model\\.embed_tokens)|(?:lm_head)"
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=targets, bias="none", task_type="CAUSAL_LM", **self.extra)


# --------------------------------------------------------------------------- decisions


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def processor_backend(torchvision_available: bool, is_toy_model: bool) -> str:
    """'stock' = transformers' own Qwen processor classes (need torchvision, as on Colab);
    'pil' = our processor subclass without video plus the PIL image processor."""
    if is_toy_model:
        return "pil"  # the toy ships a fixed-resolution PIL processor either way
    return "stock" if torchvision_available else "pil"


def bitsandbytes_can_4bit(device_type: str) -> bool:
    """bitsandbytes >= 0.45 runs NF4 on CPU; CUDA needs a working CUDA build."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    return device_type in ("cuda", "cpu")


def decide_quantization(requested: str | None, device_type: str, bnb_ok: bool) -> str | None:
    """'auto' -> 4-bit on CUDA (QLoRA), none elsewhere; '4bit' is honoured wherever bitsandbytes can."""
    if requested in (None, "none", False):
        return None
    if requested == "auto":
        return "4bit" if device_type == "cuda" and bnb_ok else None
    if requested == "4bit":
        if not bnb_ok:
            raise RuntimeError(
                f"quantization='4bit' was asked for on device '{device_type}', but bitsandbytes cannot run "
                "4-bit there. Install bitsandbytes>=0.45 (CPU or CUDA), or pass quantization=None."
            )
        return "4bit"
    raise ValueError(f"quantization must be 'auto', '4bit' or None, got {requested!r}")


def bnb_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=list(QUANTIZATION_SKIP_MODULES),
    )


OFFLINE_HINT = (
    "To run offline, use the toy preset (model='toy-small' / --preset toy), or download the model once "
    "with network access (huggingface-cli download {name}) and set HF_HUB_OFFLINE=1."
)


def _hub_cached(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_model_available(name: str, *, offline: bool | None = None, reachable=_hub_reachable) -> None:
    """Fail in seconds, with the fix, when a hub id can be neither found in the cache nor downloaded.

    Without this, transformers retries an unreachable hub for minutes before failing.
    """
    if is_toy(name) or Path(name).exists():
        return
    if "/" not in name:
        raise ValueError(f"model {name!r} is neither a toy name (toy-tiny, toy-small), a directory, nor a hub id 'org/name'")
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if _hub_cached(name):
        return
    if offline:
        raise OSError(f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. " + OFFLINE_HINT.format(name=name))
    if not reachable():
        raise OSError(f"cannot reach huggingface.co to download {name}. " + OFFLINE_HINT.format(name=name))


# --------------------------------------------------------------------------- loading


def load_processor(name_or_path: str | os.PathLike, *, backend: str | None = None):
    path = str(name_or_path)
    toy = (Path(path) / "toy_spec.json").exists()
    backend = backend or processor_backend(has_torchvision(), toy)
    if toy:
        return load_toy_processor(path)
    if backend == "stock":
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path)
    # A real checkpoint without torchvision: same tokenizer, chat template and image preprocessing
    # (PIL backend), no video.
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    return toy_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                              chat_template=tokenizer.chat_template)


def resolve_model_path(name: str, seed: int = 0) -> str:
    """Toy names become their cached build directory; anything else is passed to from_pretrained."""
    return str(build_toy(name, seed=seed)) if is_toy(name) else name


def load_model_and_processor(
    name_or_path: str,
    *,
    quantization: str | None = "auto",
    lora: LoraSettings | None = None,
    adapter: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    trainable: bool = True,
):
    """Load a model and its processor for any stage.

    name_or_path: "toy-tiny" / "toy-small" (built offline), a local directory, or a hub id.
    quantization: "auto" (4-bit NF4 on CUDA, none on CPU), "4bit", or None.
    lora: LoraSettings to add fresh adapters (language model only), or None for no adapters.
    adapter: a saved peft adapter directory to continue from (e.g. the VM-CPT adapter before SFT).
    """
    from transformers import AutoModelForImageTextToText

    check_model_available(str(name_or_path))
    seed_everything(seed)
    device = torch.device(device) if device is not None else get_device()
    info: DeviceInfo = describe_device(device)
    dtype = dtype or pick_dtype(info)
    quant = decide_quantization(quantization, device.type, bitsandbytes_can_4bit(device.type))
    path = resolve_model_path(str(name_or_path), seed=seed)

    kwargs = dict(dtype=dtype)
    if quant == "4bit":
        kwargs["quantization_config"] = bnb_config(dtype)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    if quant is None:
        model.to(device)
    vision_tower_overflow_safe(model, dtype)
    if quant == "4bit" and device.type == "cpu" and trainable:
        keep_cpu_4bit_trainable(model)
    processor = load_processor(path)

    if quant == "4bit" and trainable:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    elif lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora.to_peft())
    if not trainable:
        model.eval()
    return model, processor


def vision_tower(model):
    """The model's vision encoder (Qwen2.5-VL's `model.visual`), or None."""
    for owner in (model, getattr(model, "model", None), getattr(getattr(model, "model", None), "model", None)):
        visual = getattr(owner, "visual", None) if owner is not None else None
        if isinstance(visual, torch.nn.Module):
            return visual
    return None


def vision_tower_overflow_safe(model, compute_dtype: torch.dtype) -> str:
    """Under fp16 compute (a T4: no bf16) keep the vision tower in float32; returns what was done.

    Qwen2.5-VL's vision blocks grow residual activations past fp16's 65,504 on real images: in fp16 they
    become inf, then NaN after the next norm, and every image token of the prompt is NaN (vLLM PR 13968 clamps
    them for the same reason). In float32 the tower cannot overflow; its output passes through the merger's
    norm before the language model casts it to fp16. A trainable 4-bit model had it already (peft's
    prepare_model_for_kbit_training upcasts every unquantized weight, and mpi.scale.memory counts it so); the
    evaluation load (trainable=False) and a plain fp16 load kept it in fp16. The cost there: 4-bit leaves the
    tower unquantized (QUANTIZATION_SKIP_MODULES), so float32 doubles its weights (Qwen2.5-VL-3B: 0.67 B
    parameters, +1.25 GiB); its compute is small (256 patches for a 224 px image). bf16 and fp32 are left as
    they are (bf16 has fp32's range)."""
    if compute_dtype != torch.float16:
        return "unchanged"
    visual = vision_tower(model)
    if visual is None:
        return "no vision tower"
    visual.float()
    return "vision tower kept in float32 (fp16 overflow)"


def keep_cpu_4bit_trainable(model) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference; returns the number of layers switched.

    On a CPU with AVX512-BF16, a `Linear4bit` in eval mode converts its weight to an inference-only layout
    the first time it runs without grad, and keeps it. Every RL step samples in eval mode, then trains: the
    trained forward on the repacked weight fails ("a view of a leaf Variable that requires grad is being used
    in an in-place operation"). CUDA never repacks; this only matters for the CPU 4-bit path the tests take."""
    switched = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def lora_module_names(model) -> list[str]:
    """Names of the modules that carry LoRA weights."""
    return sorted({name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A" in name})


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


@contextlib.contextmanager
def reference_model(model) -> Iterator[torch.nn.Module]:
    """The KL reference: the same model with its LoRA adapters switched off (no second copy in memory)."""
    if not hasattr(model, "disable_adapter"):
        raise ValueError(
            "a KL reference needs a LoRA model (the reference is the base with adapters disabled); "
            "load with lora=LoraSettings(...) or set beta=0 to train without a KL term"
        )
    with model.disable_adapter():
        yield model


def smoke(model_name: str = "toy-tiny", seed: int = 0) -> dict:
    """Build the toy VLM offline, run one forward (loss with image tokens masked) and one generate."""
    import time

    from PIL import Image

    t0 = time.perf_counter()
    model, processor = load_model_and_processor(model_name, quantization=None, seed=seed, trainable=False)
    size = processor.image_processor.size["shortest_edge"] ** 0.5
    image = Image.new("RGB", (int(size), int(size)), (40, 160, 200))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], images=[image], return_tensors="pt").to(model.device)
    labels = batch["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100  # image tokens never carry loss
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss.item()
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    completion = processor.tokenizer.decode(out[0, batch["input_ids"].shape[1]:])
    _, total = count_parameters(model)
    result = {
        "model": model_name, "parameters": total, "prompt_tokens": int(batch["input_ids"].shape[1]),
        "image_tokens": int((batch["input_ids"] == model.config.image_token_id).sum()),
        "loss": loss, "generated": completion, "seconds": time.perf_counter() - t0,
    }
    print(f"built {model_name}: {total:,} parameters | prompt {result['prompt_tokens']} tokens "
          f"({result['image_tokens']} image tokens) | loss {loss:.3f} (random init: ~ln(vocab)) | "
          f"generated {completion!r} | {result['seconds']:.1f}s")
    return result


def available_tokenizers(max_real: int = 2) -> dict[str, Any]:
    """Tokenizers to count prompt tokens with (mpi.data.token_report): the toy's and up to `max_real` real ones
    already in the local Hugging Face cache. Never downloads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    toks: dict[str, Any] = {}
    toks["toy"] = load_toy_tokenizer()
    candidates = ["Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2-VL-2B-Instruct",
                  "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"]
    try:
        from huggingface_hub import constants

        hub = Path(constants.HF_HUB_CACHE)
        cached = [p.name[len("models--"):].replace("--", "/") for p in hub.glob("models--*")] if hub.is_dir() else []
        candidates = [c for c in candidates if c in cached] + [c for c in cached if c not in candidates]
    except Exception:
        candidates = []
    for name in candidates:
        if sum(k != "toy" for k in toks) >= max_real:
            break
        try:
            from transformers import AutoTokenizer

            toks[name] = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception:
            continue
    return toks
