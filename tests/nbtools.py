"""Build notebooks from their jupytext twins, run them headless, and read the functions they define in view.

    python -m tests.nbtools build                                   # every notebooks/NN_name.py -> NN_name.ipynb
    python -m tests.nbtools build notebooks/04_policy_rollout_grpo.py
    python -m tests.nbtools check                                   # exit 1 if a notebook and its twin differ
    python -m tests.nbtools notebooks/01_data_construction.ipynb    # execute one, as CI does
    python -m tests.nbtools --out /tmp/nb notebooks/02_vm_cpt_qlora.ipynb   # ... and keep its outputs

The twin (`notebooks/NN_name.py`, jupytext percent format) is the source. Every cell names its id in the
cell header (`# %% id="setup"`); `build` moves it into the notebook's cell id, so rebuilding gives the same
bytes and a Colab link to a cell stays valid. `jupytext --to ipynb` alone would invent fresh ids each time.

Cells tagged "mirror" (`# %% id="..." tags=["mirror"]`) define functions that also live in `mpi`; tests
import them with `mirror_definitions` and check the two copies behave the same, so notebook and package
never drift.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
TWINS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
CELL_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# What Colab needs to offer a GPU runtime; the same for every notebook, so it is not repeated in the twins.
NOTEBOOK_METADATA = {
    "accelerator": "GPU",
    "colab": {"gpuType": "T4", "provenance": []},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


class TwinError(ValueError):
    """A twin that cannot become a notebook (a cell without an id, a duplicate id)."""


def twin_of(notebook: str | os.PathLike) -> Path:
    return Path(notebook).with_suffix(".py")


def build_notebook(twin: str | os.PathLike) -> nbformat.NotebookNode:
    """The notebook a twin describes: its cells with the ids from their headers, no outputs."""
    import jupytext

    twin = Path(twin)
    nb = jupytext.read(twin, fmt="py:percent")
    seen: set[str] = set()
    for index, cell in enumerate(nb.cells):
        cell_id = cell.metadata.pop("id", None)
        first = cell.source.splitlines()[0][:60] if cell.source else ""
        if cell_id is None:
            raise TwinError(f"{twin}: cell {index} ({first!r}) has no id; write its header as "
                            f'`# %% id="a-unique-name"` (or `# %% [markdown] id="..."`)')
        if not CELL_ID.match(str(cell_id)) or cell_id in seen:
            raise TwinError(f"{twin}: cell {index} id {cell_id!r} is {'a duplicate' if cell_id in seen else 'invalid'}; "
                            "ids are unique, 1-64 characters of letters, digits, - and _")
        seen.add(cell_id)
        cell["id"] = str(cell_id)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata = nbformat.from_dict(NOTEBOOK_METADATA)
    nb.nbformat, nb.nbformat_minor = 4, 5
    return nb


def notebook_text(twin: str | os.PathLike) -> str:
    return nbformat.writes(build_notebook(twin)) + "\n"


def build(twins=None) -> list[Path]:
    """Write NN_name.ipynb next to each twin; returns the notebooks written."""
    written = []
    for twin in [Path(t) for t in (twins or TWINS)]:
        out = twin.with_suffix(".ipynb")
        out.write_text(notebook_text(twin))
        written.append(out)
    return written


def _cell_view(cell) -> tuple:
    return (cell.get("id"), cell.cell_type, cell.source, tuple(cell.get("metadata", {}).get("tags", [])))


def twin_differences(notebook: str | os.PathLike) -> list[str]:
    """How a stored notebook differs from what its twin builds (cell ids, types, sources, tags); [] if equal."""
    notebook = Path(notebook)
    twin = twin_of(notebook)
    if not twin.exists():
        return [f"{notebook.name} has no twin {twin.name}"]
    stored = nbformat.read(notebook, as_version=4).cells
    built = build_notebook(twin).cells
    problems = []
    if len(stored) != len(built):
        problems.append(f"{notebook.name} has {len(stored)} cells, {twin.name} builds {len(built)}")
    for k, (a, b) in enumerate(zip(stored, built)):
        if _cell_view(a) != _cell_view(b):
            fields = [name for name, x, y in zip(("id", "type", "source", "tags"), _cell_view(a), _cell_view(b)) if x != y]
            problems.append(f"{notebook.name} cell {k} (id {b.get('id')!r}) differs from its twin in {', '.join(fields)}")
    return problems


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


def mirror_cells(path: str | os.PathLike, tag: str = "mirror") -> list[str]:
    nb = nbformat.read(Path(path), as_version=4)
    cells = [c.source for c in nb.cells if c.cell_type == "code" and tag in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise ValueError(f"{path} has no code cell tagged {tag!r}")
    return cells


def mirror_definitions(path: str | os.PathLike, tag: str = "mirror") -> dict:
    """Execute only the notebook's cells tagged `tag` and return what they define."""
    namespace: dict = {}
    for source in mirror_cells(path, tag):
        exec(compile(source, f"{Path(path).name}:{tag}", "exec"), namespace)  # noqa: S102 - our own notebooks
    return namespace


def run_cells(path: str | os.PathLike, ids: list[str], namespace: dict | None = None) -> dict:
    """Execute the notebook's cells with these ids, in this order, in one namespace (returned): a test edits
    the namespace between two calls as a learner edits a cell."""
    cells = {c.get("id"): c for c in nbformat.read(Path(path), as_version=4).cells}
    namespace = {} if namespace is None else namespace
    for cell_id in ids:
        exec(compile(cells[cell_id].source, f"{Path(path).name}:{cell_id}", "exec"), namespace)  # noqa: S102
    return namespace


def has_outputs(path: str | os.PathLike) -> bool:
    nb = nbformat.read(Path(path), as_version=4)
    return any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "build":
        for out in build(argv[1:] or None):
            print("wrote", out.relative_to(ROOT) if out.is_relative_to(ROOT) else out)
        return 0
    if argv and argv[0] == "check":
        problems = [p for nb in (argv[1:] or NOTEBOOKS) for p in twin_differences(nb)]
        print("\n".join(problems) or "every notebook matches its twin")
        return 1 if problems else 0
    out_dir = None
    if argv[:1] == ["--out"]:  # keep the executed notebooks (with outputs) in this folder, to read them
        out_dir, argv = Path(argv[1]), argv[2:]
    for arg in argv:
        t0 = time.perf_counter()
        nb = execute(arg, preset=os.environ.get("MPI_PRESET", "tiny"))
        print(f"{arg}: ran in {time.perf_counter() - t0:.1f}s")
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out_dir / Path(arg).name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
