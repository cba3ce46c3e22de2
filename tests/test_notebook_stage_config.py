"""Notebooks 02-04 train their stage in view on the config they show: edit it, and the edit is what trains.

Each test runs a notebook's own cells (the config cell, the run folder, the stage config), edits the stage
config as a learner would, runs the notebook's "train" cell, and reads the trained stage: its folder carries
the config's key (`<chain>@<key>`, so the run's own stage is untouched and nothing finished is skipped), its
done.json records the edited value, and the training function's own record (train_supervised's config.json,
train_poro's grpo_config.json) shows the value reached the loop. toy-tiny, a few steps per stage.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from mpi.metrics import read_metrics
from tests.nbtools import NOTEBOOK_DIR, run_cells

SETUP = ["config"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in ("MPI_PRESET", "MPI_OUT_DIR", "MPI_RUN_NAME", "MPLBACKEND")}
    os.environ.update(MPI_PRESET="tiny", MPI_OUT_DIR=str(tmp_path_factory.mktemp("runs")), MPI_RUN_NAME="edited",
                      MPLBACKEND="Agg")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _edited_stage(ns, chain, config, record_name, field, value):
    from mpi.pipeline import config_key, read_done, stage_folder

    plan = ns["plan"]
    folder = stage_folder(plan, ns["KEY"], ns["SEED"], chain, config)
    assert folder.name == "+".join(chain) + "@" + config_key(config)  # the edited config: its own stage
    done = read_done(folder)
    assert done["config"][field] == value and done["config_key"] == config_key(config)
    assert json.loads((folder / "work" / record_name).read_text())[field] == value  # what the loop trained with
    assert not plan.stage_dir(ns["KEY"], ns["SEED"], chain).joinpath("done.json").exists() or \
        read_done(plan.stage_dir(ns["KEY"], ns["SEED"], chain))["config"][field] != value
    return folder


def test_notebook_02_trains_the_edited_vm_cpt_config(run_folder):
    ns = run_cells(NOTEBOOK_DIR / "02_vm_cpt_qlora.ipynb", SETUP + ["code-05", "stage-config"])
    ns["sup"] = dataclasses.replace(ns["sup"], learning_rate=3e-3, max_steps=2)  # the learner's edit
    run_cells(NOTEBOOK_DIR / "02_vm_cpt_qlora.ipynb", ["train"], ns)
    folder = _edited_stage(ns, ("cpt",), ns["sup"], "config.json", "learning_rate", 3e-3)
    assert ns["done"]["steps"] == 2
    assert json.loads((folder / "work" / "config.json").read_text())["max_steps"] == 2
    rates = [r["learning_rate"] for r in read_metrics(folder / "work") if "learning_rate" in r]
    assert max(rates) == pytest.approx(3e-3)  # the optimizer ran at the edited rate (after one warm-up step)
    # the same cell again: the finished stage of this config is found, not trained again
    again = run_cells(NOTEBOOK_DIR / "02_vm_cpt_qlora.ipynb", ["train"], ns)["done"]
    assert again["seconds"] == ns["done"]["seconds"]


def test_notebook_03_trains_the_edited_sft_config(run_folder):
    ns = run_cells(NOTEBOOK_DIR / "03_sft.ipynb", SETUP + ["code-05", "stage-config"])
    ns["sup"] = dataclasses.replace(ns["sup"], learning_rate=2e-3, max_steps=1)
    ns["CHAINS"] = [("cot-sft",)]
    run_cells(NOTEBOOK_DIR / "03_sft.ipynb", ["train"], ns)
    _edited_stage(ns, ("cot-sft",), ns["sup"], "config.json", "learning_rate", 2e-3)
    assert ns["done"]["steps"] == 1


def test_notebook_04_trains_the_edited_rl_config(run_folder):
    nb = NOTEBOOK_DIR / "04_policy_rollout_grpo.ipynb"
    ns = run_cells(nb, SETUP + ["code-19"])
    ns["gcfg"] = dataclasses.replace(ns["gcfg"], beta=0.07, learning_rate=2e-3, steps=1)  # the learner's edit
    run_cells(nb, ["code-20", "train"], ns)
    folder = _edited_stage(ns, ("cpt", "cot-sft", "poro-grpo"), ns["gcfg"], "grpo_config.json", "beta", 0.07)
    assert ns["done"]["steps"] == 1
    assert [r["lr"] for r in read_metrics(folder / "work") if "lr" in r] == [2e-3]  # the step ran at the edit


def test_a_changed_run_config_is_never_skipped(run_folder, tmp_path):
    """A finished stage meets a config other than the one it was trained with (e.g. the plan's RunConfig
    edited after course_plan): an error that names the fields, not a skip."""
    from mpi.pipeline import PipelineError, make_plan, stage_config, train_in_run
    from mpi.config import get_config

    plan = make_plan(get_config("tiny", out_dir=str(tmp_path)), name="p")
    key = plan.dataset_keys[0]
    config = stage_config(plan, "poro-grpo", 0, key)
    train_in_run(plan, key, 0, ("poro-grpo",), config, lambda folder: {"steps": 0}, log=lambda _: None)
    plan.cfg.extra["grpo"] = {"beta": 0.5}  # the run's config changed under the finished stage
    changed = stage_config(plan, "poro-grpo", 0, key)
    with pytest.raises(PipelineError, match=r"another config \(fields \['beta'\]\)"):
        train_in_run(plan, key, 0, ("poro-grpo",), changed, lambda folder: {"steps": 0}, log=lambda _: None)


def test_an_evaluation_made_with_other_options_is_never_skipped(tmp_path):
    """plan.opts (the evaluation options) edited after course_plan: the finished evaluation is an error."""
    from mpi.config import get_config
    from mpi.pipeline import PipelineError, Timer, make_plan, run_stage

    plan = make_plan(get_config("tiny", out_dir=str(tmp_path)), name="p")
    path = plan.eval_dir(plan.dataset_keys[0], 0, "cot-sft")
    done = run_stage(plan, Timer(plan.run_dir), "eval/x", path, lambda tmp: {"accuracy": 0.5}, lambda _: None,
                     settings=plan.opts)
    assert done["settings"]["eval_limit"] == plan.opts["eval_limit"]
    assert run_stage(plan, Timer(plan.run_dir), "eval/x", path, lambda tmp: {}, lambda _: None,
                     settings=plan.opts)["accuracy"] == 0.5  # the same options: found, not made again
    plan.opts["eval_limit"] = 3
    with pytest.raises(PipelineError, match=r"other settings \(\['eval_limit'\]\)"):
        run_stage(plan, Timer(plan.run_dir), "eval/x", path, lambda tmp: {}, lambda _: None, settings=plan.opts)
