"""Every numbered notebook runs top to bottom on the CI-sized preset, and is stored clean."""

import json

import pytest

from tests.nbtools import NOTEBOOKS, execute, has_outputs

COLAB_BADGE = "colab.research.google.com/assets/colab-badge.svg"


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks/NN_name.ipynb found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_headless(path):
    execute(path, timeout=900, preset="tiny")
