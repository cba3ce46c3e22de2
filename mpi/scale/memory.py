"""How much GPU memory a stage will need, before it runs: a breakdown in GiB and a refusal with the knobs.

    est = estimate_peak_memory(cfg, "sft")          # cfg: mpi.config.RunConfig (or model facts + knobs)
    print(format_estimate(est))
    check_fits(est, describe_device())              # raises MemoryTooLarge listing what to turn

The estimate is arithmetic on the architecture (no model is loaded), term by term:

    weights       4-bit NF4 (0.5 B/param + double-quantised absmax) for the language model's linear layers;
                  everything else in the compute dtype, or fp32 where QLoRA preparation upcasts it
                  (peft's prepare_model_for_kbit_training casts every non-4-bit weight to fp32)
    trainable     LoRA (fp32 in peft) or all weights: weight + gradient + 2 AdamW states
    activations   tensors saved for backward, per token per decoder layer (see `layer_activation_bytes`);
                  with gradient checkpointing only each layer's input plus one layer's worth
    logits        (tokens x vocab) logits, their fp32 log-softmax and its gradient, alive together at the
                  start of backward
    kv_cache      generation of the step's groups: 2 (K,V) x layers x kv_heads x head_dim per token, for
                  every sequence padded to the longest prompt (the policy-guided one) + completion
    prefill       the no-grad working set of one decoder layer over all prompt tokens of the batch

Stage peaks: sft/cpt = weights + trainable + activations + logits; rl = weights + trainable +
max(generation = kv_cache + prefill, scoring = activations + logits of one micro-batch).
Verified on the toy models against measured CPU peaks (benchmarks/bench_memory.py); the hub-model
numbers apply the same formulas to their published configs and have not been measured on a GPU here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

GiB = 2**30
MEMORY_STAGES = ("cpt", "sft", "rl")
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 per 256 blocks
CUDA_CONTEXT_GIB = 0.5  # CUDA context + cuBLAS workspaces, outside torch's allocator
USABLE_FRACTION = 0.95  # allocator fragmentation headroom


# =========================================================================== model facts


@dataclass(frozen=True)
class ModelFacts:
    """The architecture numbers the estimate needs (a Qwen2-VL / Qwen2.5-VL)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_embeddings: bool
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_kind: str = "qwen2_5"  # "qwen2_5" (RMSNorm, gated MLP) or "qwen2" (LayerNorm, fc1/fc2)
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def image_tokens(self, image_size: int) -> int:
        side = image_size // self.patch_size
        return side * side // self.merge_size**2

    def image_patches(self, image_size: int) -> int:
        side = image_size // self.patch_size
        return side * side

    # --- parameter counts (checked against the real modules in mpi/tests/test_memory.py)
    def layer_linear_params(self) -> int:
        """Weights of one decoder layer's 7 linear layers (what 4-bit quantises and LoRA adapts)."""
        h, kv, inter = self.hidden_size, self.kv_dim, self.intermediate_size
        return h * h + 2 * h * kv + h * h + 3 * h * inter

    def text_params(self) -> int:
        h, kv = self.hidden_size, self.kv_dim
        per_layer = self.layer_linear_params() + (h + 2 * kv) + 2 * h  # + q/k/v biases + 2 norms
        embed = self.vocab_size * h
        head = 0 if self.tie_embeddings else self.vocab_size * h
        return embed + self.num_layers * per_layer + h + head

    def vision_params(self) -> int:
        vh, vi, out = self.vision_hidden, self.vision_intermediate, self.hidden_size
        patch = 3 * self.temporal_patch_size * self.patch_size**2 * vh
        attn = vh * 3 * vh + 3 * vh + vh * vh + vh
        merged = vh * self.merge_size**2
        if self.vision_kind == "qwen2_5":
            block = 2 * vh + attn + 2 * (vh * vi + vi) + vi * vh + vh
            merger = vh + merged * merged + merged + merged * out + out
        elif self.vision_kind == "qwen2":
            block = 4 * vh + attn + vh * vi + vi + vi * vh + vh
            merger = 2 * vh + merged * merged + merged + merged * out + out
        else:
            raise ValueError(f"vision_kind must be 'qwen2_5' or 'qwen2', got {self.vision_kind!r}")
        return patch + self.vision_depth * block + merger

    def total_params(self) -> int:
        return self.text_params() + self.vision_params()

    def lora_params(self, r: int) -> int:
        """LoRA A (r x in) + B (out x r) on the 7 linear layers of every decoder layer."""
        h, kv, inter = self.hidden_size, self.kv_dim, self.intermediate_size
        per_layer = r * ((h + h) + (h + kv) * 2 + (h + h) + 2 * (h + inter) + (inter + h))
        return self.num_layers * per_layer


