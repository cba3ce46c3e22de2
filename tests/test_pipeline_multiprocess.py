"""`python -m mpi` under `accelerate launch` (2 CPU processes, gloo) gives the table of one process.

The same tiny-preset command runs once as `python -m mpi` and once under `accelerate launch` with
configs/accelerate/ddp_cpu_2proc.yaml (as tests/test_multiprocess.py launches its workers). Under the launch
the main process builds the data and evaluates while the other waits; both train every stage, data parallel,
with the global batch of one process (RunConfig.batch_size=4 becomes 2 per process).

What must agree, and how closely:
- the data (built by the main process alone): byte for byte;
- the in-context row (the base model, no training): exactly, answers included (equal weights, same evaluation);
- the SFT adapter: to rtol 1e-4 / atol 1e-6, not bit for bit: two processes each sum their half of the batch
  and the halves are then added (a different order of float additions than one sum over the whole batch);
- the table: exactly. Greedy decoding of weights that agree to ~1e-7 picks the same tokens here.
- RL: on tiny every group's rewards are flat (the random-ish toy never writes a boxed answer), so neither run
  moves the weights in RL and its rows agree for that reason. Two processes sample with different seeds
  (seed + process index), so an RL stage that learns would not give the single-process weights at any
  tolerance; tests/test_multiprocess.py checks the RL update itself against one process on a fixed rollout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.nbtools import ROOT

CONFIG = ROOT / "configs" / "accelerate" / "ddp_cpu_2proc.yaml"
KEY = "clevr-T-N2"
METHODS = ("in-context", "cot-sft", "cot-sft-grpo")
ARGS = ["--preset", "tiny", "--methods", ",".join(METHODS), "--seeds", "0"]
TIMEOUT = 420


def _env() -> dict[str, str]:
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _free_port() -> int:
    with socket.socket() as s:  # parallel runs must not collide on the config's default port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp_pipeline")
    single = _run([sys.executable, "-m", "mpi", *ARGS, "--out-dir", str(out), "--name", "one"])
    launched = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
                     "--num_processes", "2", "--main_process_port", str(_free_port()),
                     "-m", "mpi", *ARGS, "--out-dir", str(out), "--name", "two"])
    return out / "one", out / "two", single.stdout, launched.stdout


def _done(run_dir: Path, *parts: str) -> dict:
    return json.loads((run_dir.joinpath(*parts) / "done.json").read_text())


def test_the_table_is_the_single_process_table(runs):
    one, two, _, _ = runs
    m1, m2 = (json.loads((r / "metrics.json").read_text())["summary"][KEY] for r in (one, two))
    assert set(m1) == set(m2) == set(METHODS)
    for method in METHODS:
        for view in ("policy_free", "with_policy", "override"):
            a, b = (_done(r, "eval", KEY, "seed0", method)[view] for r in (one, two))
            assert (a["accuracy"], a["n"]) == (b["accuracy"], b["n"]), (method, view)
        assert m1[method]["accuracy"]["mean"] == m2[method]["accuracy"]["mean"], method
    # the base model evaluated twice: the same answers word for word
    ex = lambda r: (r / "eval" / KEY / "seed0" / "in-context" / "examples.json").read_text()  # noqa: E731
    assert ex(one) == ex(two)


def test_data_built_once_on_the_main_process_and_identical(runs):
    one, two, _, out2 = runs
    files1 = sorted(p.relative_to(one) for p in (one / "data").rglob("*") if p.is_file() and p.suffix == ".arrow")
    assert files1, "no dataset files found"
    for rel in files1:
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel
    # the main process alone reports (one header, one data stage) and no process left a half-written copy
    assert out2.count("[run ] data/") == 1 and out2.count("| 2 processes") == 1
    assert not list((two / "data").glob(".*tmp"))


def test_training_is_data_parallel_with_the_global_batch(runs):
    one, two, _, _ = runs
    for chain in ("cot-sft", "cot-sft+grpo"):
        a = load_file(str(one / "stages" / KEY / "seed0" / chain / "model" / "adapter_model.safetensors"))
        b = load_file(str(two / "stages" / KEY / "seed0" / chain / "model" / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
        # the same optimizer steps: one logged row per step (written by the main process only), same count
        rows = lambda r: [row for row in map(json.loads, (r / "stages" / KEY / "seed0" / chain / "work" / "metrics.jsonl").read_text().splitlines()) if row["step"] > 0]  # noqa: E731 (step 0: RL's validation baseline)
        assert [r["step"] for r in rows(two)] == [r["step"] for r in rows(one)] == list(range(1, len(rows(one)) + 1))
    sft = lambda r: [json.loads(x) for x in (r / "stages" / KEY / "seed0" / "cot-sft" / "work" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert len(sft(one)) == 8  # 32 items / global batch 4: had each process taken 4, there would be 4 steps
    for a, b in zip(sft(one), sft(two)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    rl = [json.loads(x) for x in (two / "stages" / KEY / "seed0" / "cot-sft+grpo" / "work" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["num_groups"] == 2 for r in rl if r["step"] > 0)  # prompts_per_step=2 in all: one group per process, summed
