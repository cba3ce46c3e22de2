"""The math of GRPO / DAPO as small pure functions (no model, no data), each unit-tested by hand.

Shapes: B sequences (a step's completions, G or 2G per prompt), T completion tokens (right-padded).

    rewards (B,) --group_advantages--> A (B,)
    logits (B,T,V), ids (B,T) --token_log_probs--> log pi(o_t | q, o_<t) (B,T)
    ratio r = exp(logp - old_logp)  --clipped_surrogate-->  per-token loss (B,T)
    logp, ref_logp --k3_kl--> per-token KL (B,T)
    per-token loss + beta * KL, mask --aggregate_loss--> scalar

PolicyRollout adds one question: the policy-guided half of the group was *sampled* from
pi_old(. | q, P) but is *trained* on pi(. | q). `offpolicy_token_weights` holds the rules for that.
"""

from __future__ import annotations

import math

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
STD_KINDS = ("sample", "population")
OFFPOLICY_RULES = ("as_own", "tis", "shaping")
TRUNCATION_RULES = ("keep", "mask", "penalize")


# --------------------------------------------------------------------------- advantages


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale_rewards: bool = True,
                     std: str = "sample", eps: float = 1e-4) -> torch.Tensor:
    """A_i = (R_i - mean(R_group)) / (std(R_group) + eps), rewards laid out group after group.

    std="sample" divides the squared deviations by n-1 (torch.std's default, what TRL's GRPOTrainer
    uses); std="population" divides by n (the textbook formula). For R=[1,0,0,0] they give
    A_0 = 1.5 and 1.732. scale_rewards=False keeps only the centering (Dr. GRPO's advice: the std
    division up-weights near-solved and near-failed prompts). A group whose rewards are all equal
    has zero advantages (0 / (0 + eps)), never NaN.
    """
    if std not in STD_KINDS:
        raise ValueError(f"std must be one of {STD_KINDS}, got {std!r}")
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.ndim != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by group_size={group_size}; got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards:
        # unbiased=False/True by name; a group of one has sample std 0 by convention here, not NaN.
        if std == "sample" and group_size > 1:
            spread = grouped.std(dim=1, unbiased=True, keepdim=True)
        else:
            spread = grouped.std(dim=1, unbiased=False, keepdim=True)
        centered = centered / (spread + eps)
    # An all-equal group: its float mean can be one ulp off, which eps would blow up to ~1e-3; pin to 0.
    flat = (grouped.max(dim=1, keepdim=True).values - grouped.min(dim=1, keepdim=True).values) == 0
    centered = centered.masked_fill(flat, 0.0)
    return centered.reshape(-1)


def zero_std_groups(rewards: torch.Tensor, group_size: int, tol: float = 1e-6) -> torch.Tensor:
    """(num_groups,) bool: groups whose rewards are all equal (they carry no learning signal)."""
    grouped = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)
    return (grouped.max(dim=1).values - grouped.min(dim=1).values) <= tol


# --------------------------------------------------------------------------- log-probs


def token_log_probs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[ids], without materialising the (B,T,V) log-softmax.

    The temperature must be the sampling temperature: the ratio compares the policy that produced the
    sample with the one being trained, and sampling at T means the sampling policy is softmax(z/T).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (it divides the logits), got {temperature}")
    logits = logits.float() / temperature if temperature != 1.0 else logits.float()
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token entropy of softmax(logits / T), in nats."""
    logits = logits.float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    # tokens masked to -inf (suppressed ids) have p = 0 and contribute 0, not 0 * -inf = NaN
    return -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)


def token_log_probs_and_entropy(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0):
    """token_log_probs and token_entropy from ONE pass over the vocabulary (the loss needs both; separately
    they scale and normalise the (B,T,V) logits twice): with z = logits / T and lse = logsumexp(z),
    log p(id) = z[id] - lse and H = -sum p (z - lse) = lse - sum softmax(z) z. The entropy carries no gradient."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (it divides the logits), got {temperature}")
    z = logits.float() / temperature if temperature != 1.0 else logits.float()
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - lse
    with torch.no_grad():
        zd, lsed = z.detach(), lse.detach()
        # suppressed ids (z = -inf) have p = 0: their 0 * -inf is NaN, which nansum leaves out
        entropy = lsed - (torch.exp(zd - lsed.unsqueeze(-1)) * zd).nansum(-1)
    return logp, entropy


def chunked_log_probs_and_entropy(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                                  chunk_size: int | None = None, with_entropy: bool = False):
    """token_log_probs (and entropy) over row chunks of `chunk_size` sequences.

    The float32 copy of a chunk's logits is the peak memory of this function: with Qwen's 152k
    vocabulary that is 0.6 MB per token, so chunks keep long completions within a T4.
    """
    chunk_size = chunk_size or logits.shape[0]
    logps, ents = [], []
    for start in range(0, logits.shape[0], chunk_size):
        block, block_ids = logits[start:start + chunk_size], ids[start:start + chunk_size]
        if with_entropy:
            lp, ent = token_log_probs_and_entropy(block, block_ids, temperature)
            logps.append(lp)
            ents.append(ent)
        else:
            logps.append(token_log_probs(block, block_ids, temperature))
    logp = torch.cat(logps, dim=0)
    return (logp, torch.cat(ents, dim=0)) if with_entropy else (logp, None)


