"""GRPO / DAPO math against numbers worked out by hand (the derivations are in the comments)."""

import math

import pytest
import torch

from mpi.grpo import (aggregate_loss, chunked_log_probs_and_entropy, clipped_surrogate, completion_mask,
                      group_advantages, k3_kl, mask_truncated, offpolicy_token_weights, overlong_penalty,
                      shaped_offpolicy_loss, token_entropy, token_log_probs, token_log_probs_and_entropy,
                      zero_std_groups)


# ---- advantages. R=[1,0,0,0]: mean 0.25, squared deviations 0.5625 + 3*0.0625 = 0.75.
def test_advantages_sample_std():
    # sample std = sqrt(0.75/3) = 0.5 -> A = 0.75/0.5 = 1.5, -0.25/0.5 = -0.5
    adv = group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, std="sample", eps=0.0)
    assert torch.allclose(adv, torch.tensor([1.5, -0.5, -0.5, -0.5]))


def test_advantages_population_std():
    # population std = sqrt(0.75/4) = 0.4330 -> A = 0.75/0.4330 = 1.7321 (= sqrt 3), -0.25/0.4330 = -0.5774
    adv = group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, std="population", eps=0.0)
    assert torch.allclose(adv, torch.tensor([math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3)]), atol=1e-5)


def test_advantages_unscaled_and_per_group():
    adv = group_advantages(torch.tensor([1.0, 0, 0, 0, 2, 4, 4, 6]), 4, scale_rewards=False)
    # group 2: mean 4 -> [-2, 0, 0, 2]
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, -2, 0, 0, 2]))


def test_all_equal_rewards_zero_advantage_no_nan():
    for std in ("sample", "population"):
        for value in (0.7, 0.1, 1 / 3):  # float means of equal values may be off by one ulp: still exactly 0
            adv = group_advantages(torch.full((5,), value), 5, std=std)
            assert torch.equal(adv, torch.zeros(5))
    assert zero_std_groups(torch.tensor([1.0, 1, 0, 0.5, 0.5, 0.5]), 3).tolist() == [False, True]


def test_advantages_bad_input():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(5), 4)
    with pytest.raises(ValueError, match="std"):
        group_advantages(torch.zeros(4), 4, std="biased")


# ---- per-token log-probs at the sampling temperature
def test_token_log_probs_hand_values():
    # logits [0, ln 3] -> probs [1/4, 3/4]; at T=0.5 logits [0, 2 ln 3] -> probs [1/10, 9/10]
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]])
    ids = torch.tensor([[1, 0]])
    assert torch.allclose(token_log_probs(logits, ids), torch.tensor([[math.log(0.75), math.log(0.25)]]))
    assert torch.allclose(token_log_probs(logits, ids, 0.5), torch.tensor([[math.log(0.9), math.log(0.1)]]))
    # entropy of [1/4, 3/4] = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623
    assert torch.allclose(token_entropy(logits), torch.full((1, 2), 0.5623351), atol=1e-6)


def test_chunked_log_probs_equal_unchunked():
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(5, 3, 11, generator=g), torch.randint(0, 11, (5, 3), generator=g)
    full, ent = chunked_log_probs_and_entropy(logits, ids, 0.7, None, with_entropy=True)
    part, ent2 = chunked_log_probs_and_entropy(logits, ids, 0.7, 2, with_entropy=True)
    assert torch.allclose(full, part) and torch.allclose(ent, ent2)
    assert torch.allclose(full, torch.log_softmax(logits / 0.7, -1).gather(-1, ids[..., None])[..., 0], atol=1e-6)


