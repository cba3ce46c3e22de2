# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown] id="title"
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mpi-course/mpi/blob/main/notebooks/04_policy_rollout_grpo.ipynb)
#
# # 04 · Stage 3: PolicyRollout GRPO / DAPO from scratch

# %% [markdown] id="md-what-you-will-learn"
# ## What you will learn
#
# How TriMPI's third stage works, one small function at a time: group advantages (and which std), the PPO ratio and its asymmetric clip (DAPO's clip-higher), the k3 KL against the policy RL starts from (the SFT model), the three loss aggregations, completion masks and truncation, the accuracy and format rewards; then PolicyRollout itself, written out (G responses without the policy + G with it, all scored and trained without it, one update), then the long run from notebook 03's SFT model, with reward and accuracy split by origin, KL, lengths and the importance ratio the paper ignores.

# %% id="install"
# Install (Colab) / path set-up (local). Colab keeps its own CUDA torch: requirements-colab.txt has no torch.
import os, sys, subprocess
if "google.colab" in sys.modules and not os.path.exists("mpi"):
    subprocess.run(["git", "clone", "-q", "https://github.com/mpi-course/mpi"], check=True); os.chdir("mpi")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "requirements-colab.txt"], check=True)
if os.path.basename(os.getcwd()) == "notebooks": os.chdir("..")
sys.path.insert(0, os.getcwd())

# %% id="drive"
# Colab: True keeps runs/ and the model caches on Google Drive, so the next notebook (and a new session) finds
# this one's output. Run it before the config cell.
USE_DRIVE = False
if USE_DRIVE:
    from mpi.notebook import use_google_drive
    use_google_drive()

# %% id="config"
from mpi.notebook import notebook_setup
# None: the hardware decides ("colab-t4" = Qwen2.5-VL-3B in 4-bit on a CUDA GPU, "toy" on a CPU); or name one:
# "tiny" (CI, seconds), "toy" (toy-small on a CPU, minutes), "colab-t4", "paper". The env MPI_PRESET wins.
PRESET = None
cfg = notebook_setup(preset=PRESET, seed=0)

# %% [markdown] id="md-the-loop-in-one-picture"
# ## The loop in one picture
#
# For each prompt (query Q, image I):
#
# ```
# pi_old(. | Q, I)     -> G "own" responses      \
# pi_old(. | Q, I, P)  -> G "guided" responses   /  one batched generate, 2G rows
# rewards R_1..R_2G  ->  advantages over the pooled 2G group
# log-probs of ALL 2G responses on the policy-FREE prompt (Q, I): new and reference
# loss = clipped surrogate + beta * KL   ->  one optimizer step
# ```
#
# The guided half is the point of PolicyRollout: with the policy in context the model finds right answers
# it would not find alone, and training on them *without* the policy pushes that behaviour into the weights.
# Sections 1–4 write the math (cells tagged `mirror`: `tests/test_notebook_mirrors.py` checks each behaves
# like its `mpi.grpo` twin on random inputs); section 8 writes the rollout and the update step themselves.

# %% [markdown] id="md-1-group-advantages"
# ## 1. Group advantages
#
# A_i = (R_i − mean R) / (std R + eps) over the group. Which std matters: the sample std (n−1, TRL's choice
# and our default) and the population std (n) differ noticeably for small groups. A group whose rewards are
# all equal carries no signal: its advantages are 0 (never NaN).

# %% id="group-advantages" tags=["mirror"]
import torch

def group_advantages(rewards, group_size, *, scale_rewards=True, std="sample", eps=1e-4):
    """Rewards laid out group after group -> one advantage per response."""
    grouped = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards:
        unbiased = std == "sample" and group_size > 1
        centered = centered / (grouped.std(dim=1, unbiased=unbiased, keepdim=True) + eps)
    flat = grouped.max(dim=1, keepdim=True).values == grouped.min(dim=1, keepdim=True).values
    return centered.masked_fill(flat, 0.0).reshape(-1)   # all-equal group: exactly 0