# Published configs (config.json on the Hub) of the models the presets name.
KNOWN_MODELS: dict[str, ModelFacts] = {
    "Qwen/Qwen2.5-VL-7B-Instruct": ModelFacts("Qwen/Qwen2.5-VL-7B-Instruct", 152064, 3584, 18944, 28, 28, 4, False,
                                              32, 1280, 3420),
    "Qwen/Qwen2.5-VL-3B-Instruct": ModelFacts("Qwen/Qwen2.5-VL-3B-Instruct", 151936, 2048, 11008, 36, 16, 2, True,
                                              32, 1280, 3420),
    "Qwen/Qwen2-VL-2B-Instruct": ModelFacts("Qwen/Qwen2-VL-2B-Instruct", 151936, 1536, 8960, 28, 12, 2, True,
                                            32, 1280, 5120, vision_kind="qwen2"),
}


def facts_from_config(config: Any, name: str = "") -> ModelFacts:
    """ModelFacts from a transformers Qwen2(.5)-VL config object or its config.json dict."""
    get = (lambda obj, key, default=None: obj.get(key, default)) if isinstance(config, Mapping) else \
        (lambda obj, key, default=None: getattr(obj, key, default))
    text = get(config, "text_config") or config
    vision = get(config, "vision_config")
    if vision is None:
        raise ValueError("facts_from_config: a Qwen2-VL / Qwen2.5-VL config with a vision_config is needed")
    kind = "qwen2" if get(vision, "embed_dim") is not None else "qwen2_5"
    vh = get(vision, "embed_dim") if kind == "qwen2" else get(vision, "hidden_size")
    vi = int(vh * get(vision, "mlp_ratio", 4)) if kind == "qwen2" else get(vision, "intermediate_size")
    tie = get(config, "tie_word_embeddings")
    if tie is None:
        tie = get(text, "tie_word_embeddings", False)
    return ModelFacts(
        name=name, vocab_size=get(text, "vocab_size"), hidden_size=get(text, "hidden_size"),
        intermediate_size=get(text, "intermediate_size"), num_layers=get(text, "num_hidden_layers"),
        num_heads=get(text, "num_attention_heads"), num_kv_heads=get(text, "num_key_value_heads"),
        tie_embeddings=bool(tie), vision_depth=get(vision, "depth"), vision_hidden=vh, vision_intermediate=vi,
        vision_kind=kind, patch_size=get(vision, "patch_size", 14), merge_size=get(vision, "spatial_merge_size", 2),
        temporal_patch_size=get(vision, "temporal_patch_size", 2),
    )


def model_facts(name: str, seed: int = 0) -> ModelFacts:
    """Facts for a toy name (its built config), a local directory, or a hub id (cache, else KNOWN_MODELS)."""
    from mpi.toy import build_toy, is_toy

    if is_toy(name):
        return facts_from_config(json.loads((build_toy(name, seed=seed) / "config.json").read_text()), name)
    if (Path(name) / "config.json").exists():
        return facts_from_config(json.loads((Path(name) / "config.json").read_text()), name)
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if isinstance(cached, str):
            return facts_from_config(json.loads(Path(cached).read_text()), name)
    except ImportError:  # pragma: no cover
        pass
    raise ValueError(f"no architecture facts for {name!r}: pass ModelFacts(...) or one of {sorted(KNOWN_MODELS)}, "
                     "a toy name, or a directory with config.json")


# =========================================================================== the knobs


