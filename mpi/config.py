"""One run configuration for every stage, with named presets.

A notebook's config cell or the CLI picks a preset and overrides fields by name:

    cfg = get_config("toy", seed=1, sft_epochs=2)

Stage modules read the fields they need (`mpi.supervised`, `mpi.poro`, `mpi.evaluate`). Every knob
is a plain field so that `dataclasses.asdict(cfg)` is the whole record of a run.
"""

from __future__ import annotations

import dataclasses
import os
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

    def replace(self, **overrides: Any) -> "RunConfig":
        _check_fields(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # CI-sized: seconds per stage, proves the code path, learns little.
    "tiny": dict(model="toy-tiny", data_preset="toy", image_size=56, batch_size=4, max_length=768,
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
    # One Colab T4 (15 GB, no bf16): 3B in 4-bit NF4, fp16 compute, short completions.
    "colab-t4": dict(model="Qwen/Qwen2.5-VL-3B-Instruct", quantization="4bit", data_preset="colab",
                     image_size=224, depths=(2, 4, 6), lora_r=8, lora_alpha=16, lora_dropout=0.05,
                     max_length=2048, batch_size=1, grad_accum_steps=8,
                     cpt_learning_rate=1e-4, sft_learning_rate=1e-4, rl_learning_rate=1e-6,
                     num_generations=4, max_completion_length=256, prompts_per_step=1, rl_steps=200,
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