# ---- the four clip branches with eps=0.2: loss = -min(rA, clip(r, 0.8, 1.2) A)
@pytest.mark.parametrize("adv, ratio, loss, low, high", [
    (+1.0, 0.5, -0.5, False, False),  # min(0.5, 0.8) = 0.5: unclipped, gradient pushes r up
    (+1.0, 1.5, -1.2, False, True),   # min(1.5, 1.2) = 1.2: clipped high, no gradient
    (-1.0, 0.5, +0.8, True, False),   # min(-0.5, -0.8) = -0.8: clipped low, no gradient
    (-1.0, 1.5, +1.5, False, False),  # min(-1.5, -1.2) = -1.5: unclipped, gradient pushes r down
])
def test_clip_branches(adv, ratio, loss, low, high):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    out, r, cl, ch = clipped_surrogate(logp, torch.zeros(1, 1), torch.tensor([adv]), 0.2, 0.2)
    assert torch.allclose(out, torch.tensor([[loss]])) and torch.allclose(r, torch.tensor([[ratio]]))
    assert bool(cl) is low and bool(ch) is high
    out.sum().backward()
    clipped = low or high
    # d(-rA)/dlogp = -rA when unclipped, 0 when clipped
    assert torch.allclose(logp.grad, torch.tensor([[0.0 if clipped else -ratio * adv]]))


def test_dapo_clip_higher():
    # r = 1.25, A = +1: symmetric eps 0.2 clips at 1.2; DAPO's eps_high 0.28 lets it through (1.25).
    logp, old = torch.tensor([[math.log(1.25)]]), torch.zeros(1, 1)
    sym, *_ = clipped_surrogate(logp, old, torch.tensor([1.0]), 0.2, 0.2)
    dapo, _, _, high = clipped_surrogate(logp, old, torch.tensor([1.0]), 0.2, 0.28)
    assert torch.allclose(sym, torch.tensor([[-1.2]])) and torch.allclose(dapo, torch.tensor([[-1.25]]))
    assert not bool(high)
    # r = 1.5 is still clipped, now at 1.28; the low side is unchanged (r=0.5, A=-1 -> 0.8)
    big, *_ = clipped_surrogate(torch.tensor([[math.log(1.5)]]), old, torch.tensor([1.0]), 0.2, 0.28)
    low, *_ = clipped_surrogate(torch.tensor([[math.log(0.5)]]), old, torch.tensor([-1.0]), 0.2, 0.28)
    assert torch.allclose(big, torch.tensor([[-1.28]])) and torch.allclose(low, torch.tensor([[0.8]]))


# ---- k3: pi = 0.5, pi_ref = 0.25 -> 0.25/0.5 - ln(0.25/0.5) - 1 = 0.5 + 0.6931 - 1 = 0.1931
def test_k3_kl_hand_value():
    kl = k3_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25)))
    assert abs(float(kl) - 0.1931) < 1e-4
    assert float(k3_kl(torch.tensor(-1.3), torch.tensor(-1.3))) == 0.0


# ---- aggregation: lengths 2 and 4 (T=4), per-token losses 1 and 2
def _two_sequences():
    loss = torch.tensor([[1.0, 1.0, 9.0, 9.0], [2.0, 2.0, 2.0, 2.0]])  # 9s are padding, must not count
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    return loss, mask