# --------------------------------------------------------------------------- surrogate, KL


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      epsilon_low: float = 0.2, epsilon_high: float | None = None):
    """PPO's clipped objective as a per-token loss: -min(r A, clip(r, 1-eps_low, 1+eps_high) A).

    Returns (loss, ratio, clipped_low, clipped_high). clipped_low marks tokens where the clip is
    active with A<0 and r < 1-eps_low (the gradient is cut); clipped_high where A>0 and r > 1+eps_high.
    DAPO's "clip-higher" is just epsilon_high > epsilon_low: a rare token with a good advantage may
    grow further before its gradient is cut, which keeps exploration (entropy) alive.
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(-1) if advantages.ndim == logp.ndim - 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * adv
    loss = -torch.min(unclipped, clipped)
    clipped_low = (ratio < 1.0 - epsilon_low) & (adv < 0)
    clipped_high = (ratio > 1.0 + epsilon_high) & (adv > 0)
    return loss, ratio, clipped_low, clipped_high


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token: e^(x) - x - 1 with x = ref_logp - logp.

    Unbiased for samples drawn from pi, always >= 0, low variance. pi=0.5, pi_ref=0.25 gives
    0.5 - ln 0.5 - 1 = 0.1931.
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


# --------------------------------------------------------------------------- aggregation


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str = "grpo", *,
                   max_completion_length: int | None = None, num_sequences: int | None = None,
                   num_tokens: float | None = None) -> torch.Tensor:
    """Reduce a (B,T) per-token loss over the completion mask.

    grpo:    mean over sequences of each sequence's token mean (the paper's 1/G sum_i 1/|o_i| sum_t);
             a long sequence's tokens each weigh less.
    dapo:    one mean over all tokens of the batch; every token weighs the same.
    dr_grpo: sum over tokens / (num_sequences * max_completion_length); a constant normaliser, so
             length carries no bias at all.
    num_sequences / num_tokens override the batch's own counts so that micro-batches of one step
    add up to exactly the full-batch loss (pass the whole step's counts to every micro-batch).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    mask = mask.to(per_token_loss.dtype)
    n_seq = num_sequences if num_sequences is not None else per_token_loss.shape[0]
    if loss_type == "grpo":
        per_seq = (per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / n_seq
    if loss_type == "dapo":
        denom = num_tokens if num_tokens is not None else mask.sum()
        return (per_token_loss * mask).sum() / max(float(denom), 1.0)
    if max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (the constant L_max of its normaliser)")
    return (per_token_loss * mask).sum() / (n_seq * max_completion_length)


# --------------------------------------------------------------------------- masks, truncation


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int | list[int]):
    """Mask of the real completion tokens: everything up to and including the first EOS.

    Never derived from the pad id: Qwen-style tokenizers may pad with the EOS id, and a model may
    emit the pad token as text. Returns (mask (B,T) long, truncated (B,) bool) where truncated marks
    completions with no EOS at all (they hit max_completion_length).
    """
    eos_ids = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                              device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos_ids)
    B, T = completion_ids.shape
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full((B,), T, device=completion_ids.device))
    positions = torch.arange(T, device=completion_ids.device).expand(B, T)
    mask = (positions <= first.unsqueeze(1)).long()
    return mask, ~has_eos


def mask_truncated(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Zero the whole mask of truncated completions: they add nothing to the loss (DAPO's overlong
    filtering); their reward still shapes the group's advantages."""
    return mask * (~truncated).unsqueeze(1).to(mask.dtype)


def overlong_penalty(lengths: torch.Tensor, truncated: torch.Tensor, max_completion_length: int,
                     buffer: int = 0) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward.

    0 for lengths <= L_max - buffer, a linear ramp down to -1 across the last `buffer` tokens, and -1
    for a truncated completion (it would have run past L_max). buffer=0 is the hard rule: -1 only when
    truncated.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    penalty = torch.zeros_like(lengths)
    if buffer > 0:
        start = max_completion_length - buffer
        penalty = torch.clamp((start - lengths) / buffer, min=-1.0, max=0.0)
    return torch.where(torch.as_tensor(truncated, dtype=torch.bool), torch.full_like(lengths, -1.0), penalty)


# --------------------------------------------------------------------------- PolicyRollout weights


def offpolicy_token_weights(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, rule: str = "as_own",
                            cap: float = 2.0) -> torch.Tensor:
    """Per-token weights (detached) for a response sampled from pi_old(.|q,P) and trained on pi(.|q).

    as_own (the paper's rule): weight 1, i.e. treat the response as if pi_old(.|q) had sampled it;
                the PPO ratio is pi(o|q) / pi_old(o|q), which starts at 1.
    tis:        truncated importance sampling: w_t = min(pi_old(o_t|q) / pi_old(o_t|q,P), cap). It
                corrects the sampling distribution back to pi_old(.|q) and caps the variance; tokens
                that the policy made likely but the policy-free model finds unlikely weigh < 1.
    """
    if rule == "as_own":
        return torch.ones_like(old_logp)
    if rule == "tis":
        return torch.exp(old_logp - behaviour_logp).clamp(max=cap).detach()
    raise ValueError(f"offpolicy_token_weights handles 'as_own' and 'tis'; got {rule!r} (see shaped_offpolicy_loss)")


def shaped_offpolicy_loss(logp: torch.Tensor, advantages: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """Off-policy policy shaping (LUFFY, Yan et al. 2025) as a per-token loss: -(p / (p + gamma)) A.

    p = pi(o_t|q) is used in place of the ratio for responses from another policy, with no clipping.
    The gradient gamma/(p+gamma)^2 * dp boosts low-probability tokens, where a plain ratio would let
    the high-probability ones dominate.
    """
    adv = advantages.unsqueeze(-1) if advantages.ndim == logp.ndim - 1 else advantages
    p = torch.exp(logp)
    return -(p / (p + gamma)) * adv


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of values where mask is set; NaN if the mask is empty (the caller decides how to log it)."""
    mask = mask.bool()
    if not mask.any():
        return math.nan
    return float(values[mask].float().mean())
