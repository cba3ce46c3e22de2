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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mpi-course/mpi/blob/main/notebooks/02_vm_cpt_qlora.ipynb)
#
# # 02 · Stage 1: visually-masked continual pretraining (QLoRA)

# %% [markdown] id="md-what-you-will-learn"
# ## What you will learn
#
# How TriMPI's first stage puts a policy into the weights: build sequences with the policy text and policy images in context, put the next-token loss on every token except the visual ones (you will see the mask drawn over a real example, for a text policy, a policy with image crops and a multi-image tool item), train a (Q)LoRA adapter with a resumable Trainer loop, read its loss curve, and compare the model's answers for the same image before and after.

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
# ## 0. The run folder and the starting model
#
# Every notebook of the course works in one run folder, the one `python -m mpi` uses (`runs/<preset>/`):
# notebook 01 wrote `data/`, this notebook writes `stages/<dataset>/seed0/cpt/`, and notebooks 03–05 start
# from it. The stage is trained here, in view, with the config and the functions the pipeline uses, so these
# cells and the command line make the same stage. Opened alone (a fresh Colab), the notebook builds what is
# missing and says so.
#
# The paper starts from an instruction-tuned VLM that can already see colours and shapes. A random-init toy
# cannot, so for the toy presets every method starts from the **toy base** (`mpi.toy_base`: general visual
# skills + following *other* policies in context), shipped or built once and cached.

# %% id="code-05"
from mpi import pipeline
from mpi.notebook import course_plan, ensure_base, ensure_data

plan = course_plan(cfg)
KEY, SEED = plan.dataset_keys[0], plan.seeds[0]
ensure_data(plan, KEY)
print("every method starts from:", ensure_base(plan))

# %% [markdown] id="md-1-the-idea-read-the-policy-never-learn-t"
# ## 1. The idea: read the policy, never learn to predict pixels
#
# Stage 1 of TriMPI trains on sequences that *contain* the policy:
#
# x = (policy text P_T, policy images P_I, input image I, query Q, chain of thought, answer)
#
# with the ordinary next-token loss on **every token except the visual ones**:
#
# L = −(1/Σ m_t) Σ_t m_t log p(x_t | x_<t),   m_t = 1[x_t is not a visual token].
#
# So the model is asked to *reproduce the policy text* (that is how the rules get into the weights) and
# the reasoning that applies it, while image tokens (of the input image *and* of the policy's image
# crops) stay pure inputs. We also mask the `<|vision_start|>`/`<|vision_end|>` markers around each image:
# they belong to the image's span the processor writes, and "an image starts here" is layout, not policy
# knowledge (`mask_vision_markers=False` trains on them).
#
# The paper trains all weights for 5 epochs at lr 1e-5. We use **QLoRA** by default (LoRA adapters on a
# 4-bit base where bitsandbytes can; the toy runs in fp32 on a CPU), with `lora_r=None` for the paper's
# full-parameter variant. Every knob is a field of `SupervisedConfig`.

# %% id="stage-config"
# The stage's config: pipeline.stage_config is the one mapping from the RunConfig to each stage's config, the
# same SupervisedConfig `python -m mpi` trains VM-CPT with. Edit it here, e.g.
#   sup = dataclasses.replace(sup, learning_rate=3e-4, max_steps=20)
# and section 5 trains your config into its own folder, stages/<dataset>/seed0/cpt@<config key> (the run's
# config keeps cpt/, which notebooks 03-05 continue). Out of memory: batch_size=2, grad_accum_steps=4.
import dataclasses
sup = pipeline.stage_config(plan, "cpt", SEED)
print(f"mode {sup.mode} | epochs {sup.epochs} (max steps {sup.max_steps}) | lr {sup.learning_rate} | "
      f"batch {sup.batch_size} x {sup.grad_accum_steps} | max_length {sup.max_length} | LoRA r={sup.lora_r} | "
      f"quantization {sup.quantization} | mask vision markers {sup.mask_vision_markers}")

# %% [markdown] id="md-2-data-the-policy-is-part-of-every-train"
# ## 2. Data: the policy is part of every training sequence
#
# The run's training split (notebook 01). VM-CPT trains on the CoT examples with the policy in context.
# Beside it, one item of each kind, to see the mask on policy images and on several input images.

