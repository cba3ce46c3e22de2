"""`python -m mpi` end to end on the tiny preset: every artifact, resumable, clear errors; the report's numbers."""

import contextlib
import io
import json
import math

import pytest

from mpi.cli import main
from mpi.pipeline import METHODS, PipelineError, make_plan, training_chains
from tests.nbtools import ROOT

METHODS_CI = "in-context,cot-sft,trimpi-grpo"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    argv = ["--preset", "tiny", "--name", "ci", "--out-dir", str(out), "--methods", METHODS_CI, "--seeds", "0",
            "--set", "eval_side_limit=4", "--set", "log_every=4"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the progress lines (tqdm.write) and the table go to stdout
        assert main(argv) == 0
    (out / "ci" / "stdout.txt").write_text(printed.getvalue())
    return out / "ci", argv


def test_progress_lines_every_log_every_steps_and_the_table_at_the_end(tiny_run):
    run_dir, _ = tiny_run
    out = (run_dir / "stdout.txt").read_text()
    steps = [int(line.split("|")[0].split()[1]) for line in out.splitlines() if line.startswith("step ")]
    # cpt, cot-sft and cpt+cot-sft take 8 steps each (32 items, batch 4): lines at 4 and 8; RL's 2 steps: none
    assert steps == [4, 8] * 3
    assert "## Accuracy (the paper's table)" in out and "| CoT SFT |" in out
    assert out.rindex("| CoT SFT |") > out.rindex("[done] eval/")  # the table comes last


def test_default_progress_cadence_prints_at_most_50_lines_per_stage():
    from mpi.metrics import MAX_PROGRESS_LINES, progress_every

    assert MAX_PROGRESS_LINES == 50
    assert progress_every(None, 500) == 10  # the toy run's SFT: 4 epochs x 125 steps -> 50 lines
    assert progress_every(None, 30) == 1  # its RL stage: every step
    assert progress_every(None, 501) == 11 and 501 // 11 <= 50
    assert progress_every(7, 500) == 7  # RunConfig.log_every


def test_unknown_extra_knob_is_refused_with_the_valid_names():
    from mpi.config import get_config

    cfg = get_config("tiny")
    cfg.extra = {"eval_limt": 3}
    with pytest.raises(PipelineError, match=r"'eval_limt' \(did you mean eval_limit\?\).*rl_steps.*eval_side_limit"):
        make_plan(cfg)
    cfg.extra = {"sft": {"lerning_rate": 1.0}}
    with pytest.raises(PipelineError, match=r"SupervisedConfig field.*'lerning_rate' \(did you mean learning_rate\?\)"):
        make_plan(cfg)
    cfg.extra = {"grpo": 0.7}
    with pytest.raises(PipelineError, match="expected a JSON object of GRPOConfig fields"):
        make_plan(cfg)
    cfg.extra = {"eval_limit": 3, "grpo": {"temperature": 0.7}, "images_per_item": 2, "toy_base_seed": 1}
    assert make_plan(cfg).opts["eval_limit"] == 3  # known knobs pass


def test_global_batch_split_over_processes():
    from mpi.config import get_config
    from mpi.pipeline import per_process_config

    cfg = get_config("tiny")  # batch_size 4, grad_accum_steps 1
    assert per_process_config(cfg, 1) is cfg
    assert (per_process_config(cfg, 2).batch_size, per_process_config(cfg, 2).grad_accum_steps) == (2, 1)
    t4 = get_config("colab-t4")  # batch_size 1 x grad_accum_steps 8: the accumulation is split
    assert (per_process_config(t4, 2).batch_size, per_process_config(t4, 2).grad_accum_steps) == (1, 4)
    with pytest.raises(PipelineError, match="does not split over 3 processes"):
        per_process_config(cfg, 3)


def test_every_artifact(tiny_run):
    run_dir, _ = tiny_run
    for name in ("report.md", "metrics.json", "run.json", "timings.json", "toy_base.json",
                 "accuracy.png", "override.png", "forgetting.png", "cost.png"):
        assert (run_dir / name).is_file(), name
    report = (run_dir / "report.md").read_text()
    for label in ("in-context policy (zero-shot)", "CoT SFT", "TriMPI (PoRo-GRPO)", "chance", "Wall time per stage",
                  "tokens saved"):
        assert label in report, label
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = metrics["summary"]["clevr-T-N2"]
    assert set(summary) == {"in-context", "cot-sft", "trimpi-grpo"}
    for method in summary:
        done = json.loads((run_dir / "eval" / "clevr-T-N2" / "seed0" / method / "done.json").read_text())
        for part in ("policy_free", "with_policy", "override"):
            assert 0.0 <= done[part]["accuracy"] <= 1.0 and done[part]["n"] > 0
        # the headline view gets eval_limit (8 on tiny) items, the side views eval_side_limit
        headline = "with_policy" if method == "in-context" else "policy_free"
        assert {part: done[part]["n"] for part in ("policy_free", "with_policy", "override")} == {
            part: 8 if part == headline else 4 for part in ("policy_free", "with_policy", "override")}
        assert done["accuracy"] == done[headline]["accuracy"]
        assert done["forgetting"]["n"] > 0
        # the report's cell is the stage's own number (one seed: mean = value, std 0)
        assert summary[method]["policy_free"]["mean"] == pytest.approx(done["policy_free"]["accuracy"])
    for chain in ("cpt", "cpt+cot-sft", "cpt+cot-sft+poro-grpo", "cot-sft"):
        assert (run_dir / "stages" / "clevr-T-N2" / "seed0" / chain / "model" / "adapter_config.json").is_file(), chain
    cost = metrics["cost"]["clevr-T-N2"]["tokens"]["clevr-T-N2"]
    assert cost["with_policy"] > cost["without_policy"] > 0


def test_second_run_skips_finished_stages(tiny_run, capsys):
    run_dir, argv = tiny_run
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.glob("**/done.json")}
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[run ]" not in out and out.count("[skip]") >= len(stamps)
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("**/done.json")} == stamps


