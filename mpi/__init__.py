"""mpi: Multimodal Policy Internalization (TriMPI) — a notebook-first course package.

Stages: VM-CPT (`mpi.supervised`), SFT (`mpi.supervised`), PolicyRollout GRPO/DAPO (`mpi.poro`),
data (`mpi.data`), evaluation (`mpi.evaluate`), the toy VLM (`mpi.toy`) and one loader for every
model (`mpi.modeling`).
"""

__version__ = "0.1.0"