# %% id="code-09"
from mpi.data import build_clevr_policy, build_gta_policy

train = pipeline.load_split(plan, KEY, "train")
test = pipeline.load_split(plan, KEY, "test")
print(f"{KEY}: {len(train)} train / {len(test)} held-out test items")
small = dataclasses.replace(pipeline.data_config(cfg, KEY), n_policies=1, n_train_per_policy=2, n_gta_train=8)
examples = {"ClevrPolicy-T": build_clevr_policy(small, "train", variant="T")[0],
            "ClevrPolicy-M": build_clevr_policy(small, "train", variant="M")[0],
            "GTAPolicy": max(build_gta_policy(small, "train"), key=lambda r: len(r["images"]))}

# %% id="code-10"
from mpi.notebook import load_stage_model

base, processor = load_stage_model(plan, ())   # the base model, as every method's first stage loads it
print("base model:", pipeline.base_model_path(plan))

# %% [markdown] id="md-3-one-collated-example-with-the-loss-mas"
# ## 3. The loss mask, written here
#
# The collator (`mpi.collate.SupervisedCollator`) renders the chat text with the policy, lets the processor
# expand each image into its `<|image_pad|>` tokens, pads the batch on the right and then sets the labels.
# That last step is the whole of "visually masked": copy the input ids, and put -100 (no loss) on every
# visual token and on padding. `tests/test_notebook_mirrors.py` checks this cell against the package's.

# %% id="vm-cpt-labels" tags=["mirror"]
import torch

IGNORE_INDEX = -100   # labels equal to -100 carry no loss (PyTorch's cross-entropy ignore_index)

def visual_ids(tokenizer, mask_vision_markers=True):
    """Token ids that are never targets: the image (and video) pad tokens, and the markers around an image."""
    names = ["<|image_pad|>", "<|video_pad|>"] + (["<|vision_start|>", "<|vision_end|>"] if mask_vision_markers else [])
    ids = [tokenizer.convert_tokens_to_ids(name) for name in names]
    return sorted({int(i) for i in ids if i is not None and i != tokenizer.unk_token_id})

def vm_cpt_labels(input_ids, attention_mask, visual_token_ids):
    """VM-CPT labels: next-token loss on every token except visual tokens and padding."""
    labels = input_ids.clone()
    labels[torch.isin(input_ids, torch.as_tensor(visual_token_ids, device=input_ids.device))] = IGNORE_INDEX
    labels[attention_mask == 0] = IGNORE_INDEX
    return labels

# %% [markdown] id="md-3b-mask-drawn"
# The same labels as the collator's, on the three kinds of item, and the mask drawn over one of them: green
# tokens carry loss; grey, struck-through ones do not. `<|image_pad|>×k` is one image's k image tokens.

# %% id="code-12"
from IPython.display import HTML, display
from mpi.collate import SupervisedCollator, describe_labels, mask_summary, render_loss_mask

collate = SupervisedCollator(processor, "cpt", mask_vision_markers=sup.mask_vision_markers)  # no max_length: display only
masked_ids = visual_ids(processor.tokenizer, sup.mask_vision_markers)
for name, item in examples.items():
    batch = collate([item])
    mine = vm_cpt_labels(batch["input_ids"], batch["attention_mask"], masked_ids)
    s = mask_summary(processor, batch)
    print(f"{name}: {s['tokens']} tokens, {s['supervised']} carry loss; masked: {s['image_pad']} image-pad tokens of "
          f"{s['images']} images (+ their markers) | same labels as the collator: {torch.equal(mine, batch['labels'])}")
batch = collate([examples["ClevrPolicy-M"]])
display(HTML(render_loss_mask(describe_labels(processor, batch), collapse_images=True)))

# %% [markdown] id="md-4-before-training-the-same-test-image-wi"
# ## 4. Before training: the same test image, with and without the policy

# %% id="code-14"
from mpi.evaluate import generate_texts

probe = [test[0]]
NEW_TOKENS = plan.opts["eval_max_new_tokens"]   # the pipeline's evaluation length: a CoT must reach its boxed answer
def show_generations(model, title):
    for with_policy in (True, False):
        text = generate_texts(model, processor, probe, with_policy=with_policy, max_new_tokens=NEW_TOKENS)[0]
        print(f"[{title} | policy {'in context' if with_policy else 'absent'}] {text[:300]!r}")
