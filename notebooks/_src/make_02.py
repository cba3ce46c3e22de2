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
("md", '''## 1. The idea: read the policy, never learn to predict pixels

Stage 1 of TriMPI trains on sequences that *contain* the policy:

x = (policy text P_T, policy images P_I, input image I, query Q, chain of thought, answer)

with the ordinary next-token loss on **every token except the visual ones**:

L = −(1/Σ m_t) Σ_t m_t log p(x_t | x_<t),   m_t = 1[x_t is not a visual token].

So the model is asked to *reproduce the policy text* (that is how the rules get into the weights) and
the reasoning that applies it, while image tokens (of the input image *and* of the policy's image
crops) stay pure inputs. We also mask the `<|vision_start|>`/`<|vision_end|>` markers around each image:
they belong to the image's span the processor writes, and "an image starts here" is layout, not policy
knowledge (`mask_vision_markers=False` trains on them).

The paper trains all weights for 5 epochs at lr 1e-5. We use **QLoRA** by default (LoRA adapters on a
4-bit base where bitsandbytes can; the toy runs in fp32 on a CPU), with `lora_r=None` for the paper's
full-parameter variant. Every knob is a field of `SupervisedConfig`.'''),
("code", '''from pathlib import Path
from mpi.supervised import SupervisedConfig

DATASET = "clevr"   # "clevr" or "gta" (GTAPolicy: tool-calling rules, several images per item)
VARIANT = "T"       # ClevrPolicy "T" (text policy) or "M" (some values shown as image crops in the policy)
MAX_STEPS = {"tiny": 4, "toy": 60}.get(cfg.preset, -1)   # -1: cfg.cpt_epochs epochs; capped so a CPU run takes minutes
sup = SupervisedConfig.from_run_config(
    cfg, "cpt", max_steps=MAX_STEPS,
    batch_size=cfg.batch_size,              # reduce if out of memory (and raise grad_accum_steps to compensate)
    grad_accum_steps=cfg.grad_accum_steps,
    # reduce if out of memory, but it must fit the longest policy + CoT (check_config names the item);
    # GTAPolicy's tool descriptions and 24 rules make ~2K-token policies
    max_length=cfg.max_length if DATASET == "clevr" else max(cfg.max_length, 3072),
    gradient_checkpointing=cfg.preset in ("colab-t4", "paper"),  # True if out of memory: slower, much less memory
    save_steps=20,                          # a checkpoint every 20 steps: a Colab disconnect loses at most that
    lr_scheduler="cosine", warmup_ratio=0.05, max_grad_norm=1.0,
    lora_embeddings=RANDOM_INIT_TOY,        # True: LoRA on embed_tokens / lm_head too (continual-pretraining recipe)
    embedding_learning_rate=None,           # ... with its own smaller rate, e.g. cfg.cpt_learning_rate / 10
)
OUT = Path(cfg.out_dir) / cfg.preset / "vm_cpt"   # on Colab, point this at Drive to survive a disconnect
print(f"mode {sup.mode} | epochs {sup.epochs} (max steps {sup.max_steps}) | lr {sup.learning_rate} | batch {sup.batch_size} x {sup.grad_accum_steps} "
      f"| LoRA r={sup.lora_r} | quantization {sup.quantization} | out {OUT}")'''),
("md", '''## 2. Data: the policy is part of every training sequence

The same `mpi.data` builders as notebook 01. VM-CPT uses the CoT examples, with the policy in context.'''),
("code", '''import dataclasses
from mpi.data import PRESETS, get_data_config, build_clevr_policy, build_gta_policy

data_cfg = get_data_config(cfg.data_preset if cfg.data_preset in PRESETS else "toy", image_size=cfg.image_size,
                           depths=cfg.depths, variant=VARIANT, seed=cfg.seed)
build = (lambda split: build_gta_policy(data_cfg, split)) if DATASET == "gta" else (lambda split: build_clevr_policy(data_cfg, split))
train, test = build("train"), build("test")
print(f"{DATASET}: {len(train)} train / {len(test)} test items")
# one item of each kind, to see the mask on policy images and on several input images
small = dataclasses.replace(data_cfg, n_policies=1, n_train_per_policy=2, n_gta_train=2)
examples = {"ClevrPolicy-T": build_clevr_policy(small, "train", variant="T")[0],
            "ClevrPolicy-M": build_clevr_policy(small, "train", variant="M")[0],
            "GTAPolicy": max(build_gta_policy(dataclasses.replace(small, n_gta_train=8), "train"), key=lambda r: len(r["images"]))}'''),
