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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mpi-course/mpi/blob/main/notebooks/00_setup.ipynb)
#
# # 00 · Set-up and the toy VLM

# %% [markdown] id="md-what-you-will-learn"
# ## What you will learn
#
# How this course runs anywhere: the run config and presets, the offline toy Qwen2.5-VL (tokenizer, processor, model), how an image becomes tokens, why image tokens never carry loss, where LoRA adapters go and what 4-bit quantization leaves in full precision, and what the whole run will cost in hours before it starts. Runs in under a minute on a CPU.

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

# %% [markdown] id="md-1-a-real-qwen2-5-vl-at-toy-size"
# ## 1. A real Qwen2.5-VL, at toy size
#
# The paper fine-tunes Qwen2.5-VL-7B. We cannot download it here, and a course should run on a laptop, so
# `mpi.toy` builds the *same architecture* (`Qwen2_5_VLForConditionalGeneration`) with a tiny config and
# random weights, plus a tokenizer trained on this project's own text. Every stage later loads it through
# `load_model_and_processor`, the same function that loads a hub checkpoint in 4-bit on Colab.

# %% id="code-05"
from mpi.modeling import load_model_and_processor, count_parameters
from mpi.toy import TOY_SPECS

model, processor = load_model_and_processor(cfg.model, quantization=cfg.quantization, seed=cfg.seed, trainable=False)
_, total = count_parameters(model)
vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in n)
print(f"{cfg.model}: {total:,} parameters ({vision:,} in the vision tower)")
if cfg.model in TOY_SPECS:
    spec = TOY_SPECS[cfg.model]
    print(f"images {spec.image_size}px -> {spec.image_tokens} image tokens; text hidden {spec.hidden_size}, {spec.num_hidden_layers} layers")

# %% [markdown] id="md-2-what-the-model-actually-reads"
# ## 2. What the model actually reads
#
# A chat message with an image becomes text with `<|vision_start|><|image_pad|><|vision_end|>`; the
# processor then repeats `<|image_pad|>` once per merged 2×2 patch, and the vision tower's outputs are
# written into exactly those positions.

# %% id="code-07"
from PIL import Image, ImageDraw

size = int(processor.image_processor.size["shortest_edge"] ** 0.5)
image = Image.new("RGB", (size, size), "white")
ImageDraw.Draw(image).ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=(0, 180, 200))
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
print(prompt)
batch = processor(text=[prompt], images=[image], return_tensors="pt").to(model.device)
tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
print(len(tokens), "tokens:", tokens[:20], "...")
print("image tokens:", int((batch["input_ids"] == model.config.image_token_id).sum()), "| pixel patches:", tuple(batch["pixel_values"].shape))
image.resize((96, 96))

# %% [markdown] id="md-3-one-forward-pass-with-image-tokens-mas"
# ## 3. One forward pass with image tokens masked, one generate
#
# Labels equal to -100 carry no loss. Image tokens are inputs, never targets: that is the whole idea of
# the *visually-masked* pretraining in notebook 02. A random model's loss is about ln(vocabulary size).

# %% id="code-09"
import math, torch

labels = batch["input_ids"].clone()
labels[labels == model.config.image_token_id] = -100
with torch.no_grad():
    loss = model(**batch, labels=labels).loss.item()
    generated = model.generate(**batch, max_new_tokens=12, do_sample=False)
print(f"loss {loss:.3f} vs ln(vocab) = {math.log(len(processor.tokenizer)):.3f}")
print("generated:", repr(processor.tokenizer.decode(generated[0, batch["input_ids"].shape[1]:])))

# %% [markdown] id="md-4-where-lora-goes-and-what-4-bit-quantiz"
# ## 4. Where LoRA goes, and what 4-bit quantizes
#
# The vision MLP of Qwen2.5-VL reuses the names `gate_proj/up_proj/down_proj`, so LoRA targets are a
# regex scoped to the language model. 4-bit (NF4, QLoRA) skips `model.visual` and `lm_head`.

# %% id="code-11"
from collections import Counter
from mpi.modeling import LANGUAGE_MODEL_LORA_TARGETS, LoraSettings, lora_module_names

print("LoRA target regex:", LANGUAGE_MODEL_LORA_TARGETS)
lora_model, _ = load_model_and_processor(cfg.model, quantization="4bit", lora=LoraSettings(r=8), seed=cfg.seed)
names = lora_module_names(lora_model)
print(len(names), "LoRA modules, by kind:", dict(Counter(n.rsplit(".", 1)[-1] for n in names)))
print("any in the vision tower?", any("visual" in n for n in names))
kinds = Counter(type(m).__name__ for n, m in lora_model.named_modules() if n.endswith(("proj", "qkv", "lm_head")))
print("layer classes:", dict(kinds))
trainable, total = count_parameters(lora_model)
print(f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

# %% [markdown] id="md-5-the-dtype-each-machine-gets"
# ## 5. The dtype each machine gets
#
# `pick_dtype` is a pure function of what the device reports, which is why it can be tested for a T4
# on a machine without one.

# %% id="code-13"
from mpi.device import DeviceInfo, pick_dtype
for info in [DeviceInfo("cpu"), DeviceInfo("cuda", "Tesla T4", False, (7, 5)), DeviceInfo("cuda", "A100", True, (8, 0))]:
    print(f"{info.name:10s} -> {pick_dtype(info)}")

# %% [markdown] id="md-6-what-the-whole-run-costs"
# ## 6. What the whole run costs, before it starts
#
# A free Colab session ends after a few hours, so know the bill first. `python -m mpi --dry-run` (here
# `plan_report`) loads nothing: it counts the tokens of every stage on a few sample items and divides by a
# throughput table for the device the preset is meant for (a T4 for `colab-t4`, 8 × H100 for `paper`, this
# CPU for `toy` and `tiny`). Each rate names its source in `mpi.wall_time.THROUGHPUT`: published GRPO runs on
# the same stack, or this repo's measured toy run. It is an estimate, to be set against measurement.

# %% id="wall-time"
from mpi import pipeline
from mpi.dry_run import plan_report
from mpi.wall_time import fmt_duration

estimate = plan_report(pipeline.make_plan(cfg)).wall_time  # the plan `python -m mpi` would run with this config
print("\n".join(estimate.lines()))
if cfg.preset == "colab-t4":  # the full plan is opt-in: its hours, before you choose it
    full = pipeline.make_plan(cfg.replace(depths=(2, 4), rl_steps=200, max_completion_length=256))
    print(f"opt-in N = 2 and 4, 200 RL steps, 256-token completions: {fmt_duration(plan_report(full).wall_time.total_seconds)}")

# %% [markdown] id="md-14"
# Next: `01_data_construction.ipynb` builds the two datasets the policy will be internalized from.
