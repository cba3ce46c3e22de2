import subprocess
import sys

from tests.nbtools import ROOT


def test_smoke_command_builds_and_generates():
    out = subprocess.run([sys.executable, "-m", "mpi", "smoke"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "built toy-tiny" in out.stdout and "image tokens" in out.stdout