# %% id="code-06"
R = torch.tensor([1.0, 0, 0, 0])
print("sample std     :", group_advantages(R, 4, std="sample", eps=0).tolist())       # 1.5, -0.5 ...
print("population std :", group_advantages(R, 4, std="population", eps=0).tolist())   # 1.732, -0.577 ...
print("all equal      :", group_advantages(torch.full((4,), 0.7), 4).tolist(), "(no signal, no NaN)")
# PolicyRollout pools both halves: own rewards are low, the guided ones (policy in view) higher.
own, guided = [0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0]
A = group_advantages(torch.tensor(own + guided), 8)
print("pooled 2G      :", [round(a, 2) for a in A.tolist()], "-> guided successes get A > 0")

# %% [markdown] id="md-2-the-ratio-and-the-clip"
# ## 2. The ratio and the clip
#
# r = π_θ(o_t) / π_old(o_t) per token; the loss is −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A). The clip removes
# the gradient only where the update already went far enough *in the direction A wants*. DAPO's
# "clip-higher" (ε_high = 0.28 > ε_low = 0.2) lets rare good tokens grow further.

# %% id="clipped-surrogate" tags=["mirror"]
import torch

def clipped_surrogate(logp, old_logp, advantages, epsilon_low=0.2, epsilon_high=None):
    """Per-token PPO loss -min(r A, clip(r, 1-eps_low, 1+eps_high) A); also r and where each clip bites."""
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(-1) if advantages.ndim == logp.ndim - 1 else advantages   # one A per sequence
    ratio = torch.exp(logp - old_logp)
    loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv)
    return loss, ratio, (ratio < 1 - epsilon_low) & (adv < 0), (ratio > 1 + epsilon_high) & (adv > 0)

# %% id="code-08"
import math
print(" A     r    loss   clipped-low clipped-high")
for A_, r in [(1, 0.5), (1, 1.5), (-1, 0.5), (-1, 1.5)]:
    loss, _, lo, hi = clipped_surrogate(torch.tensor([[math.log(r)]]), torch.zeros(1, 1), torch.tensor([float(A_)]), 0.2, 0.2)
    print(f"{A_:+d}  {r:4.1f}  {loss.item():+.2f}   {bool(lo)!s:11s} {bool(hi)}")
sym = clipped_surrogate(torch.tensor([[math.log(1.25)]]), torch.zeros(1, 1), torch.tensor([1.0]), 0.2, 0.2)[0].item()
dapo = clipped_surrogate(torch.tensor([[math.log(1.25)]]), torch.zeros(1, 1), torch.tensor([1.0]), 0.2, 0.28)[0].item()
print(f"r = 1.25, A = +1: symmetric clip {sym:+.2f}, DAPO clip-higher {dapo:+.2f}")

# %% id="code-09"
import matplotlib.pyplot as plt
rs = torch.linspace(0.3, 1.7, 200)
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for ax, A_ in zip(axes, (1.0, -1.0)):
    for eh, style in ((0.2, "-"), (0.28, "--")):
        obj = -clipped_surrogate(rs.log()[:, None], torch.zeros(200, 1), torch.full((200,), A_), 0.2, eh)[0][:, 0]
        ax.plot(rs, obj, style, label=f"eps_high={eh}")
    ax.set_title(f"objective min(rA, clip(r)A), A={A_:+.0f}"); ax.set_xlabel("r"); ax.grid(alpha=0.3); ax.legend()
fig.tight_layout()

# %% [markdown] id="md-3-the-kl-term-k3-against-the-policy-rl-s"
# ## 3. The KL term: k3 against the policy RL starts from
#
# k3 = π_ref/π − log(π_ref/π) − 1, per sampled token: unbiased for KL(π‖π_ref), never negative. The reference
# is the policy RL starts from (the paper's π_ref, here the SFT model of notebook 03): `train_poro` keeps a copy
# of the LoRA weights as they were at step 0 and swaps it in for the reference pass (`kl_reference="start"`).
# Using the model with its adapters switched off (`"no_adapter"`) would pull RL back towards the pre-SFT base.