def test_aggregate_grpo_dapo_drgrpo():
    loss, mask = _two_sequences()
    assert abs(float(aggregate_loss(loss, mask, "grpo")) - 1.5) < 1e-6            # (1 + 2) / 2
    assert abs(float(aggregate_loss(loss, mask, "dapo")) - 10 / 6) < 1e-6         # (2*1 + 4*2) / 6 = 1.667
    assert abs(float(aggregate_loss(loss, mask, "dr_grpo", max_completion_length=4)) - 1.25) < 1e-6  # 10 / (2*4)
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_loss(loss, mask, "dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        aggregate_loss(loss, mask, "ppo")


def test_aggregate_microbatches_sum_to_full_batch():
    loss, mask = _two_sequences()
    for kind in ("grpo", "dapo", "dr_grpo"):
        full = aggregate_loss(loss, mask, kind, max_completion_length=4)
        parts = sum(aggregate_loss(loss[i:i + 1], mask[i:i + 1], kind, max_completion_length=4,
                                   num_sequences=2, num_tokens=6) for i in range(2))
        assert torch.allclose(full, parts)


# ---- completion masks
def test_completion_mask_pad_equals_eos():
    eos = 7
    ids = torch.tensor([[3, 4, 7, 7, 7],    # pad == eos: the first 7 ends it and is kept
                        [7, 7, 7, 7, 7],    # immediate EOS: one token
                        [3, 4, 5, 6, 2]])   # no EOS: truncated, all tokens count
    mask, truncated = completion_mask(ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]
    assert mask_truncated(mask, truncated).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    mask2, _ = completion_mask(torch.tensor([[3, 9, 5, 7]]), [7, 9])  # several stop ids
    assert mask2.tolist() == [[1, 1, 0, 0]]


def test_overlong_penalty():
    # L_max 10, buffer 4: ramp starts after 6 tokens: 6 -> 0, 8 -> -0.5, 10 (finished) -> -1, truncated -> -1
    pen = overlong_penalty(torch.tensor([3, 6, 8, 10, 10]), torch.tensor([False, False, False, False, True]), 10, 4)
    assert torch.allclose(pen, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    assert overlong_penalty(torch.tensor([9, 10]), torch.tensor([False, True]), 10).tolist() == [0.0, -1.0]


# ---- PolicyRollout importance rules
def test_offpolicy_weights():
    old = torch.log(torch.tensor([[0.2, 0.5, 0.9]]))    # pi_old(o_t | q)
    beh = torch.log(torch.tensor([[0.8, 0.5, 0.3]]))    # pi_old(o_t | q, P), the sampler
    assert torch.equal(offpolicy_token_weights(old, beh, "as_own"), torch.ones(1, 3))
    # ratios 0.25, 1.0, 3.0 -> capped at 2
    assert torch.allclose(offpolicy_token_weights(old, beh, "tis", cap=2.0), torch.tensor([[0.25, 1.0, 2.0]]))
    with pytest.raises(ValueError, match="as_own"):
        offpolicy_token_weights(old, beh, "ppo")


def test_shaped_offpolicy_loss():
    # p = 0.1, gamma = 0.1 -> f = 0.5, loss = -0.5 A; df/dlogp = p*gamma/(p+gamma)^2 = 0.01/0.04 = 0.25
    logp = torch.tensor([[math.log(0.1)]], requires_grad=True)
    loss = shaped_offpolicy_loss(logp, torch.tensor([2.0]), gamma=0.1)
    assert torch.allclose(loss, torch.tensor([[-1.0]]))
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.5]]))  # -A * 0.25


def test_fused_log_probs_and_entropy_equal_the_separate_functions():
    """One pass (logsumexp once) against token_log_probs + token_entropy: values, a suppressed (-inf) id,
    T != 1, and the same gradient (the entropy carries none)."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 4, 9, generator=g) * 3).index_fill(-1, torch.tensor([2]), float("-inf"))
    ids = torch.randint(0, 9, (3, 4), generator=g)
    ids[ids == 2] = 1  # never a suppressed id (the sampler cannot draw it)
    for T in (1.0, 0.7):
        a = logits.clone().requires_grad_(True)
        b = logits.clone().requires_grad_(True)
        lp, ent = token_log_probs_and_entropy(a, ids, T)
        ref = token_log_probs(b, ids, T)
        assert torch.allclose(lp, ref, atol=1e-6)
        assert torch.allclose(ent, token_entropy(logits, T), atol=1e-5) and torch.isfinite(ent).all()
        assert not ent.requires_grad
        lp.sum().backward()
        ref.sum().backward()
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_entropy_with_suppressed_tokens():
    # a -inf logit (suppressed token) has probability 0: entropy of the rest, here ln 2
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]])
    assert torch.allclose(token_entropy(logits), torch.tensor([[math.log(2)]]))
