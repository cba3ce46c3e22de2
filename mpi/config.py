"""One run configuration for every stage, with named presets.

A notebook's config cell or the CLI picks a preset and overrides fields by name:

    cfg = get_config("toy", seed=1, sft_epochs=2)

Stage modules read the fields they need (`mpi.supervised`, `mpi.poro`, `mpi.evaluate`). Every knob
is a plain field so that `dataclasses.asdict(cfg)` is the whole record of a run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

PRESET_ENV = "MPI_PRESET"


@dataclass
class RunConfig:
    # --- what runs where
    preset: str = "toy"
    model: str = "toy-small"  # "toy-tiny", "toy-small", a local directory, or a hub id
    quantization: str | None = None  # "auto" (4-bit on CUDA only), "4bit", or None
    device: str | None = None  # None = get_device()
    seed: int = 0
    out_dir: str = "runs"

    # --- data (see mpi.data)
    data_preset: str = "toy"
    image_size: int = 112
    depths: tuple[int, ...] = (2,)
    datasets: tuple[str, ...] = ("clevr",)

    # --- LoRA (r=8 as in the paper's SFT); None disables LoRA for full fine-tuning
    lora_r: int | None = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    max_length: int = 1024

    # --- stage 1: VM-CPT
    cpt_epochs: float = 1.0
    cpt_learning_rate: float = 1e-3
    # --- stage 2: SFT
    sft_epochs: float = 1.0
    sft_learning_rate: float = 1e-3
    # Fraction of SFT batches that keep the policy in the prompt (0 = the paper's policy-free SFT). PolicyRollout
    # samples its guided half with the policy in context, so the model must still be able to read it.
    sft_policy_in_context_frac: float = 0.0
    batch_size: int = 8  # reduce if out of memory
    grad_accum_steps: int = 1  # raise to keep the effective batch when batch_size shrinks
    # --- stage 3: PolicyRollout GRPO / DAPO
    rl_steps: int = 30
    # The RL budget as a rule that scales from the toy to the paper: rl_epochs passes over the training prompts,
    # steps = ceil(rl_epochs x train prompts / prompts_per_step), i.e. rl_epochs x train prompts x G policy-free
    # samples (PoRo adds as many guided ones). None = rl_steps as given. The paper: 2 epochs over 20K prompts
    # (rollout batch 384); the toy's 1,000 prompts at 4 per step: rl_epochs=1.2 is 300 steps, 10x rl_steps=30.
    rl_epochs: float | None = None
    rl_learning_rate: float = 1e-4
    num_generations: int = 4  # G per origin; PolicyRollout doubles the group to 2G. Reduce if OOM.
    max_completion_length: int = 48  # reduce if out of memory
    prompts_per_step: int = 4
    micro_batch_size: int | None = None  # RL: sequences per scoring forward/backward (None = whole step). Lower if OOM.
    gradient_checkpointing: bool = False  # recompute activations in backward: far less memory, ~30% slower

    # --- bookkeeping (they change neither the data nor the weights, so a run directory accepts new values)
    # Checkpoint every K optimizer steps in every training stage: a stage killed mid-way (a Colab disconnect)
    # resumes from its last checkpoint instead of from zero.
    save_every: int = 10
    # One printed progress line every K steps per training stage (besides its bar); None: at most ~50 lines.
    log_every: int | None = None

    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_values(self)  # a bad value is named here, at config time, not by a traceback mid-run

    def replace(self, **overrides: Any) -> "RunConfig":
        _check_fields(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # CI-sized: seconds per stage, proves the code path, learns little.
    # max_length: an N=4 item with its policy is ~1,120 tokens; at 768 `--table` (N=2, 4) stopped in VM-CPT (the dry
    # run names it now), so tiny holds N=4 like the toy. A bound, never a truncation: nothing else changes.
    "tiny": dict(model="toy-tiny", data_preset="toy", image_size=56, batch_size=4, max_length=1536,
                 cpt_epochs=1, sft_epochs=1, rl_steps=2, num_generations=2, max_completion_length=16,
                 prompts_per_step=2),
    # The default on a laptop: a few-M-parameter toy VLM that really learns ClevrPolicy N=2.
    # sft_epochs: 1 epoch (125 steps). On the old data 1 epoch left CoT SFT at chance and 4 reached 34%; on this
    # release's unseen-scene test split 4 epochs read 27.5 (chance 26.0) and cost 13 of the run's 19 minutes,
    # so the default run trains 1 and keeps its 10-minute budget (README, "Results on the toy").
    # sft_policy_in_context_frac: after policy-free SFT the toy could not read the policy any more (0-19% with
    # it in context), so PolicyRollout's guided half was noise (reward ~0) and RL lost 9-19 points. Half the SFT
    # batches with the policy in context keep that skill, and VM-CPT then pays off (README, "Results on the toy").
    # max_length: a ClevrPolicy N=4 item with its policy in context runs to ~1,080 toy tokens (never truncated:
    # a longer sequence is a config error), so N=2 and N=4 (`--table`) fit one setting.
    # max_completion_length: a compact N=4 chain of thought + answer runs to 65 toy tokens (N=2: 53, N=6: 75);
    # generation stops at the end-of-turn token, so the bound costs only when a model rambles.
    "toy": dict(model="toy-small", data_preset="small", image_size=112, max_completion_length=96, max_length=1536,
                sft_epochs=1, sft_policy_in_context_frac=0.5),
    # One Colab T4 (15 GB, no bf16): 3B in 4-bit NF4, fp16 compute, short completions. Sized to one free Colab
    # session by the dry run's estimate (mpi.wall_time: ~2.6 h): N=2 only, 60 RL steps, 160-token completions
    # (an N=2 CoT + answer is ~95 Qwen tokens). The full plan is opt-in, its hours printed by the dry run
    # (README "Presets"): --depths 2,4,6 --set rl_steps=200 --set max_completion_length=256 --set max_length=4992.
    "colab-t4": dict(model="Qwen/Qwen2.5-VL-3B-Instruct", quantization="4bit", data_preset="colab",
                     image_size=224, depths=(2,), lora_r=8, lora_alpha=16, lora_dropout=0.05,
                     max_length=2048, batch_size=1, grad_accum_steps=8,
                     cpt_learning_rate=1e-4, sft_learning_rate=1e-4, rl_learning_rate=1e-6,
                     num_generations=4, max_completion_length=160, prompts_per_step=1, rl_steps=60,
                     gradient_checkpointing=True, micro_batch_size=4),
    # The paper's setting (Qwen2.5-VL-7B, 8 GPUs); LoRA here where the paper trains all weights in CPT.
    "paper": dict(model="Qwen/Qwen2.5-VL-7B-Instruct", quantization=None, data_preset="paper",
                  image_size=448, depths=(2, 4, 6), datasets=("clevr", "gta"), lora_r=8, lora_alpha=16,
                  lora_dropout=0.05, max_length=8192, batch_size=2, grad_accum_steps=8,
                  gradient_checkpointing=True, micro_batch_size=5,
                  cpt_epochs=5, cpt_learning_rate=1e-5, sft_epochs=5, sft_learning_rate=1e-4,
                  rl_learning_rate=1e-6, num_generations=5, max_completion_length=1024,
                  prompts_per_step=8, rl_steps=500),
}


# RunConfig fields that do not change what is trained (a run directory made with other values is the same run).
BOOKKEEPING_FIELDS = ("save_every", "log_every")


def check_known_fields(config_class: type, overrides: dict[str, Any]) -> None:
    """Refuse overrides that name no field of a config dataclass, listing the valid ones (catches typos)."""
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(
            f"unknown {config_class.__name__} field(s) {unknown}; valid fields are: {', '.join(sorted(names))}"
        )


def _check_fields(overrides: dict[str, Any]) -> None:
    check_known_fields(RunConfig, overrides)


def get_config(preset: str | None = None, **overrides: Any) -> RunConfig:
    """The named preset with `overrides` applied. `preset=None` reads MPI_PRESET, default "toy"."""
    preset = preset or os.environ.get(PRESET_ENV) or "toy"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    _check_fields(overrides)
    values = {**PRESETS[preset], **overrides}
    return RunConfig(preset=preset, **values)


# =========================================================================== value checks

# The range each numeric field must lie in, beyond its type: (lowest, lowest allowed?, highest, highest allowed?).
# A field not listed only has its type checked (image_size: DataConfig names a bad size with its fix).
VALUE_RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "cpt_learning_rate": (0, False, None, False), "sft_learning_rate": (0, False, None, False),
    "rl_learning_rate": (0, False, None, False),  # <= 0 would not train, or ascend the loss
    "cpt_epochs": (0, True, None, False), "sft_epochs": (0, True, None, False), "rl_steps": (0, True, None, False),
    "rl_epochs": (0, False, None, False),
    "num_generations": (2, True, None, False),  # GRPO's advantage is a sample against its group: one has no spread
    "max_completion_length": (1, True, None, False), "max_length": (1, True, None, False),
    "prompts_per_step": (1, True, None, False), "batch_size": (1, True, None, False),
    "grad_accum_steps": (1, True, None, False), "micro_batch_size": (1, True, None, False),
    "lora_r": (1, True, None, False), "lora_alpha": (1, True, None, False), "lora_dropout": (0, True, 1, False),
    "sft_policy_in_context_frac": (0, True, 1, True), "save_every": (1, True, None, False),
    "log_every": (1, True, None, False), "seed": (0, True, None, False),
}


class ConfigValueError(ValueError):
    """RunConfig value(s) of the wrong type or out of range; `problems` holds (field, value, expected, example)."""

    def __init__(self, problems: list[tuple[str, Any, str, Any]]):
        self.problems = problems
        lines = [f"  - RunConfig.{name} = {value!r} ({type(value).__name__}): expected {expected}\n"
                 f"    fix: --set {name}={_json(example)} (in Python: get_config(..., {name}={example!r}))"
                 for name, value, expected, example in problems]
        super().__init__(f"{len(problems)} bad RunConfig value(s):\n" + "\n".join(lines))


def _json(value: Any) -> str:
    import json

    return json.dumps(list(value) if isinstance(value, tuple) else value, separators=(",", ":"))


def _type_name(tp: Any) -> str:
    """'an integer', 'a number', 'a string or null', 'a list of integers', ... for an annotation."""
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a JSON object"}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return f"a list of {_type_name(args[0]).split(' ', 1)[1]}s"
    return names.get(origin or tp, getattr(tp, "__name__", str(tp)))


def _has_type(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:  # True is an int in Python, not here
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # an integer is a number: --set rl_learning_rate=1 parses as 1
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if origin is tuple:
        return isinstance(value, (tuple, list)) and all(_has_type(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return isinstance(value, origin or tp)


def _range_text(low, low_ok, high, high_ok) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>=' if low_ok else '>'} {low}")
    if high is not None:
        parts.append(f"{'<=' if high_ok else '<'} {high}")
    return " and ".join(parts)


def value_problems(cfg: RunConfig) -> list[tuple[str, Any, str, Any]]:
    """(field, value, what was expected, a valid example: the preset's value) for every RunConfig field of the
    wrong type or out of its range."""
    hints = typing.get_type_hints(type(cfg))
    problems = []
    for f in dataclasses.fields(cfg):
        value, tp = getattr(cfg, f.name), hints[f.name]
        bound = VALUE_RANGES.get(f.name)
        optional = type(None) in typing.get_args(tp)
        plain = typing.Union[tuple(a for a in typing.get_args(tp) if a is not type(None))] if optional else tp
        expected = _type_name(plain) + (f" {_range_text(*bound)}" if bound else "") + (", or null" if optional else "")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        example = PRESETS.get(cfg.preset, {}).get(f.name, default)
        if not _has_type(value, tp):
            problems.append((f.name, value, expected, example))
            continue
        if bound is None or value is None:
            continue
        low, low_ok, high, high_ok = bound
        if (low is not None and (value < low or (value == low and not low_ok))) or \
                (high is not None and (value > high or (value == high and not high_ok))):
            problems.append((f.name, value, expected, example))
    return problems


def check_values(cfg: RunConfig) -> RunConfig:
    """Raise ConfigValueError naming each field of the wrong type or out of range; list-valued tuples become tuples."""
    problems = value_problems(cfg)
    if problems:
        raise ConfigValueError(problems)
    for f in dataclasses.fields(cfg):  # JSON gives lists (--set depths=[2,4]); the config keeps tuples
        if isinstance(getattr(cfg, f.name), list) and typing.get_origin(typing.get_type_hints(type(cfg))[f.name]) is tuple:
            setattr(cfg, f.name, tuple(getattr(cfg, f.name)))
    return cfg
