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
