"""`python -m mpi` end to end on the tiny preset: every artifact, resumable, clear errors; the report's numbers."""

import json
import math

import pytest

from mpi.pipeline import METHODS, PipelineError, main, make_plan, training_chains
from tests.nbtools import ROOT

METHODS_CI = "in-context,cot-sft,trimpi-grpo"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    argv = ["--preset", "tiny", "--name", "ci", "--out-dir", str(out), "--methods", METHODS_CI, "--seeds", "0",
            "--set", "eval_side_limit=4"]
    assert main(argv) == 0
    return out / "ci", argv


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
    for chain in ("cpt", "cpt+sft-cot", "cpt+sft-cot+poro-grpo", "sft-cot"):
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
    # cpt, sft-cot and sft-direct once each; cpt+sft-cot feeds both TriMPI runs and VM-CPT + CoT SFT
    assert ("cpt",) in chains and ("cpt", "sft-cot") in chains and ("sft-cot",) in chains
    # by hand: sft-direct, sft-cot, cpt, cpt+sft-cot, sft-cot+grpo, sft-cot+dapo, cpt+sft-cot+poro-grpo/-dapo
    assert len(chains) == 8
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