# %% id="k3-kl" tags=["mirror"]
import torch

def k3_kl(logp, ref_logp):
    """Schulman's k3 per token: e^x - x - 1 with x = log pi_ref - log pi."""
    x = ref_logp - logp
    return torch.exp(x) - x - 1.0

# %% id="code-11"
print("k3(pi=0.5, pi_ref=0.25) =", round(k3_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))).item(), 4))
# Check against the exact KL of two small distributions by sampling from pi
g = torch.Generator().manual_seed(0)
p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.25, 0.5, 0.25])
samples = torch.multinomial(p, 20000, replacement=True, generator=g)
print("exact KL(p||q) =", round((p * (p / q).log()).sum().item(), 4),
      "| mean k3 over samples =", round(k3_kl(p.log()[samples], q.log()[samples]).mean().item(), 4))

# %% [markdown] id="md-4-aggregating-token-losses-grpo-dapo-dr-"
# ## 4. Aggregating token losses: grpo, dapo, dr_grpo
#
# Two sequences, lengths 2 and 4, per-token losses 1 and 2. `grpo` averages each sequence first (short ones
# weigh more per token), `dapo` averages all tokens, `dr_grpo` divides by a constant (num sequences × L_max).

# %% id="aggregate-loss" tags=["mirror"]
import torch

