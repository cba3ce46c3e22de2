"""Damaged runs are named and rebuilt (issue 28, point 4): each stage's done.json records the size and sha256
of its files; a rerun that finds one missing, truncated or changed names the stage folder and the file and
trains (or builds) the stage again, never a raw SafetensorError. A run folder is the same run by a relative
or an absolute path (out_dir is where a run is, not what it is)."""

import contextlib
import hashlib
import io
import json
import shutil

import pytest

from mpi.cli import main
from mpi.config import get_config
from mpi.integrity import damage, file_manifest, stage_damage
from mpi.pipeline import PipelineError, check_run_dir, config_key, make_plan, stage_config

SFT = "stages/clevr-T-N2/seed0/cot-sft"
ADAPTER = f"{SFT}/model/adapter_model.safetensors"


def _argv(out, methods="cot-sft"):
    return ["--preset", "tiny", "--name", "ci", "--out-dir", str(out), "--methods", methods, "--seeds", "0",
            "--set", "eval_side_limit=4"]


def _run(argv):
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        code = main(argv)
    return code, printed.getvalue(), errors.getvalue()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run of CoT SFT (data, cost, one training stage, one evaluation): ~15 s."""
    out = tmp_path_factory.mktemp("runs")
    code, _, err = _run(_argv(out))
    assert code == 0, err
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "runs")
    return tmp_path / "runs"


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_done_json_records_every_file_with_its_size_and_sha256(finished):
    run = finished / "ci"
    for stage in (SFT, "data/clevr-T-N2", "cost/clevr-T-N2", "eval/clevr-T-N2/seed0/cot-sft"):
        files = json.loads((run / stage / "done.json").read_text())["files"]
        on_disk = sorted(p.relative_to(run / stage).as_posix() for p in (run / stage).rglob("*")
                         if p.is_file() and p.name != "done.json")
        assert sorted(files) == on_disk and (on_disk or stage.startswith("cost/")), stage  # cost: all in done.json
        for rel, rec in files.items():  # computed here with hashlib, independently of mpi.integrity
            assert rec == {"size": (run / stage / rel).stat().st_size, "sha256": _sha(run / stage / rel)}, rel
    done = json.loads((run / SFT / "done.json").read_text())
    assert "model/adapter_model.safetensors" in done["files"]
    # next to the stage's config and its key (a finished stage trained with another key is an error, never a skip)
    plan = make_plan(get_config("tiny", out_dir=str(finished)), name="ci")
    assert done["config_key"] == config_key(stage_config(plan, "cot-sft", 0, "clevr-T-N2"))
    assert done["config"]["mode"] == "cot-sft"


def test_a_truncated_adapter_is_named_and_the_stage_rebuilt(run_copy):
    """The issue's reproduction: `truncate` on a finished stage's adapter, then a run whose next stage loads it
    (CoT SFT + GRPO on top of CoT SFT). Before: SafetensorError 'invalid header length', a raw traceback."""
    run = run_copy / "ci"
    recorded = json.loads((run / SFT / "done.json").read_text())["files"]["model/adapter_model.safetensors"]
    with open(run / ADAPTER, "r+b") as handle:
        handle.truncate(1000)
    code, out, err = _run(_argv(run_copy, "cot-sft,cot-sft-grpo"))
    assert code == 0, err
    assert "Traceback" not in err and "SafetensorError" not in out + err
    line = next(ln for ln in out.splitlines() if ln.startswith("[damaged]"))
    assert f"train/clevr-T-N2/seed0/cot-sft: {run / SFT} does not match its done.json" in line
    assert f"model/adapter_model.safetensors has 1,000 bytes, done.json recorded {recorded['size']:,}" in line
    assert "[run ] train/clevr-T-N2/seed0/cot-sft\n" in out  # trained again, then the stage that needed it
    assert out.index("[run ] train/clevr-T-N2/seed0/cot-sft\n") < out.index("[run ] train/clevr-T-N2/seed0/cot-sft+grpo")
    # the same seed and settings give the same weights again (the recorded hash), and a new manifest
    assert (run / ADAPTER).stat().st_size == recorded["size"] and _sha(run / ADAPTER) == recorded["sha256"]
    assert stage_damage(run / SFT) == []
    assert (run / "eval/clevr-T-N2/seed0/cot-sft-grpo/done.json").is_file()


def test_damaged_data_and_unreadable_done_json_are_rebuilt(run_copy):
    run = run_copy / "ci"
    arrow = sorted((run / "data/clevr-T-N2/train").glob("*.arrow"))[0]
    arrow.unlink()
    (run / "eval/clevr-T-N2/seed0/cot-sft/done.json").write_text('{"accuracy": 0.')  # a half-written file
    code, out, err = _run(_argv(run_copy))
    assert code == 0, err
    assert f"[damaged] data/clevr-T-N2: {run / 'data/clevr-T-N2'} does not match its done.json " \
           f"(train/{arrow.name} is missing)" in out
    assert "[damaged] eval/clevr-T-N2/seed0/cot-sft: " in out and "done.json is unreadable (JSONDecodeError" in out
    assert arrow.is_file() and stage_damage(run / "data/clevr-T-N2") == []
    assert json.loads((run / "eval/clevr-T-N2/seed0/cot-sft/done.json").read_text())["accuracy"] >= 0


def test_a_damaged_stage_from_before_manifests_stops_with_a_one_line_fix(run_copy):
    """A done.json written before this release has no manifest: nothing to check against, so the load fails;
    it stops with the stage folder and the fix, not a traceback."""
    run = run_copy / "ci"
    done = json.loads((run / SFT / "done.json").read_text())
    del done["files"]
    (run / SFT / "done.json").write_text(json.dumps(done))
    with open(run / ADAPTER, "r+b") as handle:
        handle.truncate(1000)
    code, out, err = _run(_argv(run_copy, "cot-sft,cot-sft-grpo"))
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"error: {run / SFT} is damaged (SafetensorError: Error while deserializing header: invalid header length): "
        "delete that folder and rerun (python -m mpi with the same arguments, or the notebook's cell) to train the "
        "stage again"]


def test_manifest_check_finds_missing_resized_and_changed_files(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / ".a.json.123.tmp").write_text("a temporary of atomic_write_text: not part of the stage")
    manifest = file_manifest(tmp_path)
    assert manifest == {"a.json": {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()},
                        "model/w.bin": {"size": 100, "sha256": hashlib.sha256(b"\x00" * 100).hexdigest()}}
    assert damage(tmp_path, manifest) == []
    (tmp_path / "model" / "w.bin").write_bytes(b"\x00" * 99 + b"\x01")  # same size, one byte flipped
    assert damage(tmp_path, manifest) == ["model/w.bin has changed (sha256 differs from done.json's)"]
    (tmp_path / "model" / "w.bin").write_bytes(b"\x00" * 10)
    (tmp_path / "a.json").unlink()
    assert damage(tmp_path, manifest) == ["a.json is missing", "model/w.bin has 10 bytes, done.json recorded 100"]
    (tmp_path / "done.json").write_text(json.dumps({"stage": "x"}))  # written before manifests: nothing to check
    assert stage_damage(tmp_path) == []


def test_a_run_folder_is_the_same_run_by_a_relative_or_an_absolute_path(tmp_path, monkeypatch):
    """`python -m mpi` from the repo writes runs/toy; the notebooks open it with MPI_OUT_DIR=$PWD/runs. Before,
    the second was refused: 'made with a different config (fields ['out_dir'])'."""
    monkeypatch.chdir(tmp_path)
    check_run_dir(make_plan(get_config("tiny", out_dir="runs")))
    absolute = make_plan(get_config("tiny", out_dir=str(tmp_path / "runs")))
    assert absolute.run_dir.resolve() == (tmp_path / "runs" / "tiny")
    check_run_dir(absolute)  # accepted: the same folder
    shutil.move(tmp_path / "runs", tmp_path / "moved")  # a folder moved (to Drive) is still its run
    check_run_dir(make_plan(get_config("tiny", out_dir=str(tmp_path / "moved"))))
    with pytest.raises(PipelineError, match=r"different config \(fields \['rl_steps'\]\)"):  # what it holds still counts
        check_run_dir(make_plan(get_config("tiny", out_dir="moved", rl_steps=3)))


def test_an_rl_prompt_longer_than_max_length_stops_the_stage_before_it_trains(run_copy, tmp_path):
    """The RL stage measures its prompts (policy-free and guided) with the real processor before training; one over
    RunConfig.max_length is refused with the item, its length and its image tokens, never cut. Before, the stage
    trained on it (prompts are encoded without truncation, but nothing bounded them)."""
    from mpi.pipeline import train_stage

    plan = make_plan(get_config("tiny", out_dir=str(run_copy), max_length=120), name="ci")  # guided: 160, free: 84
    with pytest.raises(PipelineError) as info:
        train_stage(plan, "clevr-T-N2", 0, ("cot-sft", "poro-grpo"), tmp_path / "work")
    text = str(info.value)
    assert text.startswith("clevr-T-N2 seed0 cot-sft+poro-grpo (RL): the prompt of item clevr-T-N2-train-")
    assert "(with the policy) is " in text and " image tokens), longer than max_length=120. It is not truncated" in text
    assert not (tmp_path / "work" / "model").exists()