@dataclass(frozen=True)
class MemoryKnobs:
    """Everything the estimate depends on besides the architecture. Built from a RunConfig by
    `knobs_from_config`; every field can be overridden by name."""

    dtype: str = "bf16"  # compute dtype: bf16, fp16 (T4) or fp32 (CPU)
    quantization: str | None = None  # "4bit" or None
    lora_r: int | None = 8  # None = full fine-tuning
    batch_size: int = 1  # sequences per forward/backward in the supervised stages
    max_length: int = 1024  # supervised sequence length (and assumed length of a prompt with the policy)
    images_per_item: int = 1
    image_size: int = 448
    gradient_checkpointing: bool = False
    # PolicyRollout
    num_generations: int = 4  # G per origin
    policy_rollout: bool = True  # 2G per prompt
    prompts_per_process: int = 1  # groups generated by one process per step
    max_completion_length: int = 256
    policy_prompt_tokens: int | None = None  # None = max_length (a prompt with the policy in it)
    free_prompt_tokens: int | None = None  # None = image tokens + 96 text tokens
    micro_batch_size: int | None = None  # rows per scoring forward/backward; None = all rows of the step

    @property
    def bytes(self) -> int:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        return DTYPE_BYTES[self.dtype]


def knobs_from_config(cfg, *, dtype: str | None = None, num_processes: int = 1, **overrides: Any) -> MemoryKnobs:
    """MemoryKnobs of a RunConfig: dtype from the device (fp32 on CPU, fp16 on a T4, bf16 otherwise)
    unless given; prompts_per_step divided across `num_processes`. cfg.extra may carry
    gradient_checkpointing / micro_batch_size / images_per_item / policy_prompt_tokens."""
    if dtype is None:
        from mpi.device import describe_device, get_device, pick_dtype

        import torch

        dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[pick_dtype(describe_device(get_device(cfg.device)))]
    quant = cfg.quantization
    if quant == "auto":
        quant = "4bit" if dtype != "fp32" else None  # mpi.modeling: 4-bit on CUDA only
    extra = {k: v for k, v in (getattr(cfg, "extra", None) or {}).items() if k in {f.name for f in dataclasses.fields(MemoryKnobs)}}
    values = dict(
        dtype=dtype, quantization=quant, lora_r=cfg.lora_r, batch_size=cfg.batch_size, max_length=cfg.max_length,
        image_size=cfg.image_size, num_generations=cfg.num_generations,
        prompts_per_process=max(1, -(-cfg.prompts_per_step // num_processes)),
        max_completion_length=cfg.max_completion_length,
        gradient_checkpointing=bool(getattr(cfg, "gradient_checkpointing", False)),
        micro_batch_size=getattr(cfg, "micro_batch_size", None),
    )
    values.update(extra)
    values.update(overrides)
    return MemoryKnobs(**values)


# =========================================================================== the estimate


@dataclass
class MemoryEstimate:
    stage: str
    model: str
    knobs: MemoryKnobs
    parts: dict[str, float]  # GiB per term (only the terms of this stage's peak phase)
    peak_gib: float
    phase: str  # which phase sets the peak ("train", "generation", "scoring")
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "model": self.model, "peak_gib": self.peak_gib, "phase": self.phase,
                "parts": dict(self.parts), "knobs": dataclasses.asdict(self.knobs), "notes": list(self.notes)}


def activation_dtype_bytes(knobs: MemoryKnobs) -> int:
    """QLoRA preparation upcasts embeddings and norms to fp32, so the residual stream (and the K/V
    projections' outputs, which bitsandbytes returns in the input's dtype) are fp32."""
    return 4 if knobs.quantization == "4bit" else knobs.bytes


def layer_activation_bytes(f: ModelFacts, knobs: MemoryKnobs) -> float:
    """Bytes saved for backward per token by one decoder layer (LoRA or full training, SDPA attention).

    two RMSNorms       12 h each (fp32 input and normalised copy + the output; same bytes in fp32 or bf16)
    attention          rotated q and the attention output (2 h), rotated k and v (2 kv), as SDPA saves
                       them, in the activation dtype
    MLP                gate, SiLU(gate), up, their product (4 I)
    LoRA (r)           the r-wide inner activations of 7 adapters, fp32; when the activations are not fp32,
                       peft's fp32 copies of the adapters' inputs (6 h + I)
    """
    a = activation_dtype_bytes(knobs)
    h, inter, kv = f.hidden_size, f.intermediate_size, f.kv_dim
    total = 2 * 12 * h + (2 * h + 2 * kv + 4 * inter) * a
    if knobs.lora_r:
        total += 7 * knobs.lora_r * 4
        if a != 4:
            total += (6 * h + inter) * 4
    return float(total)


def weights_bytes(f: ModelFacts, knobs: MemoryKnobs, trainable: bool) -> float:
    """Bytes of the model's weights as loaded (4-bit layers, the rest in the compute dtype)."""
    total = f.total_params()
    if knobs.quantization == "4bit":
        quantised = f.num_layers * f.layer_linear_params()
        rest_bytes = 4 if trainable else knobs.bytes  # prepare_model_for_kbit_training -> fp32
        return quantised * NF4_BYTES_PER_PARAM + (total - quantised) * rest_bytes
    return total * knobs.bytes


def trainable_bytes(f: ModelFacts, knobs: MemoryKnobs) -> float:
    """Bytes of what training adds per trainable weight: its fp32 copy, gradient and AdamW states."""
    if knobs.lora_r:
        return f.lora_params(knobs.lora_r) * 16.0  # fp32 weight + grad + 2 AdamW states
    if knobs.quantization == "4bit":
        raise ValueError("full fine-tuning of a 4-bit model is not possible: set lora_r or quantization=None")
    # full fine-tuning: the weights are already counted; + gradient + 2 AdamW states in the param dtype
    return f.total_params() * 3.0 * knobs.bytes


def _train_pass_bytes(f: ModelFacts, knobs: MemoryKnobs, tokens: int, logit_tokens: int, logit_copies: float) -> dict[str, float]:
    """Saved activations for `tokens` tokens and the logits of `logit_tokens` tokens, at the start of
    backward, when both are alive: the fp32 log-softmax saved by the loss, the gradient arriving at it
    and the gradient it passes on (`logit_copies` fp32 tensors of tokens x vocab; the logits themselves
    are not kept by autograd).

    With gradient checkpointing only each layer's input is kept; a layer's full activations come back
    one layer at a time during backward, after the logits' tensors are gone, so the peak holds the
    larger of the two, not their sum (the `activations` term then carries that difference)."""
    per_layer = layer_activation_bytes(f, knobs)
    a = activation_dtype_bytes(knobs)
    logits = logit_tokens * f.vocab_size * 4.0 * logit_copies
    if knobs.gradient_checkpointing:
        acts = tokens * f.num_layers * f.hidden_size * a + max(0.0, tokens * per_layer - logits)
    else:
        acts = tokens * (f.num_layers * per_layer + 12 * f.hidden_size)  # + final norm
    return {"activations": acts, "logits": logits}


def _vision_bytes(f: ModelFacts, knobs: MemoryKnobs, images: int) -> float:
    """The frozen vision tower's working set (no graph is kept): one block over all patches."""
    patches = images * f.image_patches(knobs.image_size)
    return patches * (4 * f.vision_hidden + 2 * f.vision_intermediate) * knobs.bytes


def estimate_peak_memory(cfg_or_facts, stage: str = "sft", knobs: MemoryKnobs | None = None,
                         **overrides: Any) -> MemoryEstimate:
    """Expected peak memory of one process for `stage` ("cpt", "sft" or "rl"), in GiB with its parts.

    cfg_or_facts: a RunConfig (model and knobs read from it; `overrides` replace MemoryKnobs fields,
    e.g. dtype="fp16", gradient_checkpointing=True, num_processes=8), a model name, or ModelFacts
    together with `knobs`.
    """
    if stage not in MEMORY_STAGES:
        raise ValueError(f"stage must be one of {MEMORY_STAGES}, got {stage!r}")
    if isinstance(cfg_or_facts, ModelFacts):
        facts = cfg_or_facts
        knobs = dataclasses.replace(knobs or MemoryKnobs(), **overrides)
    elif isinstance(cfg_or_facts, str):
        facts = model_facts(cfg_or_facts)
        knobs = dataclasses.replace(knobs or MemoryKnobs(), **overrides)
    else:
        cfg = cfg_or_facts
        facts = model_facts(cfg.model, seed=cfg.seed)
        knobs = knobs_from_config(cfg, **overrides) if knobs is None else dataclasses.replace(knobs, **overrides)
    return _estimate(facts, knobs, stage)


def _prompt_lengths(f: ModelFacts, k: MemoryKnobs) -> tuple[int, int]:
    """(policy-free prompt, longest prompt of the generate batch) in tokens."""
    free = k.free_prompt_tokens if k.free_prompt_tokens is not None else \
        k.images_per_item * f.image_tokens(k.image_size) + 96
    if not k.policy_rollout:
        return free, free
    return free, (k.policy_prompt_tokens if k.policy_prompt_tokens is not None else k.max_length)


def supervised_parts(f: ModelFacts, k: MemoryKnobs) -> dict[str, float]:
    """Bytes of the dynamic terms of one VM-CPT / SFT forward + backward (batch_size x max_length)."""
    tokens = k.batch_size * k.max_length
    return {**_train_pass_bytes(f, k, tokens, tokens, logit_copies=3),
            "vision": _vision_bytes(f, k, k.batch_size * k.images_per_item)}


def generation_parts(f: ModelFacts, k: MemoryKnobs) -> dict[str, float]:
    """Bytes of one process's batched generate: prompts_per_process x 2G sequences."""
    seqs = k.prompts_per_process * k.num_generations * (2 if k.policy_rollout else 1)
    _, longest = _prompt_lengths(f, k)
    b = activation_dtype_bytes(k)
    return {
        # one batched generate: every row is left-padded to the longest (policy) prompt
        "kv_cache": seqs * (longest + k.max_completion_length) * 2 * f.num_layers * f.kv_dim * b,
        # one layer's no-grad working set (gate, up, product; residual and fp32 norm copies) and
        # the (seqs, P, P) boolean attention mask that left padding makes SDPA build
        "prefill": seqs * longest * ((3 * f.intermediate_size + 6 * f.hidden_size) * b + longest),
        "vision": _vision_bytes(f, k, k.prompts_per_process * (2 if k.policy_rollout else 1) * k.images_per_item),
    }


def scoring_parts(f: ModelFacts, k: MemoryKnobs) -> dict[str, float]:
    """Bytes of one scoring micro-batch with gradients: policy-free prompt + completion, logits of the
    completion only (logits_to_keep)."""
    seqs = k.prompts_per_process * k.num_generations * (2 if k.policy_rollout else 1)
    rows = min(k.micro_batch_size or seqs, seqs)
    free, _ = _prompt_lengths(f, k)
    T = k.max_completion_length
    return _train_pass_bytes(f, k, rows * (free + T), rows * (T + 1), logit_copies=3)


def _estimate(f: ModelFacts, k: MemoryKnobs, stage: str) -> MemoryEstimate:
    notes: list[str] = []
    static = {"weights": weights_bytes(f, k, trainable=True), "trainable": trainable_bytes(f, k)}
    if stage in ("cpt", "sft"):
        parts, phase = {**static, **supervised_parts(f, k)}, "train"
        notes.append(f"{k.batch_size * k.max_length} tokens per forward (batch_size x max_length, padding included)")
    else:
        gen, score = generation_parts(f, k), scoring_parts(f, k)
        gen_total, score_total = sum(gen.values()), sum(score.values())
        parts, phase = ({**static, **gen}, "generation") if gen_total >= score_total else ({**static, **score}, "scoring")
        free, longest = _prompt_lengths(f, k)
        seqs = k.prompts_per_process * k.num_generations * (2 if k.policy_rollout else 1)
        rows = min(k.micro_batch_size or seqs, seqs)
        notes.append(f"generation: {seqs} sequences x ({longest} prompt + {k.max_completion_length} completion) "
                     f"tokens = {gen_total / GiB:.2f} GiB; scoring: {rows} rows x ({free} + "
                     f"{k.max_completion_length}) tokens = {score_total / GiB:.2f} GiB")
    if k.quantization == "4bit":
        notes.append("4-bit: non-quantised weights (embeddings, vision tower, norms) are fp32 after QLoRA preparation")
    parts_gib = {name: value / GiB for name, value in parts.items()}
    return MemoryEstimate(stage=stage, model=f.name, knobs=k, parts=parts_gib, peak_gib=sum(parts_gib.values()),
                          phase=phase, notes=notes)


# =========================================================================== fits?


class MemoryTooLarge(RuntimeError):
    pass


def format_estimate(est: MemoryEstimate) -> str:
    lines = [f"expected peak for {est.stage} on {est.model}: {est.peak_gib:.2f} GiB ({est.phase} phase)"]
    for name, value in sorted(est.parts.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<12} {value:8.3f} GiB")
    lines.extend(f"  note: {n}" for n in est.notes)
    return "\n".join(lines)


def available_gib(device_info) -> float | None:
    """What a process may use: a GPU's memory minus the CUDA context, with fragmentation headroom;
    the machine's RAM on CPU; None when unknown (MPS)."""
    total = getattr(device_info, "total_memory_gb", None)
    if getattr(device_info, "type", "cpu") == "cuda" and total:
        return (total - CUDA_CONTEXT_GIB) * USABLE_FRACTION
    if getattr(device_info, "type", "cpu") == "cpu":
        try:
            import psutil

            return psutil.virtual_memory().total / GiB * USABLE_FRACTION
        except ImportError:  # pragma: no cover
            return None
    return total * USABLE_FRACTION if total else None


KNOB_TRIALS = (
    # (label, overrides, applies-to stages)
    ("batch_size", lambda k: {"batch_size": max(1, k.batch_size // 2)}, ("cpt", "sft")),
    ("max_length", lambda k: {"max_length": max(128, k.max_length // 2)}, ("cpt", "sft", "rl")),
    ("gradient_checkpointing", lambda k: {"gradient_checkpointing": True}, ("cpt", "sft", "rl")),
    ("num_generations", lambda k: {"num_generations": max(1, k.num_generations // 2)}, ("rl",)),
    ("prompts_per_step", lambda k: {"prompts_per_process": max(1, k.prompts_per_process // 2)}, ("rl",)),
    ("max_completion_length", lambda k: {"max_completion_length": max(16, k.max_completion_length // 2)}, ("rl",)),
    ("micro_batch_size", lambda k: {"micro_batch_size": max(1, (k.micro_batch_size or 2 * k.num_generations) // 2)}, ("rl",)),
    ("quantization", lambda k: {"quantization": "4bit"}, ("cpt", "sft", "rl")),
)


KNOB_TRIALS_BY_LABEL = {label: change for label, change, _ in KNOB_TRIALS}


def knob_suggestions(est: MemoryEstimate, facts: ModelFacts | None = None) -> list[tuple[str, str, float]]:
    """(knob, change, new peak GiB) for each knob that would lower this estimate, best first."""
    facts = facts or model_facts(est.model)
    out = []
    for label, change, stages in KNOB_TRIALS:
        if est.stage not in stages:
            continue
        new = change(est.knobs)
        if all(getattr(est.knobs, key) == value for key, value in new.items()):
            continue
        try:
            trial = _estimate(facts, dataclasses.replace(est.knobs, **new), est.stage)
        except ValueError:
            continue
        if trial.peak_gib < est.peak_gib - 1e-3:
            old = ", ".join(f"{key} {getattr(est.knobs, key)} -> {value}" for key, value in new.items())
            out.append((label, old, trial.peak_gib))
    return sorted(out, key=lambda t: t[2])


def combined_fix(est: MemoryEstimate, avail: float, facts: ModelFacts | None = None,
                 max_changes: int = 5) -> tuple[list[str], float]:
    """Greedy: turn the knob that lowers the estimate most, again, until it fits (or nothing helps)."""
    facts = facts or model_facts(est.model)
    changes, current = [], est
    for _ in range(max_changes):
        if current.peak_gib <= avail:
            break
        options = knob_suggestions(current, facts)
        if not options:
            break
        label, change, _ = options[0]
        new = dict(KNOB_TRIALS_BY_LABEL[label](current.knobs))
        current = _estimate(facts, dataclasses.replace(current.knobs, **new), current.stage)
        changes.append(change)
    return changes, current.peak_gib


def check_fits(est: MemoryEstimate, device_info=None, *, facts: ModelFacts | None = None) -> float | None:
    """Raise MemoryTooLarge (with the knobs to turn) when `est` exceeds what the device offers.

    Returns the available GiB (None when the device does not say, e.g. MPS: nothing is refused)."""
    if device_info is None:
        from mpi.device import describe_device

        device_info = describe_device()
    avail = available_gib(device_info)
    if avail is None or est.peak_gib <= avail:
        return avail
    lines = [f"{est.stage} on {est.model} needs about {est.peak_gib:.1f} GiB per process but "
             f"{getattr(device_info, 'name', '') or device_info.type} offers about {avail:.1f} GiB.",
             format_estimate(est), "Turn one of these knobs (each alone; new estimate):"]
    suggestions = knob_suggestions(est, facts)
    for label, change, new_peak in suggestions:
        mark = "fits" if new_peak <= avail else "still too large"
        lines.append(f"  {label:<24} {change:<44} {new_peak:7.2f} GiB  ({mark})")
    if not any(new_peak <= avail for _, _, new_peak in suggestions):
        changes, peak = combined_fix(est, avail, facts)
        verdict = "fits" if peak <= avail else "still too large: use a bigger GPU or more processes"
        lines.append(f"Together: {'; '.join(changes)} -> {peak:.2f} GiB ({verdict})")
    raise MemoryTooLarge("\n".join(lines))


def preflight(cfg, stage: str, device_info=None, *, num_processes: int = 1, quiet: bool = False,
              **overrides: Any) -> MemoryEstimate:
    """Print the expected peak of `stage` for `cfg` and refuse (MemoryTooLarge) if it cannot fit."""
    if device_info is None:
        from mpi.device import describe_device, get_device

        device_info = describe_device(get_device(cfg.device))
    dtype = overrides.pop("dtype", None)
    if dtype is None:
        from mpi.device import pick_dtype

        import torch

        dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[pick_dtype(device_info)]
    est = estimate_peak_memory(cfg, stage, dtype=dtype, num_processes=num_processes, **overrides)
    if not quiet:
        print(format_estimate(est))
    check_fits(est, device_info)
    return est


# =========================================================================== command line

KNOWN_GPUS = {  # name -> (total GiB as torch reports it, bf16)
    "t4": ("Tesla T4", 14.74, False), "l4": ("NVIDIA L4", 22.05, True), "a10g": ("NVIDIA A10G", 22.05, True),
    "a100-40": ("NVIDIA A100-SXM4-40GB", 39.39, True), "a100-80": ("NVIDIA A100-SXM4-80GB", 79.15, True),
    "h100": ("NVIDIA H100 80GB HBM3", 79.11, True),
}


def main(argv: list[str] | None = None) -> int:
    """python -m mpi.scale.memory --preset colab-t4 [--gpu t4] [--stage rl] [--num-processes 8] [--set field=value]"""
    import argparse

    from mpi.config import PRESETS, get_config
    from mpi.device import DeviceInfo, describe_device

    p = argparse.ArgumentParser(prog="python -m mpi.scale.memory", description="expected peak GPU memory per stage")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS))
    p.add_argument("--stage", default="all", choices=("all",) + MEMORY_STAGES)
    p.add_argument("--gpu", default=None, choices=sorted(KNOWN_GPUS), help="default: the detected device")
    p.add_argument("--num-processes", type=int, default=1, help="data-parallel processes (prompts are split)")
    p.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                   help="override a MemoryKnobs field, e.g. --set gradient_checkpointing=true")
    args = p.parse_args(argv)
    if args.gpu:
        name, total, bf16 = KNOWN_GPUS[args.gpu]
        device = DeviceInfo(type="cuda", name=name, bf16_supported=bf16,
                            compute_capability=(8, 0) if bf16 else (7, 5), total_memory_gb=total)
    else:
        device = describe_device()
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.strip()] = json.loads(value) if value not in ("", None) else None
    cfg = get_config(args.preset)
    status = 0
    for stage in (MEMORY_STAGES if args.stage == "all" else (args.stage,)):
        try:
            preflight(cfg, stage, device, num_processes=args.num_processes, **overrides)
            print(f"  fits {getattr(device, 'name', '') or device.type}\n")
        except MemoryTooLarge as err:
            print(str(err).split("\n", 1)[0])
            print("\n".join(line for line in str(err).splitlines()
                            if (line.startswith("  ") and "GiB  (" in line) or line.startswith("Together")))
            print()
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