def aggregate_loss(per_token_loss, mask, loss_type="grpo", *, max_completion_length=None):
    mask = mask.to(per_token_loss.dtype)
    summed = per_token_loss * mask
    if loss_type == "grpo":   # mean over sequences of each sequence's token mean
        return (summed.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dapo":   # one mean over every token of the batch
        return summed.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":   # a constant normaliser: no length bias at all
        return summed.sum() / (per_token_loss.shape[0] * max_completion_length)
    raise ValueError(f"loss_type must be grpo, dapo or dr_grpo, got {loss_type!r}")

# %% id="code-13"
loss = torch.tensor([[1.0, 1.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
for kind in ("grpo", "dapo", "dr_grpo"):
    print(f"{kind:8s}", round(aggregate_loss(loss, mask, kind, max_completion_length=4).item(), 4))   # 1.5, 1.667, 1.25

# %% [markdown] id="md-5-where-a-completion-ends"
# ## 5. Where a completion ends
#
# The mask runs up to and including the first EOS; it is never read off the pad id (Qwen-style tokenizers may
# pad with EOS). A completion without EOS hit `max_completion_length`: it can be kept, masked out of the loss
# (`truncated_completions="mask"`) or penalised (`"penalize"`, DAPO's overlong penalty).

# %% id="code-15"
from mpi.grpo import completion_mask
eos = 7
ids = torch.tensor([[3, 4, 7, 7, 7], [7, 7, 7, 7, 7], [3, 4, 5, 6, 2]])   # pad == eos == 7
mask, truncated = completion_mask(ids, eos)
print(mask.tolist(), "truncated:", truncated.tolist())

# %% [markdown] id="md-6-rewards"
# ## 6. Rewards
#
# Accuracy (ClevrPolicy: exact match of the `\boxed{}` outcome; GTAPolicy: the tool-call score) plus a format
# reward for `<think>…</think>` then `\boxed{…}` and nothing after, 0.9/0.1 by default. Parsers never raise.

# %% id="code-17"
from mpi.rewards import parse_boxed, format_reward, combined_rewards
item = {"id": "x", "dataset": "clevr", "answer": "Case 3"}
for text in ["<think>Condition 1 holds.</think>\n\\boxed{Case 3}", "\\boxed{Case 3}", "<think>hm</think>\\boxed{Case 1} extra", "garbage {{{"]:
    out = combined_rewards([item], [text])
    print(f"{text!r:55s} boxed={parse_boxed(text)!r:10s} format={format_reward(text)} reward={out['reward'][0]:.2f}")

# %% [markdown] id="md-7-the-data-and-the-starting-model"
# ## 7. The data and the starting model
#
# RL runs on the run's policy-free training prompts (notebook 01) and starts from TriMPI's stage-2 model,
# `stages/<dataset>/seed0/cpt+cot-sft` (notebook 03; trained here with the same `train_stage` if missing). As
# in the pipeline, RL **continues the SFT adapter** (loaded trainable), and the KL reference is that adapter
# as RL found it. `gcfg` is the stage's config, the one `python -m mpi` trains with (`pipeline.stage_config`:
# e.g. the toy preset samples at temperature 0.7 and skips the importance-ratio log). Edit it here, e.g.
# `gcfg = dataclasses.replace(gcfg, beta=0.04)`: section 9 trains your config into its own folder
# (`cpt+cot-sft+poro-grpo@<config key>`), and the one-step cells below use it too.

# %% id="code-19"
from mpi import pipeline
from mpi.data.messages import build_messages
from mpi.notebook import course_plan, ensure_stage, load_stage_model, stage_metrics, stage_path

plan = course_plan(cfg)
KEY, SEED = plan.dataset_keys[0], plan.seeds[0]
SFT_CHAIN, RL_CHAIN = ("cpt", "cot-sft"), ("cpt", "cot-sft", "poro-grpo")
ensure_stage(plan, SFT_CHAIN)
train = pipeline.load_split(plan, KEY, "train")
test = pipeline.load_split(plan, KEY, "test")
import dataclasses
gcfg = pipeline.stage_config(plan, "poro-grpo", SEED, KEY)
print({k: getattr(gcfg, k) for k in ("num_generations", "prompts_per_step", "steps", "temperature", "max_completion_length",
                                      "beta", "kl_reference", "epsilon", "epsilon_high", "loss_type", "learning_rate",
                                      "log_behaviour_ratio")})

# %% id="code-20"
from mpi.sampling import encode_prompts, prompt_texts
model, processor = load_stage_model(plan, SFT_CHAIN, trainable=True)   # base + the SFT adapter, trainable
for with_policy in (False, True):
    enc = encode_prompts(processor, *prompt_texts(processor, list(train.select(range(4))), with_policy, build_messages))
    print(f"prompt tokens {'with' if with_policy else 'without'} the policy: {enc['attention_mask'].sum(1).float().mean():.0f}")

# %% [markdown] id="md-8-one-rollout-looked-at"
# ## 8. PolicyRollout, written out
#
# **The 2G group.** For each training prompt: the policy-free prompt and the prompt with the policy, laid out
# side by side, each expanded to G samples in one batched `generate` (the images of a prompt are encoded once).
# Every response is rewarded against the item's gold answer, whatever prompt produced it. `mpi.sampling`
# does the tokenising (`prompt_texts`, `encode_prompts`) and the sampling (`generate_from_prompts`, every
# sampling knob explicit so the sampler is the softmax(z/T) the loss assumes).

# %% id="sample-group" tags=["mirror"]
import torch
from mpi.grpo import completion_mask
from mpi.poro import Rollout
from mpi.sampling import generate_from_prompts, prompt_texts
from mpi.rewards import RewardWeights, combined_rewards

def sample_group(model, processor, items, cfg, build_messages):
    """G own + G guided responses per item (own first), with their rewards, as a Rollout."""
    free_texts, free_images = prompt_texts(processor, items, False, build_messages)
    policy_texts, policy_images = prompt_texts(processor, items, True, build_messages)
    texts = [t for pair in zip(free_texts, policy_texts) for t in pair]        # [free_1, policy_1, free_2, ...]
    images = [i for pair in zip(free_images, policy_images) for i in pair]
    gen = generate_from_prompts(model, processor, texts, images, cfg)          # G samples per prompt, in order
    ids = gen["completion_ids"]
    eos_mask, truncated = completion_mask(ids, gen["stops"])
    pad = processor.tokenizer.pad_token_id
    answers = processor.tokenizer.batch_decode(ids.masked_fill(eos_mask == 0, pad), skip_special_tokens=True)
    G = cfg.num_generations
    rows = [item for item in items for _ in range(2 * G)]
    scores = combined_rewards(rows, answers, RewardWeights(cfg.accuracy_weight, cfg.format_weight))
    return Rollout(items=list(items), completion_ids=ids, eos_mask=eos_mask, truncated=truncated,
                   guided=torch.tensor(([False] * G + [True] * G) * len(items)), texts=answers,
                   rewards={k: torch.tensor(v, dtype=torch.float32) for k, v in scores.items()},
                   gen_seconds=gen["seconds"])

# %% id="code-22"
torch.manual_seed(SEED)
batch_items = [train[i] for i in range(gcfg.prompts_per_step)]   # one step's prompts
ro = sample_group(model, processor, batch_items, gcfg, build_messages)
G2 = 2 * gcfg.num_generations
adv = group_advantages(ro.rewards["reward"], G2, std=gcfg.advantage_std, eps=gcfg.advantage_eps)
print(f"{ro.num_groups} groups of {G2} | first group, gold {batch_items[0]['answer']}:")
for text, g, r, a in zip(ro.texts[:G2], ro.guided.tolist(), ro.rewards["reward"].tolist(), adv.tolist()):
    print(f"{'guided' if g else 'own   '} reward {r:.2f} advantage {a:+.2f} | {text[:100]!r}")
for origin, sel in (("own", ~ro.guided), ("guided", ro.guided)):
    print(f"{origin:6s} mean reward {ro.rewards['reward'][sel].mean():.3f} | accuracy {ro.rewards['accuracy'][sel].mean():.3f}")

# %% [markdown] id="md-8b-the-step"
# **One update.** All 2G responses are scored behind the *policy-free* prompt: the guided ones are trained as
# if the model had found them alone (the paper's rule, `offpolicy_rule="as_own"`). With one update per batch
# (`num_iterations=1`) π_old is the network itself, so the old log-probs are the new ones detached: the ratio
# is 1 and its gradient is A·∇log π. The KL term pulls towards the reference (the start policy).
# `mpi.logprobs` builds the scoring tensors (`build_scoring_batch`), runs the vision tower once per prompt
# (`encode_images_once`) and the teacher-forced forward (`forward_log_probs`). The test checks this step
# gives the same loss and the same updated weights as `mpi.poro.train_on_rollout`.

# %% id="poro-step" tags=["mirror"]
import contextlib
import torch
from mpi.grpo import mask_truncated
from mpi.logprobs import build_scoring_batch, encode_images_once, forward_log_probs
from mpi.engine import dropout_disabled
from mpi.sampling import prompt_texts

def poro_step(model, optimizer, processor, ro, cfg, build_messages, reference=None):
    """One PoRo-GRPO update on a rollout; returns the loss. reference(model): the KL reference's context."""
    if cfg.num_iterations != 1 or cfg.offpolicy_rule != "as_own":
        raise ValueError("poro_step is the on-policy 'as_own' step; mpi.poro.train_on_rollout does the others")
    if cfg.beta > 0 and reference is None:
        raise ValueError("beta > 0 needs the KL reference: pass reference=mpi.poro.make_reference(model, cfg)")
    G2 = ro.completion_ids.shape[0] // ro.num_groups                       # own + guided = 2G rows per group
    adv = group_advantages(ro.rewards["reward"], G2, scale_rewards=cfg.scale_rewards, std=cfg.advantage_std,
                           eps=cfg.advantage_eps)                          # pooled over both halves
    mask = mask_truncated(ro.eos_mask, ro.truncated) if cfg.truncated_completions == "mask" else ro.eos_mask
    texts, images = prompt_texts(processor, ro.items, False, build_messages)   # the policy-FREE prompts
    prompt_of_row = torch.arange(ro.num_groups).repeat_interleave(G2)
    batch = build_scoring_batch(processor, texts, images, ro.completion_ids, ro.eos_mask, prompt_of_row)
    rows = torch.arange(batch.num_rows)
    model.train()
    with dropout_disabled(model, cfg.disable_dropout):
        encode_images_once(model, batch)
        ref_logp = None
        if cfg.beta > 0:
            with torch.no_grad(), reference(model):
                ref_logp = forward_log_probs(model, batch, rows, cfg.temperature)[0].float()
        logp = forward_log_probs(model, batch, rows, cfg.temperature)[0]
        per_token, _, _, _ = clipped_surrogate(logp, logp.detach(), adv.to(logp.device), cfg.epsilon, cfg.epsilon_high)
        if ref_logp is not None:
            per_token = per_token + cfg.beta * k3_kl(logp, ref_logp.to(logp.device))
        loss = aggregate_loss(per_token, mask.to(logp.device), cfg.loss_type,
                              max_completion_length=cfg.max_completion_length)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())

# %% id="one-step"
from mpi.poro import make_reference, policy_free_batch, score_no_grad
from mpi.engine import make_optimizer

def mean_logp_by_sign(model):
    """Mean per-token log-prob, behind the policy-free prompt, of the responses with A > 0 and with A < 0."""
    logp = score_no_grad(model, policy_free_batch(processor, ro, G2, build_messages), gcfg)
    per_response = (logp * ro.eos_mask).sum(1) / ro.eos_mask.sum(1).clamp(min=1)
    return [float(per_response[sel].mean()) if sel.any() else float("nan") for sel in (adv > 0, adv < 0)]

optimizer = make_optimizer(model, gcfg)
reference = make_reference(model, gcfg)   # the start policy, for the KL term
before = mean_logp_by_sign(model)
step_loss = poro_step(model, optimizer, processor, ro, gcfg, build_messages, reference)
after = mean_logp_by_sign(model)
print(f"loss {step_loss:+.4f}")
if (adv == 0).all():
    print("every group's rewards are equal: zero advantages, this step only moves the weights by the KL term")
else:
    print(f"responses with A > 0: mean log-prob {before[0]:.4f} -> {after[0]:.4f} (up)\n"
          f"responses with A < 0: mean log-prob {before[1]:.4f} -> {after[1]:.4f} (down)")
del model, optimizer, reference

# %% [markdown] id="md-9-train-policyrollout-grpo-and-plain-grp"
# ## 9. The long run: `train_poro`
#
# `train_poro` repeats that step for `steps` steps, sampling `prompts_per_step` prompts per step, and logs per
# step and per origin (own vs guided): reward, accuracy, zero-std groups, advantage, KL, entropy, clip
# fractions, lengths, truncation, the PPO ratio, and (if `log_behaviour_ratio`) the importance ratio
# π(o|Q,I)/π(o|Q,I,P) that the paper's rule ignores (`offpolicy_rule="tis"` and `"shaping"` are the
# alternatives). The learning rate warms up over `warmup_steps` and follows `lr_scheduler_type` (cosine on the toy).
# Every `eval_every` steps it samples the **validation split** (object sets unseen in training, never the test
# split) and logs sampled accuracy, pass@k and greedy accuracy; with `keep_best` the stage ends with the weights
# of the best *smoothed* validation accuracy, the starting weights included, so RL that only hurts gives the
# SFT model back. Below, the stage as the pipeline's `train_stage` runs it: `start_stage` loads the SFT model
# (trainable), the training split and the validation split, `train_poro` trains on `gcfg`, `finish_stage`
# saves `model/`; `train_in_run` runs it in `stages/<dataset>/seed0/cpt+cot-sft+poro-grpo` (with `gcfg` in its
# `done.json`), the RL model notebook 05 evaluates.
# (`--set 'rl_learning_rates=[3e-5,1e-4,3e-4]'` trains one run per rate and keeps the rate best on validation.)

# %% id="train"
import json
from mpi.pipeline import finish_stage, start_stage, train_in_run
from mpi.poro import mean_reward, train_poro

def train_rl(folder):
    model, processor, train_items, val_items = start_stage(plan, KEY, SEED, RL_CHAIN)
    result = train_poro(model, processor, train_items, gcfg, folder / "work", resume=True, save_adapter=False,
                        eval_items=val_items)
    return finish_stage(plan, folder, model, processor, result)

fixed = pipeline.validation_items(plan, KEY)[:8]   # a fixed validation prompt set, policy-free (not the test split)
sft_model, _ = load_stage_model(plan, SFT_CHAIN)
before = mean_reward(sft_model, processor, fixed, gcfg, samples=4, build_messages=build_messages)
del sft_model
done = train_in_run(plan, KEY, SEED, RL_CHAIN, gcfg, train_rl)
rl_model, _ = load_stage_model(plan, RL_CHAIN, config=gcfg)
after = mean_reward(rl_model, processor, fixed, gcfg, samples=4, build_messages=build_messages)
best_json = stage_path(plan, RL_CHAIN, config=gcfg) / "work" / "best" / "best.json"   # written when keep_best is on
kept = (f", kept step {json.loads(best_json.read_text())['step']} (best smoothed validation accuracy)"
        if best_json.exists() else "")
print(f"{done.get('steps')} RL steps in {done['seconds']:.0f}s{kept} | validation mean reward (policy-free) "
      f"before {before['reward']:.3f} -> after {after['reward']:.3f}")

# %% id="code-25"
from mpi.metrics import plot_metrics
plot_metrics(stage_metrics(plan, RL_CHAIN, config=gcfg), keys=["own/reward_mean", "guided/reward_mean", "own/accuracy", "guided/accuracy",
                                                  "all/kl", "own/completion_length", "guided/completion_length",
                                                  "all/entropy"], title="PoRo-GRPO");
from mpi.metrics import plot_validation
plot_validation(stage_path(plan, RL_CHAIN, config=gcfg) / "work");   # the validation curve the best checkpoint was chosen on

# %% id="code-26"
from IPython.display import HTML, display
tables = sorted((stage_path(plan, RL_CHAIN, config=gcfg) / "work" / "samples").glob("*.html"))
if tables:
    display(HTML(tables[-1].read_text()))

# %% [markdown] id="md-27"
# ## 10. Plain GRPO, DAPO, and a real model (Colab)
#
# - **Plain GRPO** (no guided half, the paper's "CoT SFT + GRPO" row): `ensure_stage(plan, ("cot-sft", "grpo"))`,
#   evaluated in notebook 05 if you add `"cot-sft-grpo"` to the plan's methods. **PoRo-DAPO**: chain
#   `("cpt", "cot-sft", "poro-dapo")` (method `trimpi-dapo`).
# - On a CUDA GPU the config cell picks `colab-t4`: the same cells on Qwen2.5-VL-3B in 4-bit (QLoRA),
#   `rl_learning_rate` 1e-6 as in the paper, G=4 per origin and 256-token completions. If memory runs out:
#   lower `num_generations`, `max_completion_length`, or `micro_batch_size` (RunConfig fields).
#
# What the paper reports (Qwen2.5-VL-7B, N=6, ClevrPolicy-T): VM-CPT + SFT + GRPO 55.90 → PoRo-GRPO 65.85,
# PoRo-DAPO 77.80. `benchmarks/bench_grpo_vs_trl.py` compares this loop's step time with TRL's `GRPOTrainer`,
# and `benchmarks/bench_poro_cost.py` measures what the guided half costs.
