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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mpi-course/mpi/blob/main/notebooks/05_evaluation.ipynb)
#
# # 05 · Evaluation and the paper's table

# %% [markdown] id="md-what-you-will-learn"
# ## What you will learn
#
# How MPI is evaluated (policy-free accuracy against a chance line, the in-context baseline, policy override, referral without an LLM judge, forgetting, and the token / prefill savings), and how one command, `python -m mpi`, runs data → toy base → every method → this table, resumably.

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

# %% [markdown] id="md-1-one-command-for-the-whole-course"
# ## 1. One command for the whole course
#
# `python -m mpi` runs every stage in order: the datasets, the **toy base** (a toy VLM pretrained once on
# general visual skills and on following *random* in-context policies, cached), each method's training
# chain, and the evaluation. Each stage writes its folder atomically with a `done.json`, so a second run
# skips everything that finished. Here we call the same function from Python.
#
# The methods (rows of the paper's table): the in-context baseline, direct SFT, CoT SFT, VM-CPT + CoT SFT,
# CoT SFT + GRPO / DAPO, and TriMPI (VM-CPT → CoT SFT → PolicyRollout GRPO / DAPO). The default run keeps
# the central comparison (in-context vs CoT SFT vs TriMPI); `python -m mpi --all` runs all eight over 3 seeds.
# This notebook evaluates what notebooks 02–04 trained: the same run folder, so `run` finds their stages
# done and skips them. Opened alone, it trains whatever is missing first (the same functions), and says so.

# %% id="code-05"
from mpi import pipeline
from mpi.notebook import course_plan
from mpi.report import collect, markdown

plan = course_plan(cfg)
key, seed = plan.dataset_keys[0], plan.seeds[0]
for method in plan.methods:
    chain = pipeline.METHODS[method]
    made = pipeline.is_done(plan.stage_dir(key, seed, chain)) if chain else True
    print(f"{method:14s} chain {'+'.join(chain) or '(the base model, policy in context)':40s} "
          f"{'trained' if made else 'MISSING: trained now by pipeline.run'}")
pipeline.run(plan)   # data, toy base, cost, every missing chain, every method's evaluation, then report.md
data = collect(plan.run_dir)
print("stages and wall time (s):", {k: round(v["seconds"], 1) for k, v in data["timings"].items()})

# %% [markdown] id="md-2-the-table"
# ## 2. The table
#
# Policy-free accuracy is the MPI metric: the policy is **not** in the prompt. The in-context row is the
# untrained model *with* the policy in its prompt. The chance line is what a model scores that ignores
# the image and always answers its policy's most common case.

# %% id="code-07"
from IPython.display import Markdown, display
report = markdown(data)
display(Markdown(report.split("## policy-free accuracy")[0]))

# %% id="code-08"
import matplotlib.pyplot as plt
from mpi.report import plot_accuracy
fig = plot_accuracy(data, "accuracy", title="headline accuracy per method (policy-free for trained methods)")
plt.show()

# %% [markdown] id="md-3-override-the-policy-back-in-context-an"
# ## 3. Override, the policy back in context, and referral
#
# *Override*: at test time a **new** policy is given in the prompt under the **same name**; a model that
# only memorized the old policy fails it. *Policy back in context*: the internalized model given its own
# policy again. *Referral*: does the reasoning cite the right policy sections? The paper asks an LLM judge
# for 0–10; for ClevrPolicy the gold path through the tree is known, so we compare the condition ids the
# CoT cites with the gold path: exact, cheap and reproducible.

# %% id="code-10" tags=["mirror"]
import re

def cited_conditions(cot):
    """Condition ids a CoT cites ('# Condition 1.2'), first-mention order, no repeats."""
    seen = []
    for cid in re.findall(r"#?\s*Condition\s+(\d+(?:\.\d+)*)", cot or ""):
        if cid not in seen:
            seen.append(cid)
    return seen

