"""Dynamic loss scaling for fp16 compute (a T4): the decision, the scaler's arithmetic, and its wiring
into train_on_rollout / train_poro (an overflowed update is skipped, counted, the scale halved)."""

import copy
import math

import pytest
import torch
from PIL import Image

from mpi import engine
from mpi import poro
from mpi.poro import get_grpo_config
from mpi.engine import DynamicLossScaler, model_compute_dtype, needs_loss_scaling
from mpi.tests.rl_helpers import toy_with_lora


def test_the_decision_is_fp16_only():
    assert needs_loss_scaling(torch.float16)
    assert not needs_loss_scaling(torch.bfloat16) and not needs_loss_scaling(torch.float32)
    assert needs_loss_scaling(torch.float32, "on") and not needs_loss_scaling(torch.float16, "off")
    with pytest.raises(ValueError, match="loss_scaling must be one of"):
        needs_loss_scaling(torch.float16, "dynamic")
    with pytest.raises(ValueError, match="loss_scaling must be one of"):
        get_grpo_config("poro-grpo", loss_scaling="yes")


def test_compute_dtype_is_the_frozen_base_not_the_adapter():
    base = torch.nn.Linear(8, 8).half().requires_grad_(False)
    adapter = torch.nn.Linear(8, 2)  # float32 and trainable, as peft makes LoRA weights
    assert model_compute_dtype(torch.nn.Sequential(base, adapter)) == torch.float16
    assert model_compute_dtype(torch.nn.Linear(4, 4).to(torch.bfloat16)) == torch.bfloat16
    assert model_compute_dtype(torch.nn.Linear(4, 4)) == torch.float32

    class FourBit(torch.nn.Module):  # bitsandbytes' Linear4bit: uint8 weights, a compute_dtype attribute
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False)
            self.compute_dtype = torch.float16

    assert model_compute_dtype(torch.nn.Sequential(FourBit(), torch.nn.LayerNorm(4))) == torch.float16
    cfg = get_grpo_config("poro-grpo")
    assert engine.make_loss_scaler(torch.nn.Linear(4, 4), cfg) is None
    scaler = engine.make_loss_scaler(torch.nn.Sequential(base, adapter), cfg)
    assert isinstance(scaler, DynamicLossScaler) and scaler.scale == 2.0 ** 16


def _step(model, opt, x, scaler=None, poison=False):
    loss = model(x).pow(2).mean()
    (scaler.scale_loss(loss) if scaler else loss).backward()
    if poison:
        model.weight.grad[0, 0] = float("inf")
    params = list(model.parameters())
    if scaler is not None and not scaler.unscale_(params):
        opt.zero_grad(set_to_none=True)
        scaler.update(found_inf=True)
        return False
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.update(found_inf=False)
    return True


def test_scaled_step_equals_the_unscaled_one_and_an_overflow_is_skipped():
    torch.manual_seed(0)
    plain = torch.nn.Linear(3, 2)
    scaled = copy.deepcopy(plain)
    opt_plain, opt_scaled = (torch.optim.AdamW(m.parameters(), lr=0.1) for m in (plain, scaled))
    scaler = DynamicLossScaler(init_scale=2.0 ** 10, growth_interval=2)
    x = torch.randn(5, 3)
    assert _step(plain, opt_plain, x) and _step(scaled, opt_scaled, x, scaler)
    # multiplying by 2^10 and back is exact in float32: the very same update
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), scaled.parameters()))
    assert (scaler.scale, scaler.good_steps, scaler.skipped_steps) == (2.0 ** 10, 1, 0)

    before = [p.detach().clone() for p in scaled.parameters()]
    assert not _step(scaled, opt_scaled, x, scaler, poison=True)
    assert all(torch.equal(a, b) for a, b in zip(before, scaled.parameters()))  # weights untouched
    assert (scaler.scale, scaler.good_steps, scaler.skipped_steps) == (2.0 ** 9, 0, 1)
    assert scaler.metrics() == {"fp16/loss_scale": 2.0 ** 9, "fp16/skipped_steps": 1}

    _step(scaled, opt_scaled, x, scaler)
    _step(scaled, opt_scaled, x, scaler)
    assert scaler.scale == 2.0 ** 10 and scaler.good_steps == 0  # doubled after growth_interval good steps
    state = scaler.state_dict()
    other = DynamicLossScaler()
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_scaling_rescues_a_gradient_that_fp16_flushes_to_zero():
    """Why it exists: a gradient of 1e-8 flowing through a float16 activation is below fp16's smallest
    subnormal (6e-8) and becomes 0; scaled by 2^16 it survives and unscales (in float32) to ~1e-8."""
    def grad_of(scale):
        w = torch.nn.Parameter(torch.ones(4))  # a float32 LoRA-like weight
        out = (w.half() * torch.ones(4, dtype=torch.float16)).float().sum() * 1e-8
        (out * scale).backward()
        return w.grad / scale

    assert torch.all(grad_of(1.0) == 0)
    assert torch.allclose(grad_of(2.0 ** 16), torch.full((4,), 1e-8), rtol=1e-2)


