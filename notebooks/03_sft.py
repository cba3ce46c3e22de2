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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mpi-course/mpi/blob/main/notebooks/03_sft.ipynb)
#
# # 03 · Stage 2: CoT and direct SFT without the policy

# %% [markdown] id="md-what-you-will-learn"
# ## What you will learn
#
# How TriMPI's second stage trains the model to answer *without* the policy in context: the SFT loss mask (target tokens only, policy absent), continuing from the VM-CPT adapter versus starting from the base model (the paper's ablation rows), CoT versus direct targets, loss curves, before/after answers on the same held-out image, and the policy-free accuracy that is the MPI metric.

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

# %% [markdown] id="md-04"
# ## 0. The run folder and what notebook 02 left in it
#
# The same run folder as notebooks 01–02 and `python -m mpi` (`runs/<preset>/`). This notebook trains two
# stage-2 chains in view, with the pipeline's config and functions: CoT SFT from the base model (the baseline) and CoT SFT
# from notebook 02's VM-CPT adapter (TriMPI's stage 2). Anything missing is built first, and said so.

# %% id="code-05"
from mpi import pipeline
from mpi.notebook import course_plan, ensure_base, ensure_data

plan = course_plan(cfg)
KEY, SEED = plan.dataset_keys[0], plan.seeds[0]
ensure_data(plan, KEY)
print("every method starts from:", ensure_base(plan))

# %% [markdown] id="md-1-the-idea-train-without-the-policy"
# ## 1. The idea: train without the policy
#
# At inference the policy is gone, so stage 2 trains on exactly that situation:
#
# - **input** (query Q, image I) — *no policy*;
# - **target** the chain of thought and the answer, `<think>…</think>\n\boxed{Case k}` (**CoT SFT**), or the
#   answer alone, `\boxed{Case k}` (**direct SFT**, a baseline);
# - loss on the target tokens only (and the closing `<|im_end|>`, so the model learns to stop).
#
# The CoT cites the policy's sections ("# Condition 1.2: is there a cube? …"), so writing it without the
# policy in view is recalling the policy. TriMPI starts this stage from the VM-CPT adapter of notebook 02;
# the baselines start from the base model. Each row of the paper's stage-2 ablation is a pipeline chain:
#
# | method | chain (`stages/<dataset>/seed0/...`) | starts from | target |
# |---|---|---|---|
# | `direct-sft` | `direct-sft` | base | answer |
# | `cot-sft` | `cot-sft` | base | CoT + answer |
# | `vmcpt-cot-sft` (TriMPI stage 2) | `cpt+cot-sft` | VM-CPT adapter | CoT + answer |

# %% id="stage-config"
CHAINS = [("cot-sft",), ("cpt", "cot-sft")]   # add ("direct-sft",) for the direct-SFT baseline
# The stage's config, as `python -m mpi` trains SFT with it (pipeline.stage_config, the one mapping from the
# RunConfig). Edit it here, e.g. sup = dataclasses.replace(sup, epochs=2): section 5 trains the edited config
# into its own folders (<chain>@<config key>); the run's config keeps the folders notebooks 04-05 continue.
# policy_in_context_frac: 0 = the paper's policy-free SFT. The toy preset keeps the policy in the prompt of
# half the batches: a small model otherwise forgets how to read it, and stage 3's guided half needs that skill.
import dataclasses
sup = pipeline.stage_config(plan, "cot-sft", SEED)
print(f"mode {sup.mode} | epochs {sup.epochs} (max steps {sup.max_steps}) | lr {sup.learning_rate} | "
      f"batch {sup.batch_size} x {sup.grad_accum_steps} | LoRA r={sup.lora_r} | policy in context for "
      f"{sup.policy_in_context_frac:.0%} of the batches")

# %% id="code-08"
train = pipeline.load_split(plan, KEY, "train")
test = pipeline.load_split(plan, KEY, "test")   # held out: its scenes are never trained on
print(f"{KEY}: {len(train)} train / {len(test)} held-out test items")

