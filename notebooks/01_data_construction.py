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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mpi-course/mpi/blob/main/notebooks/01_data_construction.ipynb)
#
# # 01 · Building ClevrPolicy and GTAPolicy

# %% [markdown] id="md-what-you-will-learn"
# ## What you will learn
#
# How the two MPI datasets are made from nothing: CLEVR-style scenes rendered with Pillow, decision-tree policies with N layers (and the -M variant with image crops), items with gold outcomes, forward chain-of-thought and the RL answer format, the outcome distribution and its chance line, the GTAPolicy tool rulebook with its scorer, and how many prompt tokens a policy costs — the cost internalization removes.

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

# %% id="code-04"
import json, dataclasses
import matplotlib.pyplot as plt
from mpi import pipeline
from mpi.data import (build_clevr_policy, build_gta_policy, build_messages, format_response, chance_report,
                      plot_outcomes, clevr_policies, render_object, score_tool_call, token_report, load_dataset_dir)
from mpi.data.build import render_examples
from mpi.data.viz import plot_policy_tree, show_scenes, show_images
from mpi.modeling import available_tokenizers
from mpi.notebook import course_plan

# The run folder every notebook of the course shares with `python -m mpi` (data/, stages/, eval/ ...).
plan = course_plan(cfg)
KEY = plan.dataset_keys[0]                 # e.g. "clevr-T-N2": ClevrPolicy, text policies, N=2 layers
# The pipeline's data config for that key (sizes from cfg.data_preset: "toy" for CI, "small" for the laptop
# toy, "colab", "paper"). An unknown data preset fails here with the library's error: no silent fallback.
data_cfg = pipeline.data_config(cfg, KEY)
print(data_cfg)

# %% [markdown] id="md-1-scenes-clevr-s-ontology-rendered-here"
# ## 1. Scenes: CLEVR's ontology, rendered here
#
# The paper uses CLEVR's images. We cannot download them, so `mpi.data.scenes` samples scenes with CLEVR's
# exact ontology — shape {cube, sphere, cylinder}, 8 colors, size {small, large}, material {rubber, metal},
# 3–10 objects placed without heavy overlap — and draws them with Pillow: each object is ray-cast as a real
# 3-D primitive, rubber is matte, metal is a dark mirror with a hot highlight, large is twice the radius of
# small. The scene graph uses CLEVR's own JSON schema, so a real `CLEVR_<split>_scenes.json` plus its image
# folder can be used instead (`DataConfig(clevr_scenes_json=..., clevr_image_dir=...)`).

# %% id="code-06"
examples = render_examples(n=8, image_size=112, seed=cfg.seed)   # 112 px for your eyes; the toy model sees 56 px
show_scenes(examples, ncols=4); plt.show()
print(json.dumps(examples[0][0]["objects"][:2], indent=1))

# %% [markdown] id="md-1b-the-toy-s-world"
# ### 1b. The toy's world: the same scenes as sprites
#
# A pretrained VLM reads the perspective scenes above; a 3M-parameter toy trained on a laptop does not (small,
# overlapping objects, one of them ~13 px). The `toy` and `tiny` presets therefore draw *the same object lists* as
# flat sprites (`DataConfig.world="sprites"`, `mpi.data.sprites`): one object per cell of a 4 x 4 grid, so at
# 112 px each of the 16 visual tokens holds at most one object. Cube = square, sphere = disc, cylinder =
# triangle; large fills the cell, small half of it; metal has a white rim and a highlight, rubber a thin dark
# rim. The scene graph, the policies, the balancing and the test split are unchanged: only the picture differs.

# %% id="code-06b"
toy_objects = (1, 4)   # the toy presets' scenes hold 1-4 objects (DataConfig.n_objects)
clevr_look = render_examples(n=4, image_size=112, seed=cfg.seed, n_objects=toy_objects)
sprite_look = render_examples(n=4, image_size=112, seed=cfg.seed, world="sprites", n_objects=toy_objects)
show_images([img for _, img in clevr_look] + [img for _, img in sprite_look],
            [f"CLEVR-like {k}" for k in range(4)] + [f"sprites {k}" for k in range(4)], size=2.2); plt.show()
