import sys; import os; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import make
cells = [
("code", '''from mpi.notebook import notebook_setup
PRESET = "toy"   # "toy" (CPU, seconds), "colab-t4", "paper"; env MPI_PRESET overrides
cfg = notebook_setup(preset=PRESET, seed=0)'''),
("code", '''import json, dataclasses
import matplotlib.pyplot as plt
from mpi.data import (PRESETS, get_data_config, build_clevr_policy, build_gta_policy, build_messages, format_response,
                      chance_report, plot_outcomes, clevr_policies, render_object, score_tool_call, token_report,
                      available_tokenizers, save_dataset, load_dataset_dir)
from mpi.data.build import render_examples
from mpi.data.viz import plot_policy_tree, show_scenes, show_images

# Sizes are parameters: "toy" (CI, seconds), "small" (toy learning runs), "paper" (10 policies x 2K train per N).
data_cfg = get_data_config(cfg.data_preset if cfg.data_preset in PRESETS else "toy", seed=cfg.seed)
print(data_cfg)'''),
("md", '''## 1. Scenes: CLEVR's ontology, rendered here

The paper uses CLEVR's images. We cannot download them, so `mpi.data.scenes` samples scenes with CLEVR's
exact ontology — shape {cube, sphere, cylinder}, 8 colors, size {small, large}, material {rubber, metal},
3–10 objects placed without heavy overlap — and draws them with Pillow: each object is ray-cast as a real
3-D primitive, rubber is matte, metal is a dark mirror with a hot highlight, large is twice the radius of
small. The scene graph uses CLEVR's own JSON schema, so a real `CLEVR_<split>_scenes.json` plus its image
folder can be used instead (`DataConfig(clevr_scenes_json=..., clevr_image_dir=...)`).'''),
("code", '''examples = render_examples(n=8, image_size=112, seed=cfg.seed)   # 112 px for your eyes; the toy model sees 56 px
show_scenes(examples, ncols=4); plt.show()
print(json.dumps(examples[0][0]["objects"][:2], indent=1))'''),
("md", '''## 2. Policies: decision trees with N layers

A policy is a binary tree. Each decision node asks whether the image satisfies one condition ("there is a
cyan object"); a node on its parent's *true* edge never tests the parent's attribute type; leaves are unique
outcomes "Case k". N layers give 2^N outcomes (the generator keeps both answers of every node possible,
so every leaf is reachable). The text follows the paper: a general instruction, a unique pronounceable
name, and numbered sections `# Condition 1`, `# Condition 1.1`, … that the reader must jump between.'''),
("code", '''policies = {n: clevr_policies(n, 1, seed=cfg.seed)[0] for n in (2, 4, 6)}
fig, axes = plt.subplots(3, 1, figsize=(15, 11), gridspec_kw={"height_ratios": [1, 1.6, 2.2]})
for ax, (n, policy) in zip(axes, policies.items()):
    plot_policy_tree(policy, ax=ax)
plt.tight_layout(); plt.show()
print(policies[2].render_text())
text6 = policies[6].render_text()
n_sections = sum(line.startswith("# Condition") for line in text6.splitlines())
print(f"... the N=6 policy has {n_sections} sections and {len(text6):,} characters; its start:")
print("\\n".join(text6.splitlines()[4:14]))'''),
("md", '''## 3. The -M variant: some values shown as image crops

In ClevrPolicy-M some conditions name their value with a picture instead of a word ("an object with the same
color as the object in <image>"). Each `<image>` in the text is replaced, in order, by one of the item's
`policy_images` when the chat messages are built.'''),
("code", '''policy_m = clevr_policies(2, 1, seed=cfg.seed, variant="M")[0]
print(policy_m.render_text().split("Policy:")[1])
specs = policy_m.policy_images()
show_images([render_object(o, 96) for o in specs],
            [f"<image> {k + 1}: shows {n.condition.attr} = {n.condition.value}"
             for k, n in enumerate([n for n in policy_m.decision_nodes() if n.image is not None])], size=2.6); plt.show()'''),
("md", '''## 4. A worked item: query → chain of thought → answer

The gold outcome comes from walking the tree on the scene graph, never from the picture. The forward CoT
cites every condition id on the path and says what it sees; the RL answer format is
`<think>…</think>` then `\\boxed{Case k}`. `build_messages` is the one place prompts are made: *with* the
policy (teacher view, VM-CPT, half of PolicyRollout) or *without* it (what is left at inference).'''),
("code", '''train = build_clevr_policy(data_cfg, split="train")
item = train[0]
show_images(item["images"], [item["id"]], size=3); plt.show()
print("QUERY :", item["query"])
print("PATH  :", item["gold_path"])
print("TARGET:", format_response(item["cot"], item["answer"]))
for with_policy in (True, False):
    messages, images = build_messages(item, with_policy=with_policy)
    text = "".join(p.get("text", "<IMAGE>") for p in messages[0]["content"])
    print(f"\\n--- user turn with_policy={with_policy}: {len(text)} characters, {len(images)} image(s); last 160 chars:")
    print(text[-160:])'''),
("md", '''## 5. Outcome distribution and the chance line

Left to chance, CLEVR scenes make some outcomes rare (e.g. "no small object" among 10 objects), and a model
that always answers a policy's most common case scores its **majority-class accuracy** without looking at
the image. Every later accuracy is read against that line. By default we sample *outcome-balanced* scenes
(rejection sampling: pick a target case, sample a scene under its path constraints, re-check by walking the
tree), so the chance line drops to 1 / #outcomes.'''),
("code", '''unbalanced = build_clevr_policy(dataclasses.replace(data_cfg, balanced=False, n_train_per_policy=60), split="train")
fig, axes = plt.subplots(1, 2, figsize=(12, 3))
plot_outcomes(train["policy_name"], train["answer"], ax=axes[0], title="balanced (default)")
plot_outcomes(unbalanced["policy_name"], unbalanced["answer"], ax=axes[1], title="natural CLEVR mix (balanced=False)")
plt.tight_layout(); plt.show()
for name, ds in (("balanced", train), ("natural", unbalanced)):
    rep = chance_report(ds)
    print(f"{name:9s} majority-class accuracy {rep['majority_accuracy']:.3f} | per policy {rep['per_policy']}")'''),
("md", '''## 6. GTAPolicy: tool calls chosen by a rulebook

The policy is a tool catalogue (tools with versions and typed arguments) and rules that choose a version from
the user profile — the OCR rule is the paper's: credits ≤ 250 → OCR_v5; 250 < credits ≤ 750 → OCR_v4 for
account A/B else OCR_v3; credits > 750 → OCR_v2 if age < 21 else OCR_v1; MathOCR when the image holds math.
An item has a profile, rendered images that fit the tool, a query, the calls so far, and the gold next call.
`score_tool_call` = 0.5·tool + 0.5·arguments (exact / token-F1 / eval-equality / IoU), never raising.'''),
("code", '''gta = build_gta_policy(data_cfg, split="train")
g = next(x for x in gta if json.loads(x["extra"])["history"])
extra = json.loads(g["extra"])
show_images(g["images"], extra["image_paths"], size=3); plt.show()
print("profile:", extra["profile"]); print("history:", extra["history"]); print("query:", g["query"])
print("gold   :", g["answer"]); print("cot    :", g["cot"])
gold = json.loads(g["answer"])
wrong_version = dict(gold, name=gold["name"][:-1] + ("1" if not gold["name"].endswith("1") else "2"))
for pred in (g["answer"], json.dumps(wrong_version), '{"name": "OCR_v1", "arguments": {}}', "not json"):
    print(f"{score_tool_call(pred, g['answer'])}  <- {pred[:70]}")
print("\\n".join(g["policy_text"].splitlines()[-16:-8]))'''),
("md", '''## 7. What internalization saves: policy tokens vs query tokens

The policy is paid for on every request while it sits in the prompt. Counted with the toy tokenizer (and any
real tokenizer already in your Hugging Face cache):'''),
("code", '''rows = token_report(data_cfg, depths=(2, 4, 6))
print(f"{'dataset':8s} {'var':4s} {'N':>2s} {'tokenizer':28s} {'policy':>8s} {'query':>7s} {'ratio':>6s} {'saved':>6s}")
for r in rows:
    print(f"{r['dataset']:8s} {r['variant']:4s} {r['N']:2d} {r['tokenizer'][:28]:28s} {r['policy_tokens']:8.0f} "
          f"{r['query_tokens']:7.0f} {r['ratio']:6.1f} {r['saved_fraction']:6.1%}")'''),
("md", '''## 8. Save, load, scale up

`save_dataset` writes atomically (temp dir, then rename); the same seed gives byte-identical data.
For the paper's sizes use `get_data_config("paper")` (10 policies × 2K train per N, 2K test) or
`python benchmarks/bench_data.py --paper` to time it.'''),
("code", '''import tempfile
from mpi.data import dataset_fingerprint
out = os.path.join(tempfile.mkdtemp(), "clevr_train")
save_dataset(train, out)
again = load_dataset_dir(out)
print(out, len(again), "rows | identical:", dataset_fingerprint(again) == dataset_fingerprint(train))
print("rebuilt with the same seed is identical:", dataset_fingerprint(build_clevr_policy(data_cfg, "train")) == dataset_fingerprint(train))'''),
("md", '''Next: `02_vm_cpt.ipynb` trains on these items with the policy in context and image tokens masked.'''),
]
make("01_data_construction.ipynb", "01 · Building ClevrPolicy and GTAPolicy",
     "How the two MPI datasets are made from nothing: CLEVR-style scenes rendered with Pillow, decision-tree "
     "policies with N layers (and the -M variant with image crops), items with gold outcomes, forward "
     "chain-of-thought and the RL answer format, the outcome distribution and its chance line, the GTAPolicy "
     "tool rulebook with its scorer, and how many prompt tokens a policy costs — the cost internalization removes.",
     cells, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "01_data_construction.ipynb"))
