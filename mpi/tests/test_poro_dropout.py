"""Dropout and the PPO ratio: the sampler, the old / reference passes and the trained pass must all be the
same network. With LoRA dropout on and the model in train mode, each pass draws its own masks, so at
num_iterations=1 the ratio pi/pi_old drifts from 1 and the KL to an identical reference is not 0."""

import pytest
import torch

from mpi import engine
from mpi import sampling
from mpi import poro
from mpi.poro import get_grpo_config, rollout, train_on_rollout
from mpi.tests.rl_helpers import letter_share_reward, rl_items, toy_with_lora


@pytest.fixture(scope="module")
def continued():
    """toy-tiny with a LoRA of dropout 0.5 that RL continues (non-zero B: the dropout changes the output)."""
    return toy_with_lora(r=8, dropout=0.5, lora_b_std=0.3)


def _reset(model, init):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in init:
                p.copy_(init[n])


def _dropout_modes(model):
    return [m.training for m in model.modules() if isinstance(m, torch.nn.Dropout)]


def test_dropout_really_changes_the_output(continued):
    """Precondition of the tests below: in train mode two passes differ (else they would prove nothing)."""
    model, processor, build_messages, init = continued
    _reset(model, init)
    enc = sampling.encode_prompts(processor, *sampling.prompt_texts(processor, rl_items(1), False, build_messages))
    enc.pop("num_images")
    model.train()
    with torch.no_grad():
        a, b = model(**enc).logits, model(**enc).logits
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_ratio_is_one_and_kl_zero_at_the_first_update(continued, num_iterations):
    """On-policy first update: pi == pi_old == pi_ref token for token, so ratio exactly 1 and KL exactly 0.
    learning_rate=0 keeps the weights, so with num_iterations=2 the second pass must give ratio 1 too."""
    model, processor, build_messages, init = continued
    _reset(model, init)
    cfg = get_grpo_config("poro-grpo", num_generations=2, max_completion_length=6, num_iterations=num_iterations,
                          beta=0.04, kl_reference="start", learning_rate=0.0, log_behaviour_ratio=True)
    torch.manual_seed(0)
    ro = rollout(model, processor, rl_items(2), cfg, build_messages, letter_share_reward)
    model.train()
    before = _dropout_modes(model)
    assert before and all(before)
    reference = poro.make_reference(model, cfg)
    m = train_on_rollout(model, engine.make_optimizer(model, cfg), processor, ro, cfg, build_messages, reference)
    for origin in ("all", "own", "guided"):
        assert m[f"{origin}/ratio_mean"] == 1.0 and m[f"{origin}/ratio_max"] == 1.0, m
        assert m[f"{origin}/kl"] == 0.0, m
        assert m[f"{origin}/clip_low_frac"] == 0.0 and m[f"{origin}/clip_high_frac"] == 0.0
    assert _dropout_modes(model) == before  # the caller's module modes are restored


def test_dropout_can_be_kept_on_by_choice(continued):
    """disable_dropout=False keeps the masks in the trained pass; at num_iterations=1 the ratio still uses the
    detached new log-probs (exactly 1), but the KL to the reference is no longer 0."""
    model, processor, build_messages, init = continued
    _reset(model, init)
    cfg = get_grpo_config("poro-grpo", num_generations=2, max_completion_length=6, beta=0.04, learning_rate=0.0,
                          disable_dropout=False)
    torch.manual_seed(0)
    ro = rollout(model, processor, rl_items(2), cfg, build_messages, letter_share_reward)
    m = train_on_rollout(model, engine.make_optimizer(model, cfg), processor, ro, cfg, build_messages,
                         poro.make_reference(model, cfg))
    assert m["all/ratio_mean"] == 1.0 and m["all/ratio_max"] == 1.0
    assert m["all/kl"] > 1e-5