def test_bad_arguments_are_named(tmp_path, capsys):
    assert main(["--preset", "tiny", "--out-dir", str(tmp_path), "--methods", "cot-sft,trimpi"]) == 2
    assert "--methods" in capsys.readouterr().err
    assert main(["--preset", "tiny", "--out-dir", str(tmp_path), "--datasets", "mnist"]) == 2
    assert "--datasets" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--preset", "nope"])


def test_a_run_directory_refuses_another_config(tiny_run, capsys):
    run_dir, argv = tiny_run
    assert main(argv + ["--set", "sft_learning_rate=0.5"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "sft_learning_rate" in err


def test_training_chains_share_prefixes():
    chains = training_chains(list(METHODS))
    assert len(chains) == len(set(chains))
    # cpt, cot-sft and direct-sft once each; cpt+cot-sft feeds both TriMPI runs and VM-CPT + CoT SFT
    assert ("cpt",) in chains and ("cpt", "cot-sft") in chains and ("cot-sft",) in chains
    # by hand: direct-sft, cot-sft, cpt, cpt+cot-sft, cot-sft+grpo, cot-sft+dapo, cpt+cot-sft+grpo,
    # cpt+cot-sft+poro-grpo / -dapo / -grpo-wrong / -grpo-adaptive
    assert len(chains) == 11
    for chain in chains:  # parents come first
        assert chains.index(chain[:-1]) < chains.index(chain) if len(chain) > 1 else True


def test_plan_validates_seeds_and_name():
    from mpi.config import get_config

    cfg = get_config("tiny")
    with pytest.raises(PipelineError, match="--seeds"):
        make_plan(cfg, seeds=[])
    with pytest.raises(PipelineError, match="--name"):
        make_plan(cfg, name="../x")


def _fake_eval(acc_free, acc_policy=0.5, override=0.25, forgetting=0.6):
    return {"accuracy": acc_free, "policy_free": {"accuracy": acc_free, "referral": {"score": 5.0}, "parsed_rate": 1.0},
            "with_policy": {"accuracy": acc_policy, "referral": {"score": 8.0}},
            "override": {"accuracy": override}, "forgetting": {"accuracy": forgetting}}


def test_report_mean_and_spread_hand_computed(tmp_path):
    from mpi.atomic import atomic_write_json
    from mpi.report import write_report

    run = tmp_path / "r"
    atomic_write_json(run / "run.json", {"config": {"preset": "toy", "model": "toy-small"}})
    atomic_write_json(run / "data" / "clevr-T-N2" / "done.json", {"chance": 0.25})
    for seed, acc in enumerate([0.5, 0.7, 0.9]):
        atomic_write_json(run / "eval" / "clevr-T-N2" / f"seed{seed}" / "trimpi-grpo" / "done.json", _fake_eval(acc))
        atomic_write_json(run / "eval" / "clevr-T-N2" / f"seed{seed}" / "cot-sft" / "done.json", _fake_eval(0.3))
    data = write_report(run)
    stat = data["summary"]["clevr-T-N2"]["trimpi-grpo"]["accuracy"]
    assert stat["mean"] == pytest.approx(0.7) and stat["std"] == pytest.approx(0.2) and stat["n"] == 3
    report = (run / "report.md").read_text()
    assert "| TriMPI (PoRo-GRPO) | 70.0 ± 20.0 |" in report
    assert "| CoT SFT | 30.0 ± 0.0 |" in report
    assert "ordering holds" in report  # 70 > 30 and 70 > 25 + 5
    assert not math.isnan(data["summary"]["clevr-T-N2"]["cot-sft"]["referral"]["mean"])


def test_notebook_referral_matches_the_package():
    from mpi.evaluate import cited_conditions, referral_score
    from tests.nbtools import mirror_definitions

    nb = mirror_definitions(ROOT / "notebooks" / "05_evaluation.ipynb")
    cots = ["# Condition 1: no. Go to # Condition 1.2. # Condition 1.2: yes.", "nothing cited",
            "Condition 1.1 then # Condition 1 then Condition 1.1"]
    for cot in cots:
        assert nb["cited_conditions"](cot) == cited_conditions(cot)
        assert nb["referral_f1"](cot, ["1", "1.2"]) == pytest.approx(referral_score(cot, ["1", "1.2"])["f1"])


def test_a_failed_training_stage_keeps_its_work_and_the_rerun_continues_there(tmp_path):
    """run_training_stage hands every attempt the same <chain>.partial/ (checkpoints survive a crash), and
    publishes it with done.json only when the stage returns."""
    from mpi.config import get_config
    from mpi.pipeline import Timer, is_done, partial_dir, run_training_stage

    plan = make_plan(get_config("tiny", out_dir=str(tmp_path)), name="p")
    path = plan.stage_dir("clevr-T-N2", 0, ("cot-sft",))
    seen = []

    def crash(work):
        seen.append(work)
        (work / "checkpoint-3").mkdir(parents=True)
        raise RuntimeError("out of memory at step 4")

    with pytest.raises(RuntimeError):
        run_training_stage(plan, Timer(plan.run_dir), "train/x", path, crash, lambda _: None)
    assert (partial_dir(path) / "checkpoint-3").is_dir() and not path.exists()

    def finish(work):
        seen.append(work)
        assert (work / "checkpoint-3").is_dir()  # the resume point is there
        return {"steps": 8}

    log = []
    done = run_training_stage(plan, Timer(plan.run_dir), "train/x", path, finish, log.append)
    assert seen == [partial_dir(path)] * 2 and log[0].startswith("[resume] train/x")
    assert done["steps"] == 8 and is_done(path) and not partial_dir(path).exists()
    assert (path / "checkpoint-3").is_dir()  # published as it was (train_stage drops its checkpoints itself)


def test_a_stage_killed_after_its_done_marker_is_published_without_training(tmp_path):
    from mpi.atomic import atomic_write_json
    from mpi.config import get_config
    from mpi.pipeline import Timer, is_done, partial_dir, run_training_stage

    plan = make_plan(get_config("tiny", out_dir=str(tmp_path)), name="p")
    path = plan.stage_dir("clevr-T-N2", 0, ("cot-sft",))
    atomic_write_json(partial_dir(path) / "done.json", {"seconds": 3.0, "steps": 8})

    def retrain(work):
        raise AssertionError("a finished stage was trained again")

    done = run_training_stage(plan, Timer(plan.run_dir), "train/x", path, retrain, lambda _: None)
    assert done["steps"] == 8 and is_done(path) and not partial_dir(path).exists()
    assert run_training_stage(plan, Timer(plan.run_dir), "train/x", path, retrain, lambda _: None)["steps"] == 8


def _trainable_of(model_dir):
    """The LoRA weights a stage saved, under the names model.named_parameters() gives them."""
    from safetensors.torch import load_file

    return load_file(str(model_dir / "adapter_model.safetensors"))


def _same_weights(saved, trainable):
    import torch

    renamed = {n.replace(".default", ""): v for n, v in trainable.items()}
    assert set(renamed) == set(saved)
    return all(torch.equal(saved[n].float(), renamed[n].float()) for n in saved)


def test_rl_stage_validates_on_the_val_split(tiny_run):
    run_dir, _ = tiny_run
    val = run_dir / "data" / "clevr-T-N2" / "val"
    assert val.is_dir() and json.loads((run_dir / "data" / "clevr-T-N2" / "done.json").read_text())["sizes"]["val"] == 8
    stage = run_dir / "stages" / "clevr-T-N2" / "seed0" / "cpt+cot-sft+poro-grpo"
    rows = [json.loads(line) for line in (stage / "work" / "metrics.jsonl").read_text().splitlines()]
    val_rows = [r for r in rows if "val/sampled_accuracy" in r]
    assert [r["step"] for r in val_rows] == [0, 1, 2]  # tiny: eval_every=1 over 2 steps, the start included
    assert not (stage / "work" / "best").exists()  # keep_best is off on tiny (see EVAL_DEFAULTS)


def test_learning_rate_sweep_keeps_the_rate_best_on_validation(tmp_path, monkeypatch):
    """rl_learning_rates: one RL run per rate; the stage keeps the rate whose smoothed validation accuracy is
    highest. The validation score is scripted by rate (the toy-tiny model scores 0 at every rate), so the
    winner is known: 1e-2, listed second (a pick by position or by the test split would fail)."""
    import torch

    from mpi import poro

    calls = {}

    def scripted(model, processor, items, cfg, **kw):  # 1e-2 improves with every evaluation, 1e-5 stays at 0.1
        calls[cfg.learning_rate] = calls.get(cfg.learning_rate, 0) + 1
        return {"val/sampled_accuracy": 0.2 * calls[cfg.learning_rate] if cfg.learning_rate > 1e-3 else 0.1}

    monkeypatch.setattr(poro, "validation_metrics", scripted)
    # a reward with spread on toy-tiny's gibberish, so that RL moves the weights at all (its accuracy is 0)
    from mpi.tests.rl_helpers import letter_share_reward

    monkeypatch.setattr(poro, "combined_rewards", lambda items, texts, weights: letter_share_reward(items, texts))
    argv = ["--preset", "tiny", "--name", "sweep", "--out-dir", str(tmp_path), "--methods", "cot-sft-grpo",
            "--set", "eval_side_limit=2", "--set", "rl_learning_rates=[1e-05, 0.01]"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    stage = tmp_path / "sweep" / "stages" / "clevr-T-N2" / "seed0" / "cot-sft+grpo"
    sweep = json.loads((stage / "work" / "learning_rate_sweep.json").read_text())
    assert [r["learning_rate"] for r in sweep["sweep"]] == [1e-5, 1e-2]
    # smoothed (weight 0.5) over steps 0, 1, 2: 1e-5 reads 0.1 throughout; 1e-2 reads 0.2, 0.3, 0.45
    assert [r["best_smoothed"] for r in sweep["sweep"]] == pytest.approx([0.1, 0.45])
    assert [r["best_step"] for r in sweep["sweep"]] == [0, 2]
    assert sweep["chosen"]["learning_rate"] == 1e-2
    done = json.loads((stage / "done.json").read_text())
    assert done["learning_rate_sweep"]["chosen"]["learning_rate"] == 1e-2
    winner = torch.load(stage / "work" / "lr_0.01" / "best" / "trainable.pt")
    loser = torch.load(stage / "work" / "lr_1e-05" / "best" / "trainable.pt")
    saved = _trainable_of(stage / "model")
    assert _same_weights(saved, winner) and not _same_weights(saved, loser)


def test_table_flag_plans_the_rl_comparison(tmp_path, capsys):
    from mpi.methods import TABLE_METHODS

    assert main(["--table", "--preset", "tiny", "--dry-run", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "seeds 0, 1, 2" in out
    for key in ("clevr-T-N2", "clevr-T-N4"):
        for method in TABLE_METHODS:
            assert f"eval/{key}/seed2/{method}  <-" in out, (key, method)
    assert "cpt+cot-sft+poro-grpo-wrong" in out


def test_rl_epochs_is_the_budget_rule():
    """rl_epochs passes over the training prompts: steps = ceil(epochs x train prompts / prompts_per_step)."""
    from mpi.config import get_config
    from mpi.pipeline import stage_config

    plan = make_plan(get_config("toy", rl_epochs=1.2))  # 4 policies x 250 train prompts, 4 prompts per step
    assert stage_config(plan, "poro-grpo", 0, "clevr-T-N2").steps == 300  # = 10 x rl_steps=30
    plan = make_plan(get_config("toy", rl_epochs=0.01, prompts_per_step=3))
    assert stage_config(plan, "grpo", 0, "clevr-T-N2").steps == 4  # ceil(10 / 3)
    assert stage_config(make_plan(get_config("toy")), "grpo", 0, "clevr-T-N2").steps == 30  # None: rl_steps
    from mpi.config import ConfigValueError

    with pytest.raises(ConfigValueError, match=r"RunConfig.rl_epochs = -1.0 \(float\): expected a number > 0, or null"):
        get_config("toy", rl_epochs=-1.0)  # refused when the config is made (tests/test_config_values.py)
