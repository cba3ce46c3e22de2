"""The methods the course compares and the training stages each one chains (pipeline, report and dry run).

A method is a chain of training stages, each trained on top of the previous one: TriMPI is VM-CPT, then
CoT SFT, then PoRo-GRPO. Chains share prefixes (CoT SFT, CoT SFT + GRPO and CoT SFT + DAPO start from one CoT
SFT adapter), so `training_chains` trains each prefix once.
"""

from __future__ import annotations

from typing import Sequence

# method -> its training chain (each element one stage, trained on top of the previous one)
METHODS: dict[str, tuple[str, ...]] = {
    "in-context": (),
    "direct-sft": ("direct-sft",),
    "cot-sft": ("cot-sft",),
    "vmcpt-cot-sft": ("cpt", "cot-sft"),
    "cot-sft-grpo": ("cot-sft", "grpo"),
    "cot-sft-dapo": ("cot-sft", "dapo"),
    "vmcpt-cot-sft-grpo": ("cpt", "cot-sft", "grpo"),
    "trimpi-grpo": ("cpt", "cot-sft", "poro-grpo"),
    "trimpi-grpo-wrong": ("cpt", "cot-sft", "poro-grpo-wrong"),
    "trimpi-grpo-adaptive": ("cpt", "cot-sft", "poro-grpo-adaptive"),
    "trimpi-dapo": ("cpt", "cot-sft", "poro-dapo"),
}
METHOD_LABELS = {
    "in-context": "in-context policy (zero-shot)",
    "direct-sft": "direct SFT",
    "cot-sft": "CoT SFT",
    "vmcpt-cot-sft": "VM-CPT + CoT SFT",
    "cot-sft-grpo": "CoT SFT + GRPO",
    "cot-sft-dapo": "CoT SFT + DAPO",
    "vmcpt-cot-sft-grpo": "VM-CPT + CoT SFT + GRPO",
    "trimpi-grpo": "TriMPI (PoRo-GRPO)",
    "trimpi-grpo-wrong": "TriMPI, wrong policy in the guided half (control)",
    "trimpi-grpo-adaptive": "TriMPI, guided half only for all-wrong groups (adaptive)",
    "trimpi-dapo": "TriMPI (PoRo-DAPO)",
}
DEFAULT_METHODS = ("in-context", "cot-sft", "trimpi-grpo")
# The RL issue's table: RL above SFT? PoRo above plain GRPO? and the wrong-policy control (`--table`).
TABLE_METHODS = ("in-context", "cot-sft", "cot-sft-grpo", "vmcpt-cot-sft", "vmcpt-cot-sft-grpo", "trimpi-grpo",
                 "trimpi-grpo-wrong")
SUPERVISED_STAGES = ("cpt", "cot-sft", "direct-sft")  # trained by mpi.supervised
RL_STAGES = ("grpo", "dapo", "poro-grpo", "poro-dapo", "poro-grpo-wrong", "poro-grpo-adaptive")  # trained by mpi.poro


def memory_stage(stage: str) -> str:
    """The mpi.scale.memory estimate a training stage is checked against: "cpt", "sft" or "rl"."""
    return "rl" if stage in RL_STAGES else ("cpt" if stage == "cpt" else "sft")


def training_chains(methods: Sequence[str]) -> list[tuple[str, ...]]:
    """Every prefix of every method's chain, once, parents before children."""
    chains: list[tuple[str, ...]] = []
    for m in methods:
        chain = METHODS[m]
        for i in range(1, len(chain) + 1):
            if chain[:i] not in chains:
                chains.append(chain[:i])
    return sorted(chains, key=len)
