"""A pipeline stage killed mid-way (SIGKILL, as a Colab disconnect) resumes from its checkpoint on rerun and ends
with the weights of an uninterrupted run.

One uninterrupted `python -m mpi` run on the tiny preset is the reference. A second run directory (the same
config; the reference's data and cost stages copied in, to save time) is run three times: killed as soon as
the SFT stage has written its third checkpoint, rerun and killed as soon as the RL stage has written its
second, rerun to the end. The adapters of both stages must equal the reference's bit for bit (torch.equal:
every process runs on CPU with one thread, so the arithmetic is the same sequence of operations), and the
logs must show each step once with the reference's loss.

Knobs that make the kills land mid-stage: sft_epochs=2 (16 SFT steps), rl_steps=6, a checkpoint every
step. RL on the tiny toy earns no reward (every group flat, so no policy gradient); a KL penalty against the
adapter-free base (kl_reference=no_adapter, beta=0.5) moves the weights each step through sampled
completions, so the RL comparison checks the restored RNG, prompt cursor and optimizer state.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.nbtools import ROOT

KEY = "clevr-T-N2"
SFT, RL = ("cot-sft",), ("cot-sft", "grpo")
ARGS = ["--preset", "tiny", "--methods", "cot-sft-grpo", "--seeds", "0",
        "--set", "sft_epochs=2", "--set", "rl_steps=6", "--set", "save_every=1",
        "--set", 'grpo={"kl_reference": "no_adapter", "beta": 0.5}',
        "--set", "eval_limit=2", "--set", "eval_side_limit=2"]
TIMEOUT = 240


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _cmd(out: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "mpi", *ARGS, "--out-dir", str(out), "--name", name]


def _stage(run_dir: Path, chain) -> Path:
    return run_dir / "stages" / KEY / "seed0" / "+".join(chain)


def _partial(run_dir: Path, chain) -> Path:
    return _stage(run_dir, chain).with_name("+".join(chain) + ".partial")


def _run_to_end(out: Path, name: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(out, name), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _run_and_kill(out: Path, name: str, checkpoint_glob: str, what: str) -> Path:
    """Start the command; SIGKILL it the moment a file matching checkpoint_glob (under the run) appears."""
    run_dir = out / name
    proc = subprocess.Popen(_cmd(out, name), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    try:
        while True:
            found = sorted(run_dir.glob(checkpoint_glob))
            if found:
                proc.send_signal(signal.SIGKILL)  # no chance to clean up, as when a Colab VM goes away
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended ({proc.returncode}) before {what} wrote {checkpoint_glob}:\n"
                            f"{proc.stderr.read()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {checkpoint_glob} within {TIMEOUT}s")
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    return found[0]


def _adapter(stage_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(stage_dir / "model" / "adapter_model.safetensors"))


def _losses(stage_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (stage_dir / "work" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["step"] > 0]  # step 0: the RL stage's validation baseline


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    _run_to_end(out, "straight")
    ref = out / "straight"
    cut = out / "cut"
    cut.mkdir()
    # the same config: the reference's data, cost and run record are valid here (skipped, not rebuilt)
    for name in ("data", "cost"):
        shutil.copytree(ref / name, cut / name)
    shutil.copy(ref / "run.json", cut / "run.json")

    sft_ckpt = _run_and_kill(out, "cut", f"stages/{KEY}/seed0/cot-sft.partial/work/checkpoints/checkpoint-3/"
                             "mpi_checkpoint_complete.json", "SFT")
    after_sft_kill = {"sft_done": (_stage(cut, SFT) / "done.json").exists(), "sft_partial": _partial(cut, SFT).exists()}
    rl_ckpt = _run_and_kill(out, "cut", f"stages/{KEY}/seed0/cot-sft+grpo.partial/work/checkpoints/step_000002/"
                            "state.json", "RL")
    after_rl_kill = {"rl_done": (_stage(cut, RL) / "done.json").exists(), "rl_partial": _partial(cut, RL).exists()}
    final = _run_to_end(out, "cut")
    return ref, cut, {"sft_ckpt": sft_ckpt, "rl_ckpt": rl_ckpt, "after_sft_kill": after_sft_kill,
                      "after_rl_kill": after_rl_kill, "final_stdout": final.stdout}


def test_kills_landed_mid_stage(runs):
    _, cut, info = runs
    # otherwise the comparison below would be one of two uninterrupted stages
    assert info["after_sft_kill"] == {"sft_done": False, "sft_partial": True}
    assert info["after_rl_kill"] == {"rl_done": False, "rl_partial": True}
    # the reruns continued from the checkpoints (not from zero): at least the step the kill waited for
    assert json.loads((_stage(cut, SFT) / "done.json").read_text())["resumed_from_step"] >= 3
    assert json.loads((_stage(cut, RL) / "done.json").read_text())["resumed_from_step"] >= 2
    assert "[resume] train/" in info["final_stdout"]
    # published stages only; no work directory and no checkpoint left behind
    assert not list(cut.glob("stages/**/*.partial"))
    assert not list(cut.glob("stages/**/checkpoints"))


def test_resumed_stages_end_with_the_uninterrupted_weights(runs):
    ref, cut, _ = runs
    for chain in (SFT, RL):
        want, got = _adapter(_stage(ref, chain)), _adapter(_stage(cut, chain))
        assert want.keys() == got.keys() and len(want) > 0
        assert all(torch.equal(want[k], got[k]) for k in want), chain
    # RL moved the weights: an RL stage that changed nothing would compare equal without any resume logic
    sft, rl = _adapter(_stage(ref, SFT)), _adapter(_stage(ref, RL))
    assert max(float((sft[k] - rl[k]).abs().max()) for k in sft) > 0


def test_resumed_logs_have_each_step_once_with_the_same_loss(runs):
    ref, cut, _ = runs
    assert [s for s, _ in _losses(_stage(ref, SFT))] == list(range(1, 17))
    assert [s for s, _ in _losses(_stage(ref, RL))] == list(range(1, 7))
    for chain in (SFT, RL):
        assert _losses(_stage(cut, chain)) == _losses(_stage(ref, chain)), chain
    # the evaluation of equal weights: the same answers, word for word
    eval_dir = lambda run: run / "eval" / KEY / "seed0" / "cot-sft-grpo"  # noqa: E731
    assert (json.loads((eval_dir(cut) / "done.json").read_text())["policy_free"]["accuracy"]
            == json.loads((eval_dir(ref) / "done.json").read_text())["policy_free"]["accuracy"])
    assert (eval_dir(cut) / "examples.json").read_text() == (eval_dir(ref) / "examples.json").read_text()