from mpi.data.clevr import describe_target
for k, (scene, _) in enumerate(sprite_look):
    print(k, describe_target(scene["objects"]))   # the words the toy learns to say about each picture

# %% [markdown] id="md-2-policies-decision-trees-with-n-layers"
# ## 2. Policies: decision trees with N layers
#
# A policy is a binary tree. Each decision node asks whether the image satisfies one condition ("there is a
# cyan object"); a node on its parent's *true* edge never tests the parent's attribute type; leaves are unique
# outcomes "Case k". N layers give 2^N outcomes (the generator keeps both answers of every node possible,
# so every leaf is reachable). The text follows the paper: a general instruction, a unique pronounceable
# name, and numbered sections `# Condition 1`, `# Condition 1.1`, … that the reader must jump between.

# %% id="code-08"
policies = {n: clevr_policies(n, 1, seed=cfg.seed)[0] for n in (2, 4, 6)}
fig, axes = plt.subplots(3, 1, figsize=(15, 11), gridspec_kw={"height_ratios": [1, 1.6, 2.2]})
for ax, (n, policy) in zip(axes, policies.items()):
    plot_policy_tree(policy, ax=ax)
plt.tight_layout(); plt.show()
print(policies[2].render_text())
text6 = policies[6].render_text()
n_sections = sum(line.startswith("# Condition") for line in text6.splitlines())
print(f"... the N=6 policy has {n_sections} sections and {len(text6):,} characters; its start:")
print("\n".join(text6.splitlines()[4:14]))

# %% [markdown] id="md-2b-compact"
# ### 2b. The toy's compact policies
#
# The toy presets write the same tree compactly (`DataConfig.policy_format="compact"`, `Policy.render_compact`):
# one line per section, the condition as the words a scene description uses, each section id one token of the
# toy tokenizer. Their CoT is *evidence first* (`mpi.data.clevr.compact_cot`): the model first lists what it
# sees, then checks each condition against those words and jumps to the next section. A toy can learn to read
# this in an hour of CPU; the paper's prose it could not (docs/results-history.md). The real presets keep the
# paper's format.

# %% id="code-08b"
print(policies[2].render_compact())

# %% [markdown] id="md-3-the-m-variant-some-values-shown-as-ima"
# ## 3. The -M variant: some values shown as image crops
#
# In ClevrPolicy-M some conditions name their value with a picture instead of a word ("an object with the same
# color as the object in <image>"). Each `<image>` in the text is replaced, in order, by one of the item's
# `policy_images` when the chat messages are built.

# %% id="code-10"
policy_m = clevr_policies(2, 1, seed=cfg.seed, variant="M")[0]
print(policy_m.render_text().split("Policy:")[1])
specs = policy_m.policy_images()
show_images([render_object(o, 96) for o in specs],
            [f"<image> {k + 1}: shows {n.condition.attr} = {n.condition.value}"
             for k, n in enumerate([n for n in policy_m.decision_nodes() if n.image is not None])], size=2.6); plt.show()

# %% [markdown] id="md-4-a-worked-item-query-chain-of-thought-a"
# ## 4. A worked item: query → chain of thought → answer
#
# The gold outcome comes from walking the tree on the scene graph, never from the picture. The forward CoT
# cites every condition id on the path and says what it sees; the RL answer format is
# `<think>…</think>` then `\boxed{Case k}`. `build_messages` is the one place prompts are made: *with* the
# policy (teacher view, VM-CPT, half of PolicyRollout) or *without* it (what is left at inference).