# ----------------------------------------------------------------------------- wiring on the toy VLM


def _items(n=2):
    colors = [(200, 20, 20), (20, 200, 20)]
    return [dict(id=f"t{i}", dataset="clevr", variant="T", depth=2, policy_name="L2-Test",
                 policy_text="# Condition 1: if there is a red object, the response is Case 1.", policy_images=[],
                 images=[Image.new("RGB", (56, 56), colors[i % 2])],
                 query="According to the Policy: L2-Test, what should be the response for the given image?",
                 cot="ok", answer="Case 1", gold_path=["1"], override=False, extra="{}") for i in range(n)]


def _varied_reward(items, texts):
    r = [sum(c.isalpha() for c in t) / max(len(t), 1) for t in texts]
    return {"reward": r, "accuracy": [float(x > 0.5) for x in r]}


@pytest.fixture(scope="module")
def toy():
    return toy_with_lora(r=4, lora_b_std=0.1)



def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_train_on_rollout_skips_an_overflowed_update(toy):
    model, processor, build_messages, init = toy
    cfg = get_grpo_config("poro-grpo", num_generations=2, max_completion_length=4, learning_rate=1e-2, beta=0.0,
                          log_behaviour_ratio=False)
    torch.manual_seed(0)
    ro = poro.rollout(model, processor, _items(), cfg, build_messages, _varied_reward)

    def update(scaler, poison=False):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in init:
                    p.copy_(init[n])
        name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
        handle = param.register_hook(lambda g: torch.full_like(g, math.inf)) if poison else None
        try:
            m = poro.train_on_rollout(model, engine.make_optimizer(model, cfg), processor, ro, cfg, build_messages,
                                      loss_scaler=scaler)
        finally:
            if handle is not None:
                handle.remove()
        return m, _trainable(model)

    _, unscaled = update(None)
    m, scaled = update(DynamicLossScaler(init_scale=2.0 ** 8))
    assert m["fp16/skipped_steps"] == 0 and m["fp16/loss_scale"] == 2.0 ** 8
    assert any(not torch.equal(unscaled[n], init[n]) for n in init)
    assert all(torch.allclose(unscaled[n], scaled[n], rtol=0, atol=1e-7) for n in init)
    scaler = DynamicLossScaler(init_scale=2.0 ** 8)
    m, after = update(scaler, poison=True)
    assert m["fp16/skipped_steps"] == 1 and m["fp16/loss_scale"] == 2.0 ** 7 and math.isnan(m["grad_norm"])
    assert all(torch.equal(after[n], init[n]) for n in init)  # the skipped update changed nothing


def test_train_poro_logs_the_scaler(toy, tmp_path):
    model, processor, build_messages, _ = toy
    cfg = get_grpo_config("poro-grpo", steps=1, num_generations=2, max_completion_length=4, loss_scaling="on",
                          progress=False, log_every=0, sample_every=0)
    result = poro.train_poro(model, processor, _items(), cfg, tmp_path, build_messages=build_messages,
                             reward_fn=_varied_reward, save_adapter=False)
    row = result.rows[-1]
    assert row["fp16/loss_scale"] == 2.0 ** 16 and row["fp16/skipped_steps"] == 0
    cfg_off = get_grpo_config("poro-grpo", steps=1, num_generations=2, max_completion_length=4, progress=False,
                              log_every=0, sample_every=0)  # auto on a float32 toy: no scaler
    result = poro.train_poro(model, processor, _items(), cfg_off, tmp_path / "off", build_messages=build_messages,
                             reward_fn=_varied_reward, save_adapter=False)
    assert not any(k.startswith("fp16/") for k in result.rows[-1])


def test_idle_update_with_a_loss_scaler_joins_every_iteration():
    """A process without groups takes part in each of num_iterations updates and counts them in its scaler
    (one process here: its summed gradient is its own zero gradient, so nothing moves)."""
    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = DynamicLossScaler(init_scale=4.0, growth_interval=100)
    engine.idle_update(model, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0), 3, 1.0, scaler)
    assert (scaler.good_steps, scaler.skipped_steps, scaler.scale) == (3, 0, 4.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
