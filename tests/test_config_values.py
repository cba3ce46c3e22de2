"""Bad RunConfig values are named at config time (issue 28): a learning rate <= 0, steps or epochs < 0, a GRPO
group of fewer than 2 samples, a completion length <= 0, a value of the wrong type. Each error names the field,
the value and the expected type or range, and a valid value (the preset's), from the CLI, the dry run and Python;
nothing is written and no traceback is printed. Before, `--set rl_learning_rate=-1 --dry-run` said OK and
`--set rl_steps=abc` ended in "unsupported operand type(s) for /: 'str' and 'int'"."""

import dataclasses

import pytest

from mpi.cli import main
from mpi.config import PRESETS, VALUE_RANGES, ConfigValueError, RunConfig, get_config

# (--set value, field, the value as the error prints it, the expected type / range it names, the preset's value)
BAD = [
    ("rl_learning_rate=-1", "rl_learning_rate", "-1", "a number > 0", "1e-06"),
    ("cpt_learning_rate=0", "cpt_learning_rate", "0", "a number > 0", "0.0001"),
    ("sft_learning_rate=0.0", "sft_learning_rate", "0.0", "a number > 0", "0.0001"),
    ("rl_steps=-5", "rl_steps", "-5", "an integer >= 0", "60"),
    ("rl_steps=abc", "rl_steps", "'abc'", "an integer >= 0", "60"),
    ("sft_epochs=-1", "sft_epochs", "-1", "a number >= 0", "1.0"),
    ("cpt_epochs=\"two\"", "cpt_epochs", "'two'", "a number >= 0", "1.0"),
    ("rl_epochs=0", "rl_epochs", "0", "a number > 0, or null", "null"),
    ("num_generations=1", "num_generations", "1", "an integer >= 2", "4"),
    ("num_generations=2.5", "num_generations", "2.5", "an integer >= 2", "4"),
    ("max_completion_length=0", "max_completion_length", "0", "an integer >= 1", "160"),
    ("max_length=-3", "max_length", "-3", "an integer >= 1", "2048"),
    ("batch_size=true", "batch_size", "True", "an integer >= 1", "1"),
    ("lora_dropout=1", "lora_dropout", "1", "a number >= 0 and < 1", "0.05"),
    ("depths=[2,\"x\"]", "depths", "(2, 'x')", "a list of integers", "[2]"),
    ("gradient_checkpointing=\"yes\"", "gradient_checkpointing", "'yes'", "true or false", "true"),
]


@pytest.mark.parametrize("override, field, shown, expected, example", BAD, ids=[b[0] for b in BAD])
def test_the_dry_run_names_the_field_the_value_and_the_range(override, field, shown, expected, example, tmp_path,
                                                            capsys):
    assert main(["--preset", "colab-t4", "--dry-run", "--out-dir", str(tmp_path), "--set", override]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert f"RunConfig.{field} = {shown} " in err and f"expected {expected}\n" in err, err
    assert f"fix: --set {field}={example} " in err, err
    assert "dry run OK" not in captured.out and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_run_is_refused_before_anything_is_written(tmp_path, capsys):
    assert main(["--preset", "tiny", "--out-dir", str(tmp_path), "--set", "rl_steps=abc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 bad RunConfig value(s):\n  - RunConfig.rl_steps = 'abc' (str): expected an integer")
    assert "unsupported operand" not in err and list(tmp_path.iterdir()) == []


def test_python_api_names_every_bad_value_at_once():
    with pytest.raises(ConfigValueError) as info:
        get_config("toy", rl_learning_rate=-1e-4, num_generations=1, max_completion_length=0, rl_steps="30")
    assert [(p[0], p[1]) for p in info.value.problems] == [
        ("rl_steps", "30"), ("rl_learning_rate", -1e-4), ("num_generations", 1), ("max_completion_length", 0)]
    assert isinstance(info.value, ValueError)  # callers that catch ValueError keep working
    cfg = get_config("toy")
    with pytest.raises(ConfigValueError, match=r"RunConfig.num_generations = 0 \(int\): expected an integer >= 2"):
        cfg.replace(num_generations=0)
    with pytest.raises(ConfigValueError, match="RunConfig.rl_learning_rate = nan"):
        RunConfig(rl_learning_rate=float("nan"))


def test_valid_edges_and_json_forms_are_accepted():
    cfg = get_config("toy", rl_steps=0, cpt_epochs=0, num_generations=2, max_completion_length=1,
                     rl_learning_rate=1, rl_epochs=None, lora_r=None, depths=[2, 4], sft_policy_in_context_frac=1.0)
    assert cfg.depths == (2, 4) and cfg.rl_learning_rate == 1  # JSON's list kept as the tuple the config holds
    for preset in PRESETS:
        assert get_config(preset).preset == preset


def test_every_range_names_a_field_that_exists():
    """A renamed RunConfig field must take its range with it (else the check would silently stop)."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    assert set(VALUE_RANGES) <= names, set(VALUE_RANGES) - names
    for field in ("cpt_learning_rate", "sft_learning_rate", "rl_learning_rate", "rl_steps", "cpt_epochs",
                  "sft_epochs", "num_generations", "max_completion_length"):
        assert field in VALUE_RANGES