def referral_f1(cot, gold_path):
    """F1 between the cited ids and the gold path; the referral score is 10 x this."""
    cited, gold = cited_conditions(cot), list(gold_path)
    hit = len(set(cited) & set(gold))
    precision = hit / len(cited) if cited else 0.0
    recall = hit / len(gold)
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


# %% id="code-11"
from mpi.data import load_dataset_dir
key = plan.dataset_keys[0]
test = load_dataset_dir(plan.data_dir(key, "test"))
item = test[0]
print(item["cot"])
print("gold path:", item["gold_path"], "| cited:", cited_conditions(item["cot"]), "| F1:", referral_f1(item["cot"], item["gold_path"]))
skipped = item["cot"].replace("# Condition 1.1", "# Condition 1.9").replace("# Condition 1.2", "# Condition 1.9")
print("a CoT that jumps to the wrong section scores", round(10 * referral_f1(skipped, item["gold_path"]), 1), "/ 10")

# %% id="code-12"
for metric in ("with_policy", "override"):
    plot_accuracy(data, metric); plt.show()
display(Markdown("### referral (0-10)" + report.split("## referral (0-10)")[1].split("##")[0]))

# %% [markdown] id="md-4-forgetting"
# ## 4. Forgetting
#
# The toy base was trained on general visual questions ("Is there a red object?", "How many cubes?", a
# list of the colors and shapes in view). Its accuracy on held-out questions is the forgetting baseline;
# each method is measured on the same questions after training (the paper uses MMMU-Pro and MMLU-Pro).

# %% id="code-14"
plot_accuracy(data, "forgetting", title="general-skill accuracy after each method"); plt.show()
if data["toy_base"]:
    tb = data["toy_base"]
    print(f"toy base: {100 * tb['general_skill']['accuracy']:.1f}% (random init {100 * tb['general_skill_random_init']['accuracy']:.1f}%)",
          {k: round(100 * v) for k, v in tb["general_skill"]["per_task"].items()})

# %% [markdown] id="md-5-what-internalizing-the-policy-saves"
# ## 5. What internalizing the policy saves
#
# Tokens are counted on the prompts the model really reads (image tokens included); prefill is one
# forward over the prompt, timed on the model in use (fastest of a few runs), with CUDA's peak memory where
# there is a GPU. The toy's policies are short; at the paper's N=6 and for GTAPolicy's 24 rules the
# policy dominates the prompt (see `benchmarks/bench_prefill.py` for N = 2, 4, 6).

# %% id="code-16"
from mpi.evaluate import prompt_token_counts
from mpi.modeling import load_processor
from mpi.pipeline import base_model_path
from mpi.report import plot_cost
plot_cost(data); plt.show()
print("one item:", prompt_token_counts(load_processor(base_model_path(plan)), item))

# %% [markdown] id="md-6-a-few-responses"
# ## 6. A few responses
#
# The first test items of the best method in this run, policy-free, with their images.

# %% id="code-18"
import json
summary = data["summary"][key]
best = max(summary, key=lambda m: summary[m]["accuracy"]["mean"])
examples = json.loads((plan.eval_dir(key, cfg.seed, best) / "examples.json").read_text())[:3]
by_id = {test[i]["id"]: test[i] for i in range(len(test))}
fig, axes = plt.subplots(1, len(examples), figsize=(4 * len(examples), 3.4))
for ax, ex in zip(axes if len(examples) > 1 else [axes], examples):
    it = by_id[ex["id"]]
    ax.imshow(it["images"][0]); ax.axis("off")
    ax.set_title(f"gold {it['answer']}", fontsize=9)
plt.show()
for ex in examples:
    print(f"--- {best} | {ex['id']} | gold {by_id[ex['id']]['answer']}\n{ex['text'][:400]}")

# %% [markdown] id="md-19"
# That is the course: the same code runs the `colab-t4` preset on Qwen2.5-VL-3B in 4-bit
# (`python -m mpi --preset colab-t4`) and the paper's setting (`--preset paper`).
