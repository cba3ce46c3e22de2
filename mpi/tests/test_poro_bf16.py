"""GRPOConfig(bf16_scoring=True): the scoring passes (reference, old, trained forward and backward) under a bfloat16
autocast, sampling in float32. The update must stay the same update: ratio exactly 1 and KL exactly 0 on the
first step, log-probs and the gradient close to float32's."""

import pytest
import torch

from mpi import engine
from mpi import sampling
from mpi import poro
from mpi.poro import get_grpo_config, rollout, train_on_rollout
from mpi.tests.rl_helpers import letter_share_reward, rl_items, toy_with_lora


@pytest.fixture(scope="module")
def continued():
    """toy-tiny with a continued LoRA (non-zero B) and dropout 0.5 (which every scoring pass must switch off)."""
    return toy_with_lora(r=8, dropout=0.5, lora_b_std=0.3)


def _reset(model, init):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in init:
                p.copy_(init[n])


def _step(model, processor, build, init, bf16: bool, learning_rate: float = 0.0):
    _reset(model, init)
    cfg = get_grpo_config("poro-grpo", num_generations=2, max_completion_length=8, beta=0.04, kl_reference="start",
                          learning_rate=learning_rate, log_behaviour_ratio=True, bf16_scoring=bf16)
    torch.manual_seed(0)
    ro = rollout(model, processor, rl_items(2), cfg, build, letter_share_reward)
    grads = {}
    opt = engine.make_optimizer(model, cfg)
    real_step = opt.step

    def capture():  # the clipped gradient the update would apply, before the (zero-lr) step
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        return real_step()

    opt.step = capture
    m = train_on_rollout(model, opt, processor, ro, cfg, build, poro.make_reference(model, cfg))
    return ro, m, grads


def test_bf16_first_update_is_on_policy_with_ratio_one_and_kl_zero(continued):
    model, processor, build, init = continued
    _, m, _ = _step(model, processor, build, init, bf16=True)
    for origin in ("all", "own", "guided"):
        assert m[f"{origin}/ratio_mean"] == 1.0 and m[f"{origin}/ratio_max"] == 1.0, m
        assert m[f"{origin}/kl"] == 0.0, m


def test_bf16_scoring_really_runs_in_bfloat16_and_stays_close_to_float32(continued):
    """The same rollout scored both ways: per-token log-probs differ (so bfloat16 really ran) but by little,
    and the gradient points the same way (measured on toy-tiny: mean |log-prob difference| 0.0011, max 0.0031,
    gradient cosine 0.9998)."""
    model, processor, build, init = continued
    ro, _, g32 = _step(model, processor, build, init, bf16=False)
    batch = poro.policy_free_batch(processor, ro, ro.completion_ids.shape[0] // ro.num_groups, build)
    cfg32 = get_grpo_config("poro-grpo", bf16_scoring=False)
    cfg16 = get_grpo_config("poro-grpo", bf16_scoring=True)
    model.eval()
    lp32 = poro.score_no_grad(model, batch, cfg32)
    with engine.autocast(model, cfg16.bf16_scoring):
        lp16 = poro.score_no_grad(model, batch, cfg16)
    mask = ro.eos_mask.bool()
    diff = (lp32 - lp16)[mask].abs()
    assert float(diff.max()) > 0, "bf16 autocast changed nothing: it did not run"
    assert float(diff.mean()) < 0.05, float(diff.mean())
    _, _, g16 = _step(model, processor, build, init, bf16=True)
    flat32 = torch.cat([g32[n].flatten() for n in sorted(g32)])
    flat16 = torch.cat([g16[n].flatten() for n in sorted(g32)])
    cosine = torch.nn.functional.cosine_similarity(flat32, flat16, dim=0)
    assert float(flat32.norm()) > 0 and float(cosine) > 0.99, float(cosine)


def test_bf16_autocast_keeps_the_output_head_in_float32_and_restores_it(continued):
    """Inside engine.autocast(bf16=True) the decoder computes in bfloat16 but the logits come from a float32 head
    (bfloat16 logits slowed the learning test from 0.73 to 0.32); on exit the head's own forward is back."""
    model, processor, build, init = continued
    _reset(model, init)
    enc = sampling.encode_prompts(processor, *sampling.prompt_texts(processor, rl_items(1), False, build))
    enc.pop("num_images")
    head = model.get_base_model().get_output_embeddings()
    seen = {}
    hook = model.get_base_model().model.language_model.layers[0].mlp.register_forward_hook(
        lambda m, i, o: seen.update(mlp=o.dtype))
    model.eval()
    try:
        with torch.no_grad(), engine.autocast(model, True):
            logits = model(**enc).logits
        assert seen["mlp"] == torch.bfloat16 and logits.dtype == torch.float32
        assert "forward" not in head.__dict__
        with torch.no_grad(), engine.autocast(model, False):
            model(**enc)
        assert seen["mlp"] == torch.float32
    finally:
        hook.remove()
