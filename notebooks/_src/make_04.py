import sys; import os; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import make
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
cells = [
("code", '''from mpi.notebook import notebook_setup
PRESET = "toy"   # "tiny" (CI, seconds), "toy" (toy-small on a CPU, minutes), "colab-t4" (Qwen2.5-VL-3B, 4-bit), "paper"; env MPI_PRESET overrides
cfg = notebook_setup(preset=PRESET, seed=0)'''),
("md", '''## The loop in one picture

For each prompt (query Q, image I):

```
pi_old(. | Q, I)     -> G "own" responses      \\
pi_old(. | Q, I, P)  -> G "guided" responses   /  one batched generate, 2G rows
rewards R_1..R_2G  ->  advantages over the pooled 2G group
log-probs of ALL 2G responses on the policy-FREE prompt (Q, I): new, old, reference
loss = clipped surrogate + beta * KL   ->  one optimizer step
```

The guided half is the point of PolicyRollout: with the policy in context the model finds right answers
it would not find alone, and training on them *without* the policy pushes that behaviour into the weights.
Every piece below is a small function in `mpi.grpo`, shown on numbers small enough to check by hand.'''),
("md", '''## 1. Group advantages

A_i = (R_i − mean R) / (std R + eps) over the group. Which std matters: the sample std (n−1, TRL's choice
and our default) and the population std (n) differ noticeably for small groups.'''),
("code", '''import torch
from mpi.grpo import group_advantages
R = torch.tensor([1.0, 0, 0, 0])
print("sample std     :", group_advantages(R, 4, std="sample", eps=0).tolist())       # 1.5, -0.5 ...
print("population std :", group_advantages(R, 4, std="population", eps=0).tolist())   # 1.732, -0.577 ...
print("all equal      :", group_advantages(torch.full((4,), 0.7), 4).tolist(), "(no signal, no NaN)")
# PolicyRollout pools both halves: own rewards are low, the guided ones (policy in view) higher.
own, guided = [0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0]
A = group_advantages(torch.tensor(own + guided), 8)
print("pooled 2G      :", [round(a, 2) for a in A.tolist()], "-> guided successes get A > 0")'''),
("md", '''## 2. The ratio and the clip

r = π_θ(o_t) / π_old(o_t) per token; the loss is −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A). The clip removes
the gradient only where the update already went far enough *in the direction A wants*. DAPO's
"clip-higher" (ε_high = 0.28 > ε_low = 0.2) lets rare good tokens grow further.'''),
("code", '''import math
from mpi.grpo import clipped_surrogate
print(" A     r    loss   clipped-low clipped-high")
for A_, r in [(1, 0.5), (1, 1.5), (-1, 0.5), (-1, 1.5)]:
    loss, _, lo, hi = clipped_surrogate(torch.tensor([[math.log(r)]]), torch.zeros(1, 1), torch.tensor([float(A_)]), 0.2, 0.2)
    print(f"{A_:+d}  {r:4.1f}  {loss.item():+.2f}   {bool(lo)!s:11s} {bool(hi)}")
sym = clipped_surrogate(torch.tensor([[math.log(1.25)]]), torch.zeros(1, 1), torch.tensor([1.0]), 0.2, 0.2)[0].item()
dapo = clipped_surrogate(torch.tensor([[math.log(1.25)]]), torch.zeros(1, 1), torch.tensor([1.0]), 0.2, 0.28)[0].item()
print(f"r = 1.25, A = +1: symmetric clip {sym:+.2f}, DAPO clip-higher {dapo:+.2f}")'''),
("code", '''import matplotlib.pyplot as plt
rs = torch.linspace(0.3, 1.7, 200)
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for ax, A_ in zip(axes, (1.0, -1.0)):
    for eh, style in ((0.2, "-"), (0.28, "--")):
        obj = -clipped_surrogate(rs.log()[:, None], torch.zeros(200, 1), torch.full((200,), A_), 0.2, eh)[0][:, 0]
        ax.plot(rs, obj, style, label=f"eps_high={eh}")
    ax.set_title(f"objective min(rA, clip(r)A), A={A_:+.0f}"); ax.set_xlabel("r"); ax.grid(alpha=0.3); ax.legend()
fig.tight_layout()'''),
("md", '''## 3. The KL term: k3 against the policy RL starts from

k3 = π_ref/π − log(π_ref/π) − 1, per sampled token: unbiased for KL(π‖π_ref), never negative. The reference
is the policy RL starts from (the paper's π_ref): `train_poro` keeps a copy of the LoRA weights as they were at
step 0 and swaps it in for the reference pass (`kl_reference="start"`). Continuing an SFT adapter with the
adapters switched off as reference (`"no_adapter"`) would pull RL back towards the pre-SFT base.'''),
("code", '''from mpi.grpo import k3_kl
print("k3(pi=0.5, pi_ref=0.25) =", round(k3_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))).item(), 4))
# Check against the exact KL of two small distributions by sampling from pi
g = torch.Generator().manual_seed(0)
p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.25, 0.5, 0.25])
samples = torch.multinomial(p, 20000, replacement=True, generator=g)
print("exact KL(p||q) =", round((p * (p / q).log()).sum().item(), 4),
      "| mean k3 over samples =", round(k3_kl(p.log()[samples], q.log()[samples]).mean().item(), 4))'''),
("md", '''## 4. Aggregating token losses: grpo, dapo, dr_grpo

Two sequences, lengths 2 and 4, per-token losses 1 and 2. `grpo` averages each sequence first (short ones
weigh more per token), `dapo` averages all tokens, `dr_grpo` divides by a constant (num sequences × L_max).'''),
("code", '''from mpi.grpo import aggregate_loss
loss = torch.tensor([[1.0, 1.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
for kind in ("grpo", "dapo", "dr_grpo"):
    print(f"{kind:8s}", round(aggregate_loss(loss, mask, kind, max_completion_length=4).item(), 4))'''),
("md", '''## 5. Where a completion ends

The mask runs up to and including the first EOS; it is never read off the pad id (Qwen-style tokenizers may
pad with EOS). A completion without EOS hit `max_completion_length`: it can be kept, masked out of the loss
(`truncated_completions="mask"`) or penalised (`"penalize"`, DAPO's overlong penalty).'''),
("code", '''from mpi.grpo import completion_mask
eos = 7
ids = torch.tensor([[3, 4, 7, 7, 7], [7, 7, 7, 7, 7], [3, 4, 5, 6, 2]])   # pad == eos == 7
mask, truncated = completion_mask(ids, eos)
print(mask.tolist(), "truncated:", truncated.tolist())'''),
("md", '''## 6. Rewards

Accuracy (ClevrPolicy: exact match of the `\\\\boxed{}` outcome; GTAPolicy: the tool-call score) plus a format
reward for `<think>…</think>` then `\\\\boxed{…}` and nothing after, 0.9/0.1 by default. Parsers never raise.'''),
("code", '''from mpi.rewards import parse_boxed, format_reward, combined_rewards
item = {"id": "x", "dataset": "clevr", "answer": "Case 3"}
for text in ["<think>Condition 1 holds.</think>\\n\\\\boxed{Case 3}", "\\\\boxed{Case 3}", "<think>hm</think>\\\\boxed{Case 1} extra", "garbage {{{"]:
    out = combined_rewards([item], [text])
    print(f"{text!r:55s} boxed={parse_boxed(text)!r:10s} format={format_reward(text)} reward={out['reward'][0]:.2f}")'''),
("md", '''## 7. The data and the starting model

RL runs on the policy-free training prompts. It starts from stage 2 (CoT SFT, notebook 03); if that run is
not on disk, a short SFT runs here. `start_rl_from` folds the SFT adapter into the weights and adds a fresh
LoRA, so RL trains a LoRA of its own on top of the SFT policy (which is also the KL reference).'''),
("code", '''from pathlib import Path
from mpi.data import PRESETS, get_data_config, build_clevr_policy
from mpi.data.messages import build_messages
data_cfg = get_data_config(cfg.data_preset if cfg.data_preset in PRESETS else "toy", image_size=cfg.image_size,
                           depths=cfg.depths, seed=cfg.seed)
train, test = build_clevr_policy(data_cfg, "train"), build_clevr_policy(data_cfg, "test")
RUNS = Path(cfg.out_dir) / cfg.preset
from mpi.modeling import load_processor, resolve_model_path
from mpi.poro import encode_prompts, prompt_texts
tokenizer_only = load_processor(resolve_model_path(cfg.model, seed=cfg.seed))
for with_policy in (False, True):
    enc = encode_prompts(tokenizer_only, *prompt_texts(tokenizer_only, list(train.select(range(4))), with_policy, build_messages))
    print(f"prompt tokens {'with' if with_policy else 'without'} the policy: {enc['attention_mask'].sum(1).float().mean():.0f}")'''),
("code", '''from mpi.modeling import LoraSettings, load_model_and_processor
from mpi.supervised import finished_result, run_sft
from mpi.poro import start_rl_from
sft = finished_result(RUNS / "vm_cpt+cot_sft") or finished_result(RUNS / "cot_sft")
if sft is None:   # notebook 03 has not run on this preset: a short CoT SFT here
    _, _, sft = run_sft(cfg, train, RUNS / "cot_sft", max_steps={"tiny": 4, "toy": 120}.get(cfg.preset, -1))
print("starting from", sft["adapter"] or sft["model_dir"])
model, processor = load_model_and_processor(sft["model_dir"] or cfg.model, adapter=sft["adapter"],
                                            quantization=cfg.quantization, seed=cfg.seed)
model = start_rl_from(model, LoraSettings(r=cfg.lora_r or 8, alpha=cfg.lora_alpha))'''),
("md", '''## 8. One rollout, looked at

One batched `generate` samples G responses without the policy and G with it; the images of each prompt are
encoded once. The table shows where the guided half differs.'''),
("code", '''from mpi.poro import get_grpo_config, grpo_config_from_run, rollout
gcfg = grpo_config_from_run(cfg, "poro-grpo", sample_every=5, print_every=5)
ro = rollout(model, processor, [train[0]], gcfg, build_messages)
print("gold:", train[0]["answer"])
for text, g, r in zip(ro.texts, ro.guided.tolist(), ro.rewards["reward"].tolist()):
    print(f"{'guided' if g else 'own   '} reward {r:.2f} | {text[:110]!r}")'''),
("md", '''## 9. Train: PolicyRollout GRPO, and plain GRPO for comparison

`train_poro` logs, per step and per origin (own vs guided): reward, accuracy, zero-std groups, advantage, KL,
entropy, clip fractions, lengths, truncation, the PPO ratio, and for the guided half the importance ratio
π(o|Q,I)/π(o|Q,I,P) that the paper's rule ignores (`offpolicy_rule="as_own"`; `"tis"` and `"shaping"` are the
alternatives). It checkpoints and resumes exactly (`resume=True`).'''),
("code", '''import copy
from mpi.poro import mean_reward, train_poro
COMPARE_PLAIN = cfg.preset in ("tiny", "toy")        # a second model copy: skip on a T4
fixed = [test[i] for i in range(min(8, len(test)))]   # a fixed, held-out prompt set, policy-free
plain = copy.deepcopy(model) if COMPARE_PLAIN else None   # the same start for plain GRPO
before = mean_reward(model, processor, fixed, gcfg, samples=4, build_messages=build_messages)
poro_run = train_poro(model, processor, train, gcfg, RUNS / "poro_grpo", build_messages=build_messages)
after = {"poro-grpo": mean_reward(model, processor, fixed, gcfg, samples=4, build_messages=build_messages)}
if COMPARE_PLAIN:
    grpo_run = train_poro(plain, processor, train, grpo_config_from_run(cfg, "grpo", print_every=5), RUNS / "grpo",
                          build_messages=build_messages)
    after["grpo"] = mean_reward(plain, processor, fixed, gcfg, samples=4, build_messages=build_messages)
print("held-out mean reward before:", round(before["reward"], 3), "| after:", {k: round(v["reward"], 3) for k, v in after.items()})'''),
("code", '''from mpi.metrics import plot_metrics
plot_metrics(poro_run.out_dir, keys=["own/reward_mean", "guided/reward_mean", "own/accuracy", "guided/accuracy",
                                     "all/kl", "own/completion_length", "guided/completion_length",
                                     "guided/is_log_ratio_mean", "all/entropy"], title="PoRo-GRPO")
if COMPARE_PLAIN:
    plot_metrics(grpo_run.out_dir, keys=["own/reward_mean", "own/accuracy", "all/kl"], title="plain GRPO");'''),
("code", '''from IPython.display import HTML, display
tables = sorted((RUNS / "poro_grpo" / "samples").glob("*.html"))
if tables:
    display(HTML(tables[-1].read_text()))'''),
("md", '''## 10. On a real model (Colab)

`PRESET = "colab-t4"` runs the same cells on Qwen2.5-VL-3B in 4-bit (QLoRA), `rl_learning_rate` 1e-6 as in the
paper, G=4 per origin and 256-token completions. If memory runs out: lower `num_generations`,
`max_completion_length`, or set `micro_batch_size` / `logprob_chunk_size` in the GRPO config. What the paper
reports (Qwen2.5-VL-7B, N=6, ClevrPolicy-T): VM-CPT + SFT + GRPO 55.90 → PoRo-GRPO 65.85, PoRo-DAPO 77.80.
`benchmarks/bench_grpo_vs_trl.py` compares this loop's step time with TRL's `GRPOTrainer`, and
`benchmarks/bench_poro_cost.py` measures what the guided half costs.'''),
]
make("04_policy_rollout_grpo.ipynb", "04 · Stage 3: PolicyRollout GRPO / DAPO from scratch",
     "How TriMPI's third stage works, one small function at a time: group advantages (and which std), the "
     "PPO ratio and its asymmetric clip (DAPO's clip-higher), the k3 KL against the adapter-free model, the "
     "three loss aggregations, completion masks and truncation, the accuracy and format rewards; then "
     "PolicyRollout itself (G responses without the policy + G with it, all trained without it), trained "
     "after SFT, with reward and accuracy split by origin, KL, lengths and the importance ratio the paper "
     "ignores.",
     cells, os.path.join(ROOT, "notebooks", "04_policy_rollout_grpo.ipynb"))