("code", '''from mpi.modeling import count_parameters
from mpi.supervised import load_for_stage

model, processor = load_for_stage(cfg, sup)   # the base model + a fresh LoRA (4-bit base under QLoRA)
trainable, total = count_parameters(model)
print(f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")'''),
("md", '''## 3. One collated example, with the loss mask drawn over its tokens

Green tokens carry loss; grey, struck-through ones do not. `<|image_pad|>×k` is one image's k image
tokens (drawn as one span). The counts are checked against the number of image tokens the processor
inserted in `mpi/tests/test_collate.py`.'''),
("code", '''from IPython.display import HTML, display
from mpi.collate import SupervisedCollator, describe_labels, mask_summary, render_loss_mask

collate = SupervisedCollator(processor, "cpt", mask_vision_markers=sup.mask_vision_markers)  # no max_length: display only
for name, item in examples.items():
    batch = collate([item])
    s = mask_summary(processor, batch)
    print(f"{name}: {s['tokens']} tokens, {s['supervised']} carry loss; masked: {s['image_pad']} image-pad tokens of "
          f"{s['images']} images (+ their markers), visual tokens with loss: {s['supervised_visual']}")
batch = collate([examples["ClevrPolicy-M" if DATASET == "clevr" else "GTAPolicy"]])
display(HTML(render_loss_mask(describe_labels(processor, batch), collapse_images=True)))'''),
("md", '''## 4. Before training: the same test image, with and without the policy'''),
("code", '''from mpi.evaluate import generate_texts

probe = [test[0]]
NEW_TOKENS = 32 if cfg.preset == "tiny" else 160   # reduce if slow; a CoT needs room to reach its boxed answer
def show_generations(title):
    for with_policy in (True, False):
        text = generate_texts(model, processor, probe, with_policy=with_policy, max_new_tokens=NEW_TOKENS)[0]
        print(f"[{title} | policy {'in context' if with_policy else 'absent'}] {text[:300]!r}")
display(probe[0]["images"][0].resize((128, 128)))
print("gold:", probe[0]["answer"])
show_generations("before")'''),
("md", '''## 5. Train

`train_supervised` is transformers' `Trainer` with our collator and a loss that evaluates the output
layer only where a label is supervised. It logs one line per step to `metrics.csv`/`metrics.jsonl`,
checkpoints every `save_steps` and resumes from the newest *complete* checkpoint when called again on
the same `OUT` (after a Colab disconnect, just re-run the notebook). A finished run is detected
(`result.json`) and not trained again.'''),
("code", '''from mpi.supervised import train_supervised

result = train_supervised(model, processor, train, sup, OUT)
model = result.pop("model")
print({k: result[k] for k in ("steps", "final_loss", "mean_loss", "tokens_per_s", "adapter", "skipped")})'''),
("code", '''from mpi.metrics import plot_metrics
fig = plot_metrics(OUT, keys=["loss", "learning_rate", "tokens_per_s"], smooth=5, title="VM-CPT")'''),
("md", '''## 6. After training: the same image

The model has read the policy many times; with the policy in context it should now copy its structure
and reasoning format. Without the policy it has started to recall it — how well is stage 2's (SFT) and
stage 3's (PolicyRollout) job.'''),
("code", '''show_generations("after VM-CPT")'''),
("md", '''## 7. Interrupt-safe by construction, and the config check

Calling `train_supervised` again on the same directory does not retrain: it finds `result.json`,
checks that the config and data are the same, and loads the saved adapter (standard peft format:
`PeftModel.from_pretrained(base, OUT / "adapter")`). Had the run been cut off, the same call would
resume from the newest complete checkpoint with the optimizer, schedule and RNG states restored —
`mpi/tests/test_supervised.py` checks the weights are identical to an uninterrupted run.

Before any training, `check_config` names problems instead of failing an hour in:'''),
("code", '''from mpi.supervised import ConfigError, check_config

again = train_supervised(model, processor, train, sup, OUT)
print("second call skipped:", again["skipped"], "| adapter files:", sorted(p.name for p in Path(again["adapter"]).iterdir()))
for bad in [dataclasses.replace(sup, max_length=64), dataclasses.replace(sup, quantization="4bit")]:
    try:
        check_config(bad, processor=processor, dataset=[train[0]], device_type="mps")  # pretend: an Apple GPU
    except ConfigError as err:
        print(err)'''),
("md", '''## 8. Variants

- **Full-parameter VM-CPT** (as in the paper): `SupervisedConfig.from_run_config(cfg, "cpt", lora_r=None)`; the
  result is a model directory (`result["model_dir"]`) that `run_sft(..., init_adapter=...)` accepts too.
- **Embeddings too**: `lora_embeddings=True, embedding_learning_rate=cfg.cpt_learning_rate / 10`.
- **One call**: `model, processor, result = run_vm_cpt(cfg, train)` loads, trains and saves.

Next: `03_sft.ipynb` continues this adapter with SFT *without* the policy.'''),
]

make("02_vm_cpt_qlora.ipynb", "02 · Stage 1: visually-masked continual pretraining (QLoRA)",
     "How TriMPI's first stage puts a policy into the weights: build sequences with the policy text and "
     "policy images in context, put the next-token loss on every token except the visual ones (you will see "
     "the mask drawn over a real example, for a text policy, a policy with image crops and a multi-image tool "
     "item), train a (Q)LoRA adapter with a resumable Trainer loop, read its loss curve, and compare the "
     "model's answers for the same image before and after.",
     cells, os.path.join(ROOT, "notebooks", "02_vm_cpt_qlora.ipynb"))
