import json

import pytest

from mpi.atomic import atomic_directory, atomic_write_json
from mpi.metrics import MetricsLogger, format_row, plot_metrics, read_metrics


def test_logger_writes_csv_and_jsonl_and_resumes(tmp_path):
    log = MetricsLogger(tmp_path, echo=False)
    for step in range(1, 5):
        log.log(step, loss=1.0 / step, lr=0.1)
    log.log(5, loss=0.2, accuracy=0.5)  # a column that appears later
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header == ["step", "loss", "lr", "accuracy"]
    # Resume from a checkpoint at step 3: rows 4 and 5 are dropped, then the run continues.
    resumed = MetricsLogger(tmp_path, resume_step=3, echo=False)
    resumed.log(4, loss=0.3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 5


def test_format_row():
    assert format_row({"step": 3, "loss": 0.123456, "tag": "a"}) == "step    3 | loss 0.1235 | tag a"


def test_plot_metrics(tmp_path):
    log = MetricsLogger(tmp_path, echo=False)
    for step in range(1, 6):
        log.log(step, loss=5.0 - step, reward=step / 5)
    fig = plot_metrics(tmp_path, keys=["loss", "reward"], out_png=tmp_path / "m.png", smooth=2)
    assert (tmp_path / "m.png").stat().st_size > 1000
    line = fig.axes[0].lines[0]
    assert list(line.get_ydata()) == [4.0, 3.0, 2.0, 1.0, 0.0]
    with pytest.raises(FileNotFoundError, match="metrics"):
        plot_metrics(tmp_path / "nope")


def test_atomic_directory_keeps_old_on_failure(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp leftovers
    atomic_write_json(tmp_path / "x.json", {"b": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"b": 1}
