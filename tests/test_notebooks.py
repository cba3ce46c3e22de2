"""Every numbered notebook is built from its jupytext twin, is stored clean, keeps the course's conventions,
and runs top to bottom on the CI-sized preset."""

import json
from pathlib import Path

import nbformat
import pytest
import torch

from tests.nbtools import NOTEBOOKS, TWINS, TwinError, build_notebook, execute, has_outputs, notebook_text, twin_differences, twin_of

COLAB_BADGE = "colab.research.google.com/assets/colab-badge.svg"
IDS = [p.name for p in NOTEBOOKS]
# torch's intra-op thread count in a fresh process, as the notebook kernels run (read at collection, before any
# test changes it): the in-process CLI run below must match it, since another count sums in another order and
# changes the last bits of a gradient norm
KERNEL_THREADS = torch.get_num_threads()


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks/NN_name.ipynb found"
    assert [t.stem for t in TWINS] == [n.stem for n in NOTEBOOKS], "every notebook has a twin NN_name.py and back"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_matches_its_twin(path):
    problems = twin_differences(path)
    assert not problems, "\n".join(problems) + "\nrebuild: python -m tests.nbtools build " + twin_of(path).name
    # and byte for byte: a rebuild changes nothing (stable cell ids, no outputs)
    assert path.read_text() == notebook_text(twin_of(path)), f"rebuild {path.name}: python -m tests.nbtools build"


def test_the_twin_check_finds_a_difference(tmp_path):
    """The comparison must see a changed source, a changed tag and a changed id (or it proves nothing)."""
    twin = TWINS[0]
    text = twin.read_text()
    (tmp_path / twin.name).write_text(text)
    notebook = tmp_path / twin.with_suffix(".ipynb").name
    notebook.write_text(notebook_text(twin))
    assert twin_differences(notebook) == []
    nb = nbformat.read(notebook, as_version=4)
    code = next(c for c in nb.cells if c.cell_type == "code")
    for change in ("source", "tags", "id"):
        edited = nbformat.read(notebook, as_version=4)
        cell = edited.cells[nb.cells.index(code)]
        if change == "source":
            cell.source += "\nprint('edited in Jupyter, not in the twin')"
        elif change == "tags":
            cell.metadata["tags"] = ["mirror"]
        else:
            cell["id"] = "another-id"
        bad = tmp_path / "bad" / notebook.name
        bad.parent.mkdir(exist_ok=True)
        (bad.parent / twin.name).write_text(text)
        nbformat.write(edited, bad)
        problems = twin_differences(bad)
        assert problems and change in problems[0], (change, problems)


