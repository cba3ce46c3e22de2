import subprocess
import sys

from tests.nbtools import ROOT


def test_smoke_command_builds_and_generates():
    out = subprocess.run([sys.executable, "-m", "mpi", "smoke"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "built toy-tiny" in out.stdout and "image tokens" in out.stdout


def test_an_unknown_set_name_is_an_error_listing_the_valid_names(tmp_path):
    """A typo (`rl_setps`) used to run, the value filed away in RunConfig.extra and never read."""
    for arg, typo, valid in (("rl_setps=60", "rl_setps", "rl_steps"),
                             ('grpo={"temprature": 0.7}', "temprature", "temperature")):
        out = subprocess.run([sys.executable, "-m", "mpi", "--preset", "tiny", "--out-dir", str(tmp_path), "--set", arg],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, (arg, out.stderr[-2000:])
        assert f"'{typo}' (did you mean {valid}?)" in out.stderr
        assert "Valid" in out.stderr and "Traceback" not in out.stderr
        if typo == "rl_setps":  # the list names RunConfig fields and the extra knobs
            listed = out.stderr.split("Valid RunConfig fields:")[1]
            assert all(name in listed for name in ("rl_steps", "save_every", "eval_limit", "toy_base_seed", "grpo"))
        else:  # a nested knob lists its dataclass's fields
            assert "max_completion_length" in out.stderr.split("Valid fields:")[1]
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_toy_base_dry_run_says_what_it_would_do_and_trains_nothing(tmp_path):
    """`toy-base --dry-run` used to start the hour-long build it was asked only to describe."""
    import os

    env = {**os.environ, "MPI_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "mpi", "toy-base", "--preset", "toy", "--dry-run", *a], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=300)
    shipped = run()
    assert shipped.returncode == 0, shipped.stderr[-2000:]
    assert "mpi/assets/toy_base/toy-small-s0 (ready: nothing to train)" in shipped.stdout
    other = run("--set", "toy_base=toy-copy")
    assert other.returncode == 0, other.stderr[-2000:]
    assert "would train 10000 steps" in other.stdout and "'copy_steps': 6000" in other.stdout
    assert not (tmp_path / "cache" / "toy_base").exists() or not any((tmp_path / "cache" / "toy_base").iterdir())