# %% [markdown] id="md-2-what-carries-loss-the-target-and-nothi"
# ## 2. What carries loss: the target, written here
#
# The collator renders the chat (system, the user turn with image and query, the assistant's response) and
# pads the batch on the right. The target is the response plus the `<|im_end|>` that closes it; the chat
# template writes a newline after that (the *tail*), which is not a target. So, per row: the last tokens before
# the padding are `target + tail`, and only the target's carry loss. `tests/test_notebook_mirrors.py` checks
# this cell against `mpi.collate.SupervisedCollator` on random batches.

# %% id="sft-labels" tags=["mirror"]
import torch
from mpi.data import build_messages, format_response

IGNORE_INDEX = -100

def sft_target_and_tail(processor, item, direct=False, with_policy=False):
    """(target, tail) texts: the response + eos the loss is on, and what the template writes after it."""
    response = format_response(None if direct else item["cot"], item["answer"])
    messages, _ = build_messages(item, with_policy=with_policy, response=response)
    full = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    target = response + processor.tokenizer.eos_token
    return target, full[full.rindex(target) + len(target):]

def sft_labels(input_ids, attention_mask, target_lengths, tail_lengths):
    """Right-padded rows: loss only on the `target_lengths[row]` tokens just before the tail and the padding."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row in range(input_ids.shape[0]):
        stop = int(attention_mask[row].sum()) - tail_lengths[row]
        start = stop - target_lengths[row]
        labels[row, start:stop] = input_ids[row, start:stop]
    return labels

def sft_batch_labels(processor, batch, items, direct=False, with_policy=False):
    n_tokens = lambda text: len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
    pieces = [sft_target_and_tail(processor, item, direct, with_policy) for item in items]
    return sft_labels(batch["input_ids"], batch["attention_mask"], [n_tokens(t) for t, _ in pieces],
                      [n_tokens(tail) for _, tail in pieces])

# %% id="code-10"
from IPython.display import HTML, display
from mpi.collate import SupervisedCollator, describe_labels, mask_summary, render_loss_mask
from mpi.modeling import load_processor

processor = load_processor(pipeline.base_model_path(plan))
items = [train[0], train[1]]   # two rows of different lengths: the shorter one is padded
for mode in ("cot-sft", "direct-sft", "cpt"):
    collate = SupervisedCollator(processor, mode)
    batch = collate(items)
    text = processor.tokenizer.decode(batch["input_ids"][0])
    s = mask_summary(processor, batch)
    same = "" if mode == "cpt" else (" | same labels as the collator: " + str(torch.equal(
        sft_batch_labels(processor, batch, items, direct=mode == "direct-sft"), batch["labels"])))
    print(f"{mode:10s}: {s['tokens']:4d} tokens, {s['supervised']:4d} carry loss | policy text in the sequence: "
          f"{items[0]['policy_text'][-60:] in text}{same}")
for mode in ("cot-sft", "direct-sft"):
    batch = SupervisedCollator(processor, mode)([items[0]])
    display(HTML(f"<b>{mode}</b>" + render_loss_mask(describe_labels(processor, batch), collapse_images=True)))

# %% [markdown] id="md-3-the-vm-cpt-adapter-from-notebook-02"
# ## 3. The VM-CPT adapter from notebook 02
#
# TriMPI's stage 2 continues `stages/<dataset>/seed0/cpt`. If notebook 02 has not run on this run folder, the
# same `train_stage` trains it here.

# %% id="code-12"
from mpi.notebook import ensure_stage, load_stage_model, stage_metrics, stage_path

cpt = ensure_stage(plan, ("cpt",))
print("VM-CPT:", cpt.get("steps"), "steps ->", stage_path(plan, ("cpt",)) / "model")

# %% [markdown] id="md-4-before-the-base-model-on-one-held-out-"
# ## 4. Before: the base model on one held-out image, without the policy

# %% id="code-14"
from mpi.evaluate import generate_texts

probe = [test[0]]
NEW_TOKENS = plan.opts["eval_max_new_tokens"]   # the pipeline's evaluation length
base, _ = load_stage_model(plan, ())
display(probe[0]["images"][0].resize((128, 128)))
print("gold:", probe[0]["answer"])
print("[base, no policy]", repr(generate_texts(base, processor, probe, max_new_tokens=NEW_TOKENS)[0][:300]))
del base

# %% [markdown] id="md-5-train-each-row"
# ## 5. Train each chain
#
# As the pipeline's `train_stage` does: `start_stage` loads the chain's parent (the base with a fresh LoRA, or
# the VM-CPT adapter, which SFT keeps training) and the CoT items, `train_supervised` trains on `sup`,
# `finish_stage` saves `model/`; `train_in_run` runs it in `stages/<dataset>/seed0/<chain>` and records `sup`
# in its `done.json`. A finished chain is not trained again; an edited `sup` is a new stage.

# %% id="train"
from mpi.pipeline import finish_stage, start_stage, train_in_run
from mpi.supervised import train_supervised

def train_sft(chain):
    def train(folder):
        model, processor, train_items, _ = start_stage(plan, KEY, SEED, chain)
        result = train_supervised(model, processor, train_items, sup, folder / "work")
        return finish_stage(plan, folder, result.pop("model"), processor, result)
    return train

for chain in CHAINS:
    done = train_in_run(plan, KEY, SEED, chain, sup, train_sft(chain))
    print(f"{'+'.join(chain)}: {done.get('steps')} steps, last {done.get('last', {}).get('loss', float('nan')):.3f} loss, "
          f"{done['seconds']:.0f}s")

# %% id="code-17"
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 3.5))
for chain in CHAINS:
    rows = [r for r in stage_metrics(plan, chain, config=sup) if "loss" in r]
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="+".join(chain))
ax.set_xlabel("step"); ax.set_ylabel("training loss (target tokens)"); ax.set_title("SFT without the policy"); ax.legend(); ax.grid(alpha=0.3)

# %% [markdown] id="md-6-after-the-same-image-no-policy-in-cont"
# ## 6. After: the same image, no policy in context

# %% id="code-19"
models = {"+".join(chain): load_stage_model(plan, chain, config=sup)[0] for chain in CHAINS}
for name, model in models.items():
    print(f"[{name}]", repr(generate_texts(model, processor, probe, max_new_tokens=NEW_TOKENS)[0][:300]))

# %% [markdown] id="md-7-policy-free-accuracy-on-the-held-out-s"
# ## 7. Policy-free accuracy, a first look
#
# The MPI metric: greedy answers *without* the policy, exact match on `\boxed{}` (ClevrPolicy) or the
# tool-call score (GTAPolicy), by `mpi.evaluate.evaluate_accuracy`. Here on the first `eval_side_limit` test
# items, to keep the notebook short; notebook 05 evaluates every method on the full headline set (and adds the
# override test, the in-context baseline and the token cost). "chance" is the majority-class answer.

# %% id="code-21"
from mpi.evaluate import evaluate_accuracy

EVAL = dict(batch_size=plan.opts["eval_batch_size"], max_new_tokens=NEW_TOKENS,
            limit=plan.opts.get("eval_side_limit", plan.opts["eval_limit"]))
for name, model in models.items():
    scores = evaluate_accuracy(model, processor, test, with_policy=False, **EVAL)
    print(f"{name:12s} policy-free accuracy {scores['accuracy']:.3f} on {scores['n']} items "
          f"(chance {scores['chance']['accuracy']:.3f}, answers parsed {scores['parsed_rate']:.2f})")

# %% [markdown] id="md-22"
# On the toy preset the ordering is noisy: these are a few-million-parameter models trained for
# minutes. What the paper reports (Qwen2.5-VL-7B, N=6) is that VM-CPT before CoT SFT helps (ClevrPolicy-M
# 14.30 → 27.05) and that most of the gain comes from RL — notebook 04.