def test_a_twin_cell_without_an_id_is_refused(tmp_path):
    twin = tmp_path / "09_x.py"
    twin.write_text('# %% [markdown] id="title"\n# # x\n\n# %%\nprint(1)\n')
    with pytest.raises(TwinError, match=r"09_x.py: cell 1 .* has no id"):
        build_notebook(twin)
    twin.write_text('# %% id="a"\nprint(1)\n\n# %% id="a"\nprint(2)\n')
    with pytest.raises(TwinError, match="duplicate"):
        build_notebook(twin)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_conventions(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    assert not has_outputs(path), f"{path.name} is stored with outputs: clear them before committing"
    first = "".join(cells[0]["source"])
    assert COLAB_BADGE in first and path.name in first, "first cell must be a Colab badge linking this notebook"
    markdown = " ".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert "What you will learn" in markdown
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert "google.colab" in code[0] and "requirements-colab.txt" in code[0], "first code cell is the install cell"
    assert any("notebook_setup(" in c for c in code[:3]), "a config cell calling notebook_setup comes first"
    # the hardware picks the preset unless the learner names one (MPI_PRESET still wins)
    config = next(c for c in code if "notebook_setup(" in c)
    assert "PRESET = None" in config, f"{path.name}: the config cell must default to PRESET = None"
    assert "USE_DRIVE = False" in "\n".join(code[:3]), f"{path.name}: the optional Drive cell (off) comes before the config"
    # links to other notebooks name files that exist; no silent fallback to another data preset
    for other in set(__import__("re").findall(r"\b(\d\d_[a-z0-9_]+)\.ipynb", " ".join("".join(c["source"]) for c in cells))):
        assert (path.parent / f"{other}.ipynb").exists(), f"{path.name} links {other}.ipynb, which does not exist"
    assert "in PRESETS else" not in " ".join(code), f"{path.name}: an unknown data preset must fail, not fall back"
    assert "\\\\boxed" not in markdown, f"{path.name}: a double-escaped \\\\boxed in markdown"


@pytest.fixture(scope="module")
def fresh_run_folder(tmp_path_factory):
    """One run folder for the whole chain (01 -> 05 run in order and share it), never a stale runs/tiny."""
    import os

    saved = {k: os.environ.get(k) for k in ("MPI_OUT_DIR", "MPI_RUN_NAME")}
    os.environ["MPI_OUT_DIR"] = str(tmp_path_factory.mktemp("runs"))
    os.environ["MPI_RUN_NAME"] = "notebooks"
    yield Path(os.environ["MPI_OUT_DIR"]) / "notebooks"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_headless(path, fresh_run_folder):
    execute(path, timeout=900, preset="tiny")


def test_the_notebooks_give_the_pipelines_numbers(fresh_run_folder):
    """Notebooks 01-05 run in order (above) and `python -m mpi --preset tiny` make the same run: the same
    data, the same trained stages (same last-step metrics) and the same evaluation numbers, for seed 0."""
    import os

    from mpi.cli import main
    from mpi.pipeline import read_done

    if not (fresh_run_folder / "report.md").exists():
        pytest.skip("needs the headless notebook runs of this module first (run the whole file)")
    cli = fresh_run_folder.parent / "cli"
    threads = torch.get_num_threads()
    torch.set_num_threads(KERNEL_THREADS)
    try:
        assert main(["--preset", "tiny", "--name", "cli", "--out-dir", os.environ["MPI_OUT_DIR"]]) == 0
    finally:
        torch.set_num_threads(threads)
    notebook_evals = sorted(p.parent.relative_to(fresh_run_folder) for p in fresh_run_folder.glob("eval/*/*/*/done.json"))
    assert notebook_evals == sorted(p.parent.relative_to(cli) for p in cli.glob("eval/*/*/*/done.json"))
    assert notebook_evals, "no evaluation in the notebooks' run folder"
    for rel in notebook_evals:
        mine, theirs = read_done(fresh_run_folder / rel), read_done(cli / rel)
        for view in ("policy_free", "with_policy", "override"):
            assert mine[view]["accuracy"] == theirs[view]["accuracy"], (rel, view)
            assert mine[view]["examples"] == theirs[view]["examples"], (rel, view)  # the answers themselves
    timing = ("per_s", "seconds", "time", "cpu_s")  # wall-clock fields differ run to run; nothing else may
    stages = list(fresh_run_folder.glob("stages/*/*/*/done.json"))
    assert len(stages) == 4, stages   # cpt, cot-sft, cpt+cot-sft, cpt+cot-sft+poro-grpo
    for done in stages:
        rel = done.parent.relative_to(fresh_run_folder)
        mine, theirs = read_done(done.parent).get("last", {}), read_done(cli / rel).get("last", {})
        assert {k: v for k, v in mine.items() if not any(s in k for s in timing)} == \
               {k: v for k, v in theirs.items() if not any(s in k for s in timing)}, rel
        from safetensors.torch import load_file

        a, b = load_file(done.parent / "model" / "adapter_model.safetensors"), load_file(cli / rel / "model" / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{rel}: other trained weights"
    for data in fresh_run_folder.glob("data/*/done.json"):
        rel = data.parent.relative_to(fresh_run_folder)
        assert read_done(data.parent)["sizes"] == read_done(cli / rel)["sizes"]


@pytest.mark.parametrize("device, preset, env, expected", [
    ("cuda", None, None, "colab-t4"),   # a Colab GPU runtime, PRESET = None: the hardware decides
    ("cpu", None, None, "toy"),
    ("cuda", "toy", None, "toy"),       # a preset named in the notebook wins over the hardware
    ("cpu", "toy", "tiny", "tiny"),     # MPI_PRESET wins over both (CI)
])
def test_notebook_setup_picks_the_preset(monkeypatch, device, preset, env, expected):
    import torch

    import mpi.notebook as nb
    from mpi.device import DeviceInfo

    monkeypatch.setattr(nb, "get_device", lambda *a: torch.device(device))
    monkeypatch.setattr(nb, "describe_device", lambda d=None: DeviceInfo(str(d), "pretend", False, (7, 5)))
    monkeypatch.setenv("MPI_OUT_DIR", "x")
    monkeypatch.delenv("MPI_OUT_DIR")
    if env is None:
        monkeypatch.delenv("MPI_PRESET", raising=False)
    else:
        monkeypatch.setenv("MPI_PRESET", env)
    cfg = nb.notebook_setup(preset=preset, seed=0)
    assert cfg.preset == expected
    assert cfg.device is None, "left None (= best device) so the run folder records what `python -m mpi` records"
    monkeypatch.setenv("MPI_OUT_DIR", "/somewhere/on/drive")
    assert nb.notebook_setup(preset=preset).out_dir == "/somewhere/on/drive"


def test_an_unknown_data_preset_fails_with_the_librarys_error():
    from mpi import pipeline
    from mpi.config import get_config

    cfg = get_config("tiny", data_preset="no-such-preset")
    with pytest.raises(ValueError, match="no-such-preset"):
        pipeline.data_config(cfg, "clevr-T-N2")


def test_use_google_drive_points_runs_and_caches_at_drive(tmp_path, monkeypatch):
    import os

    from mpi.notebook import use_google_drive

    for k in ("MPI_OUT_DIR", "MPI_CACHE", "HF_HOME"):
        monkeypatch.setenv(k, "placeholder")  # recorded first, so that the test's end restores the real value
        monkeypatch.delenv(k)
    use_google_drive(str(tmp_path / "drive"), mount=False)
    assert os.environ["MPI_OUT_DIR"] == str(tmp_path / "drive" / "runs")
    assert os.environ["MPI_CACHE"] == str(tmp_path / "drive" / "cache")
    assert os.environ["HF_HOME"] == str(tmp_path / "drive" / "hf")
    from mpi.toy import cache_root

    assert cache_root() == tmp_path / "drive" / "cache"