# %% id="code-12"
from mpi.notebook import ensure_data
# Writes runs/<name>/data/<KEY>/{train,test,override} with pipeline.build_data (skipped if already there):
# notebooks 02-05 train and evaluate on exactly these items.
done = ensure_data(plan, KEY, who="here")
print("sizes:", done["sizes"], "| chance (majority class) on test:", round(done["chance"], 3))
train = pipeline.load_split(plan, KEY, "train")
test = pipeline.load_split(plan, KEY, "test")
item = train[0]
show_images(item["images"], [item["id"]], size=3); plt.show()
print("QUERY :", item["query"])
print("PATH  :", item["gold_path"])
print("TARGET:", format_response(item["cot"], item["answer"]))
for with_policy in (True, False):
    messages, images = build_messages(item, with_policy=with_policy)
    text = "".join(p.get("text", "<IMAGE>") for p in messages[0]["content"])
    print(f"\n--- user turn with_policy={with_policy}: {len(text)} characters, {len(images)} image(s); last 160 chars:")
    print(text[-160:])

# %% [markdown] id="md-5-outcome-distribution-and-the-chance-li"
# ## 5. Outcome distribution and the chance line
#
# Left to chance, CLEVR scenes make some outcomes rare (e.g. "no small object" among 10 objects), and a model
# that always answers a policy's most common case scores its **majority-class accuracy** without looking at
# the image. Every later accuracy is read against that line. By default we sample *outcome-balanced* scenes
# (rejection sampling: pick a target case, sample a scene under its path constraints, re-check by walking the
# tree), so the chance line drops to 1 / #outcomes.

# %% id="code-14"
unbalanced = build_clevr_policy(dataclasses.replace(data_cfg, balanced=False), split="train")
fig, axes = plt.subplots(1, 2, figsize=(12, 3))
plot_outcomes(train["policy_name"], train["answer"], ax=axes[0], title="training split (balanced, default)")
plot_outcomes(unbalanced["policy_name"], unbalanced["answer"], ax=axes[1], title="unbalanced sampler (balanced=False)")
plt.tight_layout(); plt.show()
for name, ds in (("balanced", train), ("unbalanced", unbalanced)):
    rep = chance_report(ds)
    print(f"{name:10s} majority-class accuracy {rep['majority_accuracy']:.3f} | per policy {rep['per_policy']}")

# %% [markdown] id="md-scene-marginals"
# Balancing the outcomes must not make the *scenes* strange: a model could otherwise learn "three objects means
# Case 2". Below, the training split's objects per scene and color shares beside the unbalanced sampler's, and
# how many test items show a set of objects that no training scene of the same policy has (the test split
# measures reading the image, not recalling a scene).

# %% id="scene-marginals"
from collections import Counter

def scene_objects(ds):
    return [json.loads(extra)["scene"]["objects"] for extra in ds["extra"]]

fig, axes = plt.subplots(1, 2, figsize=(12, 3))
for name, ds, shift in (("training split", train, -0.2), ("unbalanced sampler", unbalanced, 0.2)):
    scenes = scene_objects(ds)
    counts = Counter(len(s) for s in scenes)
    axes[0].bar([k + shift for k in sorted(counts)], [counts[k] / len(scenes) for k in sorted(counts)], width=0.4, label=name)
    colors = Counter(o["color"] for s in scenes for o in s)
    total = sum(colors.values())
    names = sorted(colors)
    axes[1].bar([i + shift for i in range(len(names))], [colors[c] / total for c in names], width=0.4, label=name)
axes[0].set_xlabel("objects per scene"); axes[0].set_ylabel("share of scenes"); axes[0].legend()
axes[1].set_xticks(range(len(names)), names, rotation=30); axes[1].set_ylabel("share of objects"); axes[1].legend()
plt.tight_layout(); plt.show()
from mpi.data.clevr import split_overlap
overlap = split_overlap(train, test)   # same policy name, same multiset of objects = "seen"
print(f"test items whose object set no training scene of their policy has: {overlap['n_items'] - overlap['n_seen']} "
      f"of {overlap['n_items']} ({overlap['unseen_share']:.1%})")

