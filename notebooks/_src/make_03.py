import sys; import os; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import make

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

cells = [
("code", '''from mpi.notebook import notebook_setup
PRESET = "toy"   # "tiny" (CI, seconds), "toy" (toy-small on a CPU, minutes), "colab-t4" (Qwen2.5-VL-3B, 4-bit), "paper"; env MPI_PRESET overrides
cfg = notebook_setup(preset=PRESET, seed=0)'''),
("md", '''The paper starts from an instruction-tuned VLM that can already see colours and shapes. A random-init
toy cannot, so `mpi.toy_base` pretrains one once (general visual skills + following *other* policies in
context; the pipeline builds it, tens of minutes for toy-small). We start from it when it is in the
cache, and from the random-init toy otherwise (then expect the loss to fall but answers to stay at chance).'''),
("code", '''from mpi.toy_base import starting_model
# A random-init toy's output layer is frozen random weights: with LoRA on the attention/MLP only, the loss
# floors near 4 and answers stay at chance. On it we also adapt embed_tokens / lm_head (lora_embeddings).
cfg, RANDOM_INIT_TOY = starting_model(cfg)
print("starting model:", cfg.model, "| random-init toy:", RANDOM_INIT_TOY)'''),
("md", '''## 1. The idea: train without the policy

At inference the policy is gone, so stage 2 trains on exactly that situation:

- **input** (query Q, image I) — *no policy*;
- **target** the chain of thought and the answer, `<think>…</think>\\n\\boxed{Case k}` (**CoT SFT**), or the
  answer alone, `\\boxed{Case k}` (**direct SFT**, a baseline);
- loss on the target tokens only (and the closing `<|im_end|>`, so the model learns to stop).

The CoT cites the policy's sections ("# Condition 1.2: is there a cube? …"), so writing it without the
policy in view is recalling the policy. TriMPI starts this stage from the VM-CPT adapter of notebook 02;
the baselines start from the base model. `run_sft` names both, so every stage-2 row of the paper's
ablation is one call:

| row | starts from | target |
|---|---|---|
| `direct_sft` | base | answer |
| `cot_sft` | base | CoT + answer |
| `vm_cpt+cot_sft` (TriMPI stage 2) | VM-CPT adapter | CoT + answer |
| `vm_cpt+direct_sft` | VM-CPT adapter | answer |'''),
("code", '''from pathlib import Path

DATASET = "clevr"   # "clevr" or "gta"
VARIANT = "T"       # ClevrPolicy "T" or "M"
ROWS = ["cot_sft", "vm_cpt+cot_sft"]   # add "direct_sft", "vm_cpt+direct_sft" for the whole ablation
SFT = dict(
    max_steps={"tiny": 4, "toy": 120}.get(cfg.preset, -1),   # -1: cfg.sft_epochs epochs; capped so a CPU run takes minutes
    batch_size=cfg.batch_size,              # reduce if out of memory (and raise grad_accum_steps to compensate)
    grad_accum_steps=cfg.grad_accum_steps,
    max_length=cfg.max_length,              # reduce if out of memory
    # 0 = the paper's policy-free SFT. The toy preset keeps the policy in the prompt of half the batches: a
    # small model otherwise forgets how to read it, and stage 3's guided half needs that skill (README).
    policy_in_context_frac=cfg.sft_policy_in_context_frac,
    gradient_checkpointing=cfg.preset in ("colab-t4", "paper"),  # True if out of memory
    save_steps=20,                          # checkpoint every 20 steps (resume after a disconnect)
    lora_embeddings=RANDOM_INIT_TOY,        # see the toy-base cell
)
EVAL = dict(batch_size=16 if cfg.preset in ("tiny", "toy") else 4,   # reduce if out of memory
            max_new_tokens=32 if cfg.preset == "tiny" else 192,   # CoT + answer must fit; reduce to save time
            limit=8 if cfg.preset == "tiny" else None)            # CI only checks the code path
RUNS = Path(cfg.out_dir) / cfg.preset
print("rows:", ROWS, "| lr", cfg.sft_learning_rate, "| epochs", cfg.sft_epochs, "| LoRA r", cfg.lora_r, "| runs in", RUNS)'''),
("code", '''from mpi.data import PRESETS, get_data_config, build_clevr_policy, build_gta_policy

data_cfg = get_data_config(cfg.data_preset if cfg.data_preset in PRESETS else "toy", image_size=cfg.image_size,
                           depths=cfg.depths, variant=VARIANT, seed=cfg.seed)
build = (lambda split: build_gta_policy(data_cfg, split)) if DATASET == "gta" else (lambda split: build_clevr_policy(data_cfg, split))
train, test = build("train"), build("test")   # the test split is held out: its scenes are never trained on
print(f"{DATASET}: {len(train)} train / {len(test)} held-out test items")'''),
("md", '''## 2. What carries loss: the target, and nothing of the policy'''),
("code", '''from IPython.display import HTML, display
from mpi.collate import SupervisedCollator, describe_labels, mask_summary, render_loss_mask
from mpi.modeling import load_model_and_processor, load_processor, resolve_model_path

processor = load_processor(resolve_model_path(cfg.model, seed=cfg.seed))
item = train[0]
for mode in ("sft_cot", "sft_direct", "cpt"):
    batch = SupervisedCollator(processor, mode)([item])
    text = processor.tokenizer.decode(batch["input_ids"][0])
    s = mask_summary(processor, batch)
    print(f"{mode:10s}: {s['tokens']:4d} tokens, {s['supervised']:4d} carry loss | policy text in the sequence: "
          f"{item['policy_text'][-60:] in text}")
for mode in ("sft_cot", "sft_direct"):
    batch = SupervisedCollator(processor, mode)([item])
    display(HTML(f"<b>{mode}</b>" + render_loss_mask(describe_labels(processor, batch), collapse_images=True)))'''),
("md", '''## 3. The VM-CPT adapter from notebook 02

If notebook 02 has run on this preset its adapter is reused; otherwise stage 1 runs here (same code).'''),
("code", '''from mpi.supervised import finished_result, run_vm_cpt

cpt = finished_result(RUNS / "vm_cpt")
same_base = cpt is not None and cpt["config"]["base_model"] == Path(resolve_model_path(cfg.model, seed=cfg.seed)).name
if not same_base:   # none yet, or trained from another starting model: (re)train stage 1
    _, _, cpt = run_vm_cpt(cfg, train, RUNS / "vm_cpt", resume=cpt is None, save_steps=20, lora_embeddings=RANDOM_INIT_TOY, max_steps={"tiny": 4, "toy": 60}.get(cfg.preset, -1))
print("VM-CPT:", cpt["steps"], "steps, final loss", round(cpt["final_loss"], 3), "->", cpt["adapter"] or cpt["model_dir"])'''),
("md", '''## 4. Before: the base model on one held-out image, without the policy'''),
("code", '''from mpi.evaluate import generate_texts

probe = [test[0]]
base, _ = load_model_and_processor(cfg.model, quantization=cfg.quantization, seed=cfg.seed, trainable=False)
display(probe[0]["images"][0].resize((128, 128)))
print("gold:", probe[0]["answer"])
print("[base, no policy]", repr(generate_texts(base, processor, probe, max_new_tokens=EVAL["max_new_tokens"])[0][:300]))
del base'''),
("md", '''## 5. Train each row

`run_sft(cfg, train, init_adapter=..., direct=...)` loads the starting point, trains with
`train_supervised` (resumable; a finished row is not retrained) and saves `RUNS/<row>/adapter`.'''),
("code", '''from mpi.supervised import SFT_ROWS, run_sft

models, results = {}, {}
for row in ROWS:
    from_cpt, mode = SFT_ROWS[row]
    init = (cpt["adapter"] or cpt["model_dir"]) if from_cpt else None
    model, processor, result = run_sft(cfg, train, RUNS / row, init_adapter=init, direct=mode == "sft_direct", **SFT)
    models[row], results[row] = model, result
    print(f"{row}: {result['steps']} steps, final loss {result['final_loss']:.3f}, {result['tokens_per_s']:.0f} tokens/s"
          f"{' (finished earlier: loaded)' if result['skipped'] else ''}")'''),
("code", '''import matplotlib.pyplot as plt
from mpi.metrics import read_metrics

fig, ax = plt.subplots(figsize=(6, 3.5))
for row in ROWS:
    rows = read_metrics(results[row]["out_dir"])
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=row)
ax.set_xlabel("step"); ax.set_ylabel("training loss (target tokens)"); ax.set_title("SFT without the policy"); ax.legend(); ax.grid(alpha=0.3)'''),
("md", '''## 6. After: the same image, no policy in context'''),
("code", '''for row, model in models.items():
    print(f"[{row}]", repr(generate_texts(model, processor, probe, max_new_tokens=EVAL["max_new_tokens"])[0][:300]))'''),
("md", '''## 7. Policy-free accuracy on the held-out split

The MPI metric: greedy answers *without* the policy, exact match on `\\boxed{}` (ClevrPolicy) or the
tool-call score (GTAPolicy), by `mpi.evaluate.evaluate_accuracy` (notebook 05 adds the override test,
the in-context baseline and the token cost). "chance" is the majority-class answer of the split.'''),
("code", '''from mpi.evaluate import evaluate_accuracy

table = {}
for row, model in models.items():
    scores = evaluate_accuracy(model, processor, test, with_policy=False, **EVAL)
    table[row] = scores
    print(f"{row:18s} policy-free accuracy {scores['accuracy']:.3f} on {scores['n']} items "
          f"(chance {scores['chance']['accuracy']:.3f}, answers parsed {scores['parsed_rate']:.2f})")'''),
("md", '''On the toy preset the ordering is noisy: these are a few-million-parameter models trained for
minutes. What the paper reports (Qwen2.5-VL-7B, N=6) is that VM-CPT before CoT SFT helps (ClevrPolicy-M
14.30 → 27.05) and that most of the gain comes from RL — notebook 04.'''),
]

make("03_sft.ipynb", "03 · Stage 2: CoT and direct SFT without the policy",
     "How TriMPI's second stage trains the model to answer *without* the policy in context: the SFT loss "
     "mask (target tokens only, policy absent), continuing from the VM-CPT adapter versus starting from the "
     "base model (the paper's ablation rows), CoT versus direct targets, loss curves, before/after answers on "
     "the same held-out image, and the policy-free accuracy that is the MPI metric.",
     cells, os.path.join(ROOT, "notebooks", "03_sft.ipynb"))
