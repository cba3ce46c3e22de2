"""Run notebooks headless, and read the functions a notebook defines in view.

    python -m tests.nbtools notebooks/01_data_construction.ipynb   # execute one, as CI does

Cells tagged "mirror" (cell metadata tags) define functions that also live in `mpi`; tests import them
with `mirror_definitions` and check the two copies behave the same, so notebook and package never drift.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def execute(path: str | os.PathLike, timeout: int = 600, preset: str = "tiny") -> nbformat.NotebookNode:
    """Execute a notebook in its own folder (as Jupyter and Colab do) on the given preset."""
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.get("MPI_PRESET")
    os.environ["MPI_PRESET"] = preset
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if env_before is None:
            os.environ.pop("MPI_PRESET", None)
        else:
            os.environ["MPI_PRESET"] = env_before
    return nb


def mirror_definitions(path: str | os.PathLike, tag: str = "mirror") -> dict:
    """Execute only the notebook's cells tagged `tag` and return what they define."""
    nb = nbformat.read(Path(path), as_version=4)
    namespace: dict = {}
    cells = [c for c in nb.cells if c.cell_type == "code" and tag in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise ValueError(f"{path} has no code cell tagged {tag!r}")
    for cell in cells:
        exec(compile(cell.source, f"{Path(path).name}:{tag}", "exec"), namespace)  # noqa: S102 - our own notebooks
    return namespace


def has_outputs(path: str | os.PathLike) -> bool:
    nb = nbformat.read(Path(path), as_version=4)
    return any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        t0 = time.perf_counter()
        execute(arg, preset=os.environ.get("MPI_PRESET", "tiny"))
        print(f"{arg}: ran in {time.perf_counter() - t0:.1f}s")