# %% [markdown] id="md-6-gtapolicy-tool-calls-chosen-by-a-ruleb"
# ## 6. GTAPolicy: tool calls chosen by a rulebook
#
# The policy is a tool catalogue (tools with versions and typed arguments) and the paper's 24 tool-calling rules.
# Rules 1–20 choose a tool's version from the user profile; the OCR group is the paper's example: credits ≤ 250
# → OCR_v5; 250 < credits ≤ 750 → OCR_v4 for account A/B else OCR_v3; credits > 750 → OCR_v2 if age < 21 else
# OCR_v1; Rule 7, MathOCR when the image holds math, overrides them. Rules 21–24 are tips: describe every image
# of a multi-image task first, find a region's box with TextToBbox first, use exact image names, and search with
# k = 1 for a factual question, 4 for an open-ended one. The text says the first rule that applies decides.
# An item has a profile, rendered images that fit the tool, a query, the calls so far, and the gold next call;
# its CoT names the rule that decided.
# `score_tool_call` = 0.5·tool + 0.5·arguments (exact / token-F1 / expression equality without `eval` / IoU),
# never raising, never NaN.

# %% id="code-16"
gta = build_gta_policy(data_cfg, split="train")
g = next(x for x in gta if json.loads(x["extra"])["history"])
extra = json.loads(g["extra"])
show_images(g["images"], extra["image_paths"], size=3); plt.show()
print("profile:", extra["profile"]); print("history:", extra["history"]); print("query:", g["query"])
print("gold   :", g["answer"]); print("cot    :", g["cot"])
gold = json.loads(g["answer"])
wrong_version = dict(gold, name=gold["name"][:-1] + ("1" if not gold["name"].endswith("1") else "2"))
for pred in (g["answer"], json.dumps(wrong_version), '{"name": "OCR_v1", "arguments": {}}', "not json"):
    print(f"{score_tool_call(pred, g['answer'])}  <- {pred[:70]}")
rules = g["policy_text"].split("## Rules", 1)[1]
print("## Rules" + rules[:rules.index("### GoogleSearch")])   # the first groups of the rulebook

# %% [markdown] id="md-7-what-internalization-saves-policy-toke"
# ## 7. What internalization saves: policy tokens vs query tokens
#
# The policy is paid for on every request while it sits in the prompt. Counted with the toy tokenizer (and any
# real tokenizer already in your Hugging Face cache):

# %% id="code-18"
rows = token_report(data_cfg, tokenizers=available_tokenizers(), depths=(2, 4, 6))
print(f"{'dataset':8s} {'var':4s} {'N':>2s} {'tokenizer':28s} {'policy':>8s} {'query':>7s} {'ratio':>6s} {'saved':>6s}")
for r in rows:
    print(f"{r['dataset']:8s} {r['variant']:4s} {r['N']:2d} {r['tokenizer'][:28]:28s} {r['policy_tokens']:8.0f} "
          f"{r['query_tokens']:7.0f} {r['ratio']:6.1f} {r['saved_fraction']:6.1%}")

# %% [markdown] id="md-8-save-load-scale-up"
# ## 8. On disk, reproducible, scale up
#
# `pipeline.build_data` saved the three splits with `save_dataset`, atomically (temp dir, then rename, then
# `done.json`); the same config and seed give byte-identical data, so a rerun (or `python -m mpi`) skips it.
# For the paper's sizes use the `paper` data preset (10 policies × 2K train per N, 2K test) or
# `python benchmarks/bench_data.py --paper` to time it.

# %% id="code-20"
from mpi.data import dataset_fingerprint
for split in ("train", "test", "override"):
    path = plan.data_dir(KEY, split)
    print(f"{path}: {len(load_dataset_dir(path))} rows")
from mpi.data import build_split
print("rebuilt with the same config is identical:", dataset_fingerprint(build_split(data_cfg, "clevr", "train")) == dataset_fingerprint(train))

# %% [markdown] id="md-21"
# Next: `02_vm_cpt_qlora.ipynb` trains on these items with the policy in context and image tokens masked.