display(probe[0]["images"][0].resize((128, 128)))
print("gold:", probe[0]["answer"])
show_generations(base, "base")
del base

# %% [markdown] id="md-5-train"
# ## 5. Train
#
# The stage, as the pipeline's `train_stage` runs it: `start_stage` loads the base with a fresh (Q)LoRA
# adapter (and the training split), `train_supervised` trains it on `sup` (transformers' `Trainer` with our
# collator and a loss that evaluates the output layer only where a label is supervised), `finish_stage` saves
# the adapter into `model/`. `train_in_run` runs it in the stage's folder, `stages/<dataset>/seed0/cpt`
# (logs in `work/metrics.jsonl`), and writes it atomically with a `done.json` that records `sup`: a
# finished stage is not trained again, by this notebook or by `python -m mpi`, and an edited `sup` is another
# stage, in another folder.

# %% id="train"
from mpi.notebook import stage_metrics, stage_path
from mpi.pipeline import finish_stage, start_stage, train_in_run
from mpi.supervised import train_supervised

CHAIN = ("cpt",)

def train_cpt(folder):
    model, processor, train_items, _ = start_stage(plan, KEY, SEED, CHAIN)
    result = train_supervised(model, processor, train_items, sup, folder / "work")
    return finish_stage(plan, folder, result.pop("model"), processor, result)

done = train_in_run(plan, KEY, SEED, CHAIN, sup, train_cpt)
print({k: done.get(k) for k in ("steps", "seconds", "config_key")}, "->", stage_path(plan, CHAIN, config=sup) / "model")

# %% id="code-17"
from mpi.metrics import plot_metrics
fig = plot_metrics(stage_metrics(plan, CHAIN, config=sup), keys=["loss", "learning_rate", "tokens_per_s"], smooth=5, title="VM-CPT")

# %% [markdown] id="md-6-after-training-the-same-image"
# ## 6. After training: the same image
#
# The model has read the policy many times; with the policy in context it should now copy its structure
# and reasoning format. Without the policy it has started to recall it — how well is stage 2's (SFT) and
# stage 3's (PolicyRollout) job.

# %% id="code-19"
model, _ = load_stage_model(plan, CHAIN, config=sup)
show_generations(model, "after VM-CPT")

# %% [markdown] id="md-7-interrupt-safe-by-construction-and-the"
# ## 7. Interrupt-safe by construction, and the config check
#
# Calling the stage again does not retrain: `train_in_run` finds `done.json` (with this config) and returns it. Had the run been cut
# off, the half-written folder would not count (it is renamed into place only when complete). The adapter is
# standard peft (`PeftModel.from_pretrained(base, ".../cpt/model")`).
#
# Before any training, `check_config` names problems instead of failing an hour in:

# %% id="code-21"
from mpi.supervised import ConfigError, check_config

again = train_in_run(plan, KEY, SEED, CHAIN, sup, train_cpt)
print("second call trained again:", again["seconds"] != done["seconds"], "| adapter files:",
      sorted(p.name for p in (stage_path(plan, CHAIN, config=sup) / "model").iterdir()))
for bad in [dataclasses.replace(sup, max_length=64), dataclasses.replace(sup, quantization="4bit")]:
    try:
        check_config(bad, processor=processor, dataset=[train[0]], device_type="mps")  # pretend: an Apple GPU
    except ConfigError as err:
        print(err)

# %% [markdown] id="md-8-variants"
# ## 8. Variants
#
# - **Full-parameter VM-CPT** (as in the paper): `notebook_setup(PRESET, lora_r=None)` (and a new run name);
#   the stage then saves a whole model directory that the next stage loads.
# - **Embeddings too**: `sup = dataclasses.replace(sup, lora_embeddings=True, embedding_learning_rate=1e-4)`;
#   for the whole run (notebooks 03-05 continuing it): `notebook_setup(PRESET, extra={"cpt": {...}})`.
# - **GTAPolicy**: `notebook_setup(PRESET, datasets=("gta",))`; its ~2K-token policies need `max_length=3072`.
#
# Next: `03_sft.ipynb` continues this adapter with SFT *without* the policy.
