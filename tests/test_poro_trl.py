"""The optional TRL scale path (mpi.scale.poro_trl) on the tiny toy model: PolicyRollout groups, policy-free scoring.

Skipped when TRL is not installed (requirements.txt pins trl==1.16.0; this skip is for environments without it)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.test_multiprocess import make_items

pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="optional: pip install trl==1.16.0")
POLICY_MARK = "# Condition 1:"


def test_missing_trl_gives_the_install_command(monkeypatch):
    from mpi.scale import poro_trl

    monkeypatch.setattr(poro_trl.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install trl==1.16.0"):
        poro_trl.require_trl()


def test_policy_rollout_on_trl_generates_guided_half_and_scores_policy_free(tmp_path):
    from mpi.data.messages import build_messages
    from mpi.modeling import LoraSettings, load_model_and_processor
    from mpi.poro import get_grpo_config
    from mpi.scale.poro_trl import completion_text, make_trainer

    model, processor = load_model_and_processor("toy-tiny", quantization=None, lora=LoraSettings(r=4), seed=0,
                                                device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    items = make_items(4)
    cfg = get_grpo_config("poro-grpo", num_generations=2, prompts_per_step=2, max_completion_length=8, steps=1,
                          learning_rate=1e-2, progress=False)

    def letters(completions, **_):  # spread on a random model's output, so the update is not zero
        texts = [completion_text(c) for c in completions]
        return [sum(ch.isalpha() for ch in t) / max(len(t), 1) for t in texts]

    trainer = make_trainer(model, processor, items, cfg, tmp_path / "trl", use_vllm=False,
                           reward_funcs=[letters])
    calls = []
    tokenize = trainer._tokenize_prompts

    def spy(prompts):  # TRL tokenizes the policy-free prompts (scored), then ours are tokenized (generated)
        out = tokenize(prompts)
        calls.append(processor.tokenizer.batch_decode([list(ids) for ids in out[0]]))
        return out

    trainer._tokenize_prompts = spy
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["reward"] == pytest.approx((logs["own/reward_mean"] + logs["guided/reward_mean"]) / 2, abs=1e-6)

    assert len(calls) == 2
    assert not any(POLICY_MARK in t for t in calls[0])
    flags = [POLICY_MARK in t for t in calls[1]]
    assert flags == [False, False, True, True] * 2  # group of 2G per prompt: G own, then G guided
    for key in ("own/reward_mean", "guided/reward_mean", "loss"):
        assert key in logs and logs[key] == logs[key], key  # present and not NaN
    moved = max(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters() if n in before)
    assert moved > 0


def test_trl_config_passes_disable_dropout_and_rejects_controls_it_lacks(tmp_path):
    from mpi.poro import get_grpo_config
    from mpi.scale.poro_trl import trl_config

    for flag in (True, False):
        args = trl_config(get_grpo_config("poro-grpo", disable_dropout=flag), tmp_path)
        assert args.disable_dropout is flag
    with pytest.raises(ValueError, match="adaptive_guidance"):
        trl_config(get_grpo_config("poro-grpo", adaptive_guidance=True), tmp_path)
    with pytest.raises(ValueError, match="wrong_policy"):
        trl_config(get_grpo_config("poro-grpo", guided_context="wrong_policy"), tmp_path)
