"""The toy base: a toy VLM pretrained offline on general visual skills and on in-context policies.

The paper starts from an instruction-tuned VLM that already sees colors and shapes and can follow a
policy given in its prompt. A random-init toy has neither, so before any MPI method runs, the toy is
pretrained here on

1. general visual skills over rendered CLEVR-style scenes: "Is there a red object?" (yes/no),
   "How many cubes are there?" and a short description listing the colors, shapes, sizes and
   materials in view (one dense target that supervises every attribute at once);
2. following *randomly generated* policies given in context (policy in the prompt, forward CoT or a
   direct answer as the target), drawn from their own random stream, never the evaluation policies.

Perception is what a random toy lacks, and it is slow to learn: a small object is ~13 px, about one of
the 16 image tokens at 112 px, and a fresh transformer must first learn *where* to look. Measured here
(`benchmarks/bench_toy_perception.py`; 600-step runs that ramped from 1 to 10 objects at learning rates
5e-4 and 1e-3 stayed at chance on existence questions), so the recipe is:

1. `perception_steps` of single-object scenes described in full (every attribute supervised at once),
   at a moderate learning rate (1e-3; after 200 steps at 2e-3 a linear probe on the last hidden state
   read a single object's color 19% of the time, against 70% at random init), seen first in close-up:
   the image is cropped around the object and enlarged `perception_zoom` times, and the zoom shrinks
   linearly to the full scene over `perception_zoom_steps` (the *zoom curriculum*). A big object is
   easy to find; once the model reads it, it keeps reading it as it shrinks. Measured with
   `benchmarks/bench_toy_perception.py --fresh`: on fresh single-object scenes, "What color is the
   object?" read 31.2% held-out after 200 steps without the zoom (chance 12.5%), 97.9% with 3x -> 1x;
2. then a ramp from 1 to `max_objects` objects over `curriculum_steps`, with existence and count
   questions and the random in-context policies mixed in;
3. optionally (`condition_steps`, 0 in the shipped recipe) a *condition phase*: fresh scenes, mostly
   existence questions (the policies' conditions), a fresh AdamW at `condition_lr`. The shipped base answers
   "no" to every existence question; measured with `benchmarks/bench_toy_condition_phase.py`, up to 3,000
   such steps on top of it taught it color and size, not shape or material (see the benchmark).

    path = build_toy_base(ToyBaseConfig(model="toy-small", seed=0))   # cached, deterministic per seed
    model, processor = load_model_and_processor(str(path), quantization=None, lora=...)
    general_skill_accuracy(model, processor, eval_items)   # the forgetting baseline

The checkpoint is a normal model directory (plus `toy_base.json` with the config and the held-out
general-skill accuracy), written atomically under `mpi.toy.cache_root()/toy_base/<model>-s<seed>-<key>`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from mpi.atomic import atomic_directory

# bump when the recipe changes so old caches are not reused. 4: the zoom curriculum (perception_zoom).
# 3: the random policies' scenes are natural scenes conditioned on the outcome (mpi.data.clevr.natural_scene_for),
# like the splits; v2 used the witness search, whose 1-4-object scenes held a single object 90% of the time.
TOY_BASE_VERSION = 4
# The toy base trained by this recipe, shipped so that every machine starts from the same weights in seconds
# (training it takes 20-40 minutes on 2 CPU cores). `python -m mpi toy-base --rebuild` trains it again.
SHIPPED_ROOT = Path(__file__).resolve().parent / "assets" / "toy_base"
SKILL_TASKS = ("describe", "exists", "count", "policy")


@dataclass
class ToyBaseConfig:
    """Every knob of the toy base. Sizes in steps (not seconds) so that a seed gives one checkpoint."""

    model: str = "toy-small"
    seed: int = 0
    steps: int = 1300
    batch_size: int = 32
    learning_rate: float = 1e-3  # 2e-3 collapsed the vision features (linear probe 70% -> 19% on color)
    vision_lr_mult: float = 1.0
    min_lr_ratio: float = 0.3  # cosine decays to this fraction of the peak
    warmup_steps: int = 30
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    # sampling weights of the four tasks
    task_weights: dict[str, float] = field(default_factory=lambda: {"describe": 2.0, "exists": 1.0, "count": 0.25,
                                                                      "policy": 1.0})
    policy_depths: tuple[int, ...] = (1, 2)  # depths of the random in-context policies
    policy_cot_fraction: float = 0.5  # share of policy targets with the forward CoT (else a direct answer)
    # The optional condition phase, after `steps` (0: none, the shipped recipe): the policies' conditions are
    # existence questions over four attributes, and the main phase ends answering every one "no". A fresh AdamW,
    # mostly existence questions; the default mix is the one measured longest (benchmarks/bench_toy_condition_phase.py).
    condition_steps: int = 0
    condition_lr: float = 3e-4
    condition_task_weights: dict[str, float] = field(default_factory=lambda: {"describe": 0.5, "exists": 6.0,
                                                                                "count": 0.25, "policy": 1.0})
    perception_steps: int = 500  # first, single-object scenes and the describe task only
    perception_zoom: float = 3.0  # ... seen first enlarged this many times around the object (1 = no zoom)
    perception_zoom_steps: int = 300  # ... shrinking linearly to the full scene (zoom 1) by this step
    curriculum_steps: int = 300  # then objects per scene ramp from `min_objects` to `max_objects`
    min_objects: int = 1
    max_objects: int = 4  # = the toy data's DataConfig.n_objects max ("small" preset; a test keeps them equal)
    pool_size: int = 41600  # pre-rendered training examples (re-drawn in order once exhausted)
    n_eval: int = 96  # held-out general-skill questions (the forgetting baseline)
    max_new_tokens: int = 32
    log_every: int = 50
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "ToyBaseConfig":
        from mpi.toy import TOY_SPECS

        if self.model not in TOY_SPECS:
            raise ValueError(f"ToyBaseConfig.model must be a toy model ({sorted(TOY_SPECS)}), got {self.model!r}; "
                             "a hub model is already a base and needs no toy base")
        for name in ("task_weights", "condition_task_weights"):
            unknown = sorted(set(getattr(self, name)) - set(SKILL_TASKS))
            if unknown:
                raise ValueError(f"ToyBaseConfig.{name}: unknown task(s) {unknown}; tasks are {SKILL_TASKS}")
        if self.condition_steps < 0 or self.condition_lr <= 0:
            raise ValueError("ToyBaseConfig.condition_steps must be >= 0 and condition_lr > 0")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("ToyBaseConfig.steps and batch_size must be >= 1")
        if self.pool_size % self.batch_size:
            raise ValueError(f"ToyBaseConfig.pool_size ({self.pool_size}) must be a multiple of batch_size "
                             f"({self.batch_size}) so that every batch holds one kind of example")
        if not 1 <= self.min_objects <= self.max_objects <= 10:
            raise ValueError(f"ToyBaseConfig: need 1 <= min_objects <= max_objects <= 10, got "
                             f"{self.min_objects}..{self.max_objects}")
        if self.perception_zoom < 1:
            raise ValueError(f"ToyBaseConfig.perception_zoom must be >= 1 (1 = the full scene), got {self.perception_zoom}")
        if self.perception_zoom_steps > self.perception_steps:
            raise ValueError(f"ToyBaseConfig.perception_zoom_steps ({self.perception_zoom_steps}) must be <= "
                             f"perception_steps ({self.perception_steps}): the zoom is for single-object scenes")
        if not 0 <= self.policy_cot_fraction <= 1:
            raise ValueError("ToyBaseConfig.policy_cot_fraction must be in [0, 1]")
        return self


TOY_BASE_PRESETS: dict[str, dict[str, Any]] = {
    # CI: seconds. Proves the code path; learns close to nothing.
    "tiny": dict(model="toy-tiny", steps=12, batch_size=4, pool_size=48, n_eval=12, perception_steps=4,
                 perception_zoom_steps=2, curriculum_steps=4, warmup_steps=2, max_new_tokens=16, log_every=4),
    # The laptop toy: tens of minutes once, cached.
    "toy": dict(model="toy-small"),
}


def toy_base_config(preset: str = "toy", **overrides: Any) -> ToyBaseConfig:
    if preset not in TOY_BASE_PRESETS:
        raise ValueError(f"unknown toy-base preset {preset!r}; choose one of {sorted(TOY_BASE_PRESETS)}")
    from mpi.config import check_known_fields

    check_known_fields(ToyBaseConfig, overrides)
    return ToyBaseConfig(**{**TOY_BASE_PRESETS[preset], **overrides}).validate()


# =========================================================================== examples


def _rng(*parts: Any) -> random.Random:
    return random.Random("/".join(str(p) for p in ("toy_base",) + parts))


def _image_size(model: str) -> int:
    from mpi.toy import TOY_SPECS

    return TOY_SPECS[model].image_size


def _present(objects: Sequence[dict[str, Any]], attr: str) -> list[str]:
    from mpi.data.scenes import ATTRIBUTES

    seen = {o[attr] for o in objects}
    return [v for v in ATTRIBUTES[attr] if v in seen]  # fixed ontology order: a deterministic target


def describe_target(objects: Sequence[dict[str, Any]]) -> str:
    """'colors: red, blue. shapes: cube. sizes: large. materials: metal, rubber.' (ontology order)."""
    parts = [f"{name}: {', '.join(_present(objects, attr))}." for attr, name in
             (("color", "colors"), ("shape", "shapes"), ("size", "sizes"), ("material", "materials"))]
    return " ".join(parts)


DESCRIBE_QUESTION = "List the colors, shapes, sizes and materials of the objects in the image."


def _noun(attr: str, value: str) -> str:
    return f"{value}" if attr == "shape" else f"{value} object"


def _plural_noun(attr: str, value: str) -> str:
    return {"cube": "cubes", "sphere": "spheres", "cylinder": "cylinders"}[value] if attr == "shape" else f"{value} objects"


def skill_example(rng: random.Random, task: str, image_size: int, max_objects: int, min_objects: int = 1,
                  index: int = 0, attribute: str | None = None) -> dict[str, Any]:
    """One general-skill example: {"task", "question", "answer", "scene"} (scene not yet rendered).
    `attribute` fixes what an exists/count question asks about (default: drawn; fixing it skips that draw)."""
    from mpi.data.scenes import ATTRIBUTES, sample_object, sample_scene

    lo = max(1, min(min_objects, max_objects))
    if task == "describe":
        scene = sample_scene(rng, image_size, n_objects=(lo, max_objects), index=index, split="toybase")
        return {"task": task, "question": DESCRIBE_QUESTION, "answer": describe_target(scene["objects"]), "scene": scene}
    if attribute is not None and attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; attributes are {sorted(ATTRIBUTES)}")
    attr = attribute or rng.choice(list(ATTRIBUTES))
    value = rng.choice(ATTRIBUTES[attr])
    if task == "exists":
        want = rng.random() < 0.5  # balanced yes/no: a model that ignores the image scores 50%
        n = rng.randint(lo, max_objects)
        objects = []
        for k in range(n):
            if want and k == 0:
                objects.append(sample_object(rng, **{attr: value}))
            else:
                others = [v for v in ATTRIBUTES[attr] if v != value] if not want else list(ATTRIBUTES[attr])
                objects.append(sample_object(rng, **{attr: rng.choice(others)}))
        rng.shuffle(objects)
        scene = sample_scene(rng, image_size, objects=objects, index=index, split="toybase")
        return {"task": task, "question": f"Is there a {_noun(attr, value)} in the image? Answer yes or no.",
                "answer": "yes" if want else "no", "scene": scene}
    if task == "count":
        scene = sample_scene(rng, image_size, n_objects=(lo, max_objects), index=index, split="toybase")
        count = sum(o[attr] == value for o in scene["objects"])
        return {"task": task, "question": f"How many {_plural_noun(attr, value)} are there? Answer with a number.",
                "answer": str(count), "scene": scene}
    raise ValueError(f"unknown skill task {task!r}; tasks are {SKILL_TASKS}")


def policy_example(rng: random.Random, depth: int, image_size: int, index: int = 0, cot: bool = True,
                   n_objects: tuple[int, int] = (3, 10)) -> dict[str, Any]:
    """A random policy (never an evaluation one: its own random stream) with a balanced scene, as an mpi.data item."""
    from mpi.data.clevr import QUERY, forward_cot, natural_scene_for
    from mpi.data.policies import generate_policy, policy_name

    policy = generate_policy(rng, depth, policy_name(rng, depth))
    target = rng.choice(policy.outcomes())
    scene = natural_scene_for(rng, policy, target, image_size, index=index, n_objects=n_objects)
    outcome, path, _ = policy.evaluate(scene)
    return {"task": "policy", "id": f"toybase-{index}", "dataset": "clevr", "variant": "T", "depth": depth,
            "policy_name": policy.name, "policy_text": policy.render_text(), "policy_images": [],
            "query": QUERY.format(name=policy.name), "cot": forward_cot(policy, scene) if cot else "",
            "answer": outcome, "gold_path": path, "override": False, "extra": "{}", "scene": scene}


def render(example: dict[str, Any], image_size: int) -> dict[str, Any]:
    from mpi.data.scenes import scene_image

    out = dict(example)
    out["images"] = [scene_image(example["scene"], image_size)]
    return out


def example_messages(example: dict[str, Any], with_answer: bool = True):
    """Chat messages and images for one rendered example (policy examples go through mpi.data's builder)."""
    if example["task"] == "policy":
        from mpi.data.messages import build_messages, format_response

        response = format_response(example["cot"] or None, example["answer"]) if with_answer else None
        return build_messages(example, with_policy=True, response=response)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example["question"]}]}]
    if with_answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": example["answer"]}]})
    return messages, list(example["images"])


def perception_zoom_at(step: int, cfg: ToyBaseConfig) -> float:
    """Close-up factor of the single-object scenes at `step`: `perception_zoom` at step 0, linearly down to 1
    (the full scene) at `perception_zoom_steps`, and 1 after."""
    if step >= cfg.perception_zoom_steps or cfg.perception_zoom <= 1:
        return 1.0
    return cfg.perception_zoom - (cfg.perception_zoom - 1.0) * step / cfg.perception_zoom_steps


def zoom_to_object(example: dict[str, Any], zoom: float, image_size: int) -> dict[str, Any]:
    """The rendered example with its image cropped to a square 1/zoom the side, centred on the first object
    (moved inside the image at the borders), and resized back to image_size: the object `zoom` times bigger."""
    if zoom <= 1.0:
        return example
    from PIL import Image

    x1, y1, x2, y2 = example["scene"]["objects"][0]["bbox"]
    half = image_size / (2 * zoom)
    cx = min(max((x1 + x2) / 2, half), image_size - half)
    cy = min(max((y1 + y2) / 2, half), image_size - half)
    box = (cx - half, cy - half, cx + half, cy + half)
    image = example["images"][0].resize((image_size, image_size), Image.BILINEAR, box=box)
    return {**example, "images": [image], "zoom": zoom}


def curriculum_max_objects(step: int, cfg: ToyBaseConfig) -> int:
    """Objects per scene at `step`: one during perception, then a linear ramp to `max_objects`."""
    if step < cfg.perception_steps:
        return 1
    if cfg.curriculum_steps <= 0:
        return cfg.max_objects
    frac = min(1.0, (step - cfg.perception_steps) / cfg.curriculum_steps)
    return int(round(cfg.min_objects + frac * (cfg.max_objects - cfg.min_objects)))


def training_batches(cfg: ToyBaseConfig, phase: str = "main") -> Iterator[list[dict[str, Any]]]:
    """The rendered examples of one training phase, one batch at a time, in training order (drawn lazily: the
    condition phase's examples are each seen once, so they are never all held in memory).

    A batch is either all policy examples (~300 tokens: the policy is in the prompt) or all skill
    examples (~40 tokens), so short examples are never padded to policy length.

    - `phase="main"`: `pool_size` examples made for the curriculum stage they are first seen at: the first
      `perception_steps` batches describe single-object scenes (in close-up first, see `perception_zoom_at`),
      later scenes have up to `max_objects`.
    - `phase="conditions"`: `condition_steps` batches of fresh scenes of up to `max_objects` objects drawn with
      `condition_task_weights` (their own random stream)."""
    if phase not in ("main", "conditions"):
        raise ValueError(f"unknown toy-base phase {phase!r}; phases are 'main' and 'conditions'")
    main = phase == "main"
    image_size = _image_size(cfg.model)
    rng = _rng(cfg.seed, "train" if main else "train-conditions")
    weights = cfg.task_weights if main else cfg.condition_task_weights
    size = cfg.pool_size if main else cfg.condition_steps * cfg.batch_size
    perception_steps = cfg.perception_steps if main else 0
    skills = [t for t in SKILL_TASKS if t != "policy" and weights.get(t, 0) > 0]
    skill_weights = [weights[t] for t in skills]
    total = sum(weights.get(t, 0) for t in SKILL_TASKS)
    p_policy = weights.get("policy", 0) / total if total else 0.0
    k = step = 0
    while k < size:
        perceiving = step < perception_steps
        max_objects = curriculum_max_objects(step, cfg) if main else cfg.max_objects
        policy_batch = not perceiving and (rng.random() < p_policy or not skills)
        batch = []
        for _ in range(min(cfg.batch_size, size - k)):
            if policy_batch:
                ex = policy_example(rng, rng.choice(cfg.policy_depths), image_size, index=k,
                                    cot=rng.random() < cfg.policy_cot_fraction,
                                    n_objects=(cfg.min_objects, cfg.max_objects))
            else:
                task = "describe" if perceiving else rng.choices(skills, skill_weights)[0]
                ex = skill_example(rng, task, image_size, max_objects, cfg.min_objects, index=k)
            ex = render(ex, image_size)
            if perceiving:  # the single-object scenes, in close-up first
                ex = zoom_to_object(ex, perception_zoom_at(step, cfg), image_size)
            batch.append(ex)
            k += 1
        yield batch
        step += 1


def training_pool(cfg: ToyBaseConfig, phase: str = "main") -> list[dict[str, Any]]:
    """All of `training_batches`, flattened: the main phase's pool, re-drawn in order once exhausted."""
    return [ex for batch in training_batches(cfg, phase) for ex in batch]


def general_skill_items(model: str, n: int, seed: int = 0, max_objects: int = 10) -> list[dict[str, Any]]:
    """Held-out general-skill questions (exists, count, describe) on scenes of up to `max_objects`
    objects (at least min(3, max_objects)).

    The stream is fixed by `seed` and named 'eval', so it never overlaps the training pool."""
    image_size = _image_size(model)
    rng = _rng(seed, "eval")
    order = ("exists", "exists", "count", "describe")
    lo = min(3, max_objects)
    return [render(skill_example(rng, order[k % len(order)], image_size, max_objects, lo, index=k), image_size)
            for k in range(n)]


def policy_items(model: str, n: int, seed: int = 0, depths: Sequence[int] = (1, 2),
                 n_objects: tuple[int, int] = (3, 10)) -> list[dict[str, Any]]:
    """Held-out random in-context policies: how well the base follows a policy it is given."""
    image_size = _image_size(model)
    rng = _rng(seed, "eval-policy")
    return [render(policy_example(rng, depths[k % len(depths)], image_size, index=k, cot=True, n_objects=n_objects),
                   image_size) for k in range(n)]


# =========================================================================== training


def encode_examples(processor, examples: Sequence[dict[str, Any]], image_token_id: int):
    """Right-padded batch with labels on the assistant turn only (prompt and image tokens are -100)."""
    texts, prompt_lens, images = [], [], []
    tok = processor.tokenizer
    for ex in examples:
        messages, imgs = example_messages(ex, with_answer=True)
        texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))
        prompt = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        # The processor expands each image placeholder into its image tokens; the prompt length is
        # counted the same way below (checked against the processor in the tests).
        prompt_lens.append((prompt, len(imgs)))
        images.extend(imgs)
    side, tok.padding_side = tok.padding_side, "right"
    try:
        batch = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    labels = batch["input_ids"].clone()
    per_image = _tokens_per_image(processor)
    for row, (prompt, n_img) in enumerate(prompt_lens):
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"]) + n_img * (per_image - 1)
        labels[row, :n_prompt] = -100
    labels[batch["attention_mask"] == 0] = -100
    labels[labels == image_token_id] = -100
    batch["labels"] = labels
    return batch


def _tokens_per_image(processor) -> int:
    ip = processor.image_processor
    side = int(round(ip.min_pixels ** 0.5)) if getattr(ip, "min_pixels", None) else ip.size["shortest_edge"] ** 0.5
    return (int(side) // ip.patch_size) ** 2 // ip.merge_size ** 2


def toy_base_loss(model, batch) -> torch.Tensor:
    """Mean next-token loss of a batch that carries its labels, with the output layer applied only where a label
    exists (about 1.5x faster than full logits: most positions are prompt and image tokens). Unlike
    mpi.supervised.supervised_loss (a (sum, count) pair for the Trainer's token-weighted accumulation) this is
    the plain mean the toy base's own loop steps on."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.model(**inputs).last_hidden_state  # (B, T, H)
    target = labels[:, 1:]
    keep = target != -100
    h = hidden[:, :-1][keep]
    logits = model.lm_head(h).float()
    return torch.nn.functional.cross_entropy(logits, target[keep])


def _lr_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak at `total_steps`."""
    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return fn


def make_toy_base_optimizer(model, cfg: ToyBaseConfig, learning_rate: float | None = None) -> torch.optim.Optimizer:
    """AdamW over all weights, the vision tower at cfg.vision_lr_mult times the learning rate."""
    lr = cfg.learning_rate if learning_rate is None else learning_rate
    vision = [p for n, p in model.named_parameters() if p.requires_grad and ".visual." in f".{n}"]
    other = [p for n, p in model.named_parameters() if p.requires_grad and ".visual." not in f".{n}"]
    groups = [{"params": other, "lr": lr}, {"params": vision, "lr": lr * cfg.vision_lr_mult}]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay, betas=(0.9, 0.98))


def _train_phase(model, processor, cfg: ToyBaseConfig, phase: str, log: Callable[[dict], None] | None) -> list[dict]:
    """One phase's loop: its examples, a fresh AdamW and its schedule, clipped full-parameter steps."""
    from tqdm.auto import tqdm

    main = phase == "main"
    t_pool = time.perf_counter()
    pool = training_pool(cfg, phase) if main else None  # the main pool is rendered up front and re-used in order
    fresh = None if main else training_batches(cfg, phase)  # the condition phase's are drawn as it goes
    pool_seconds = time.perf_counter() - t_pool
    steps = cfg.steps if main else cfg.condition_steps
    optimizer = make_toy_base_optimizer(model, cfg, cfg.learning_rate if main else cfg.condition_lr)
    # the condition phase keeps its learning rate after the warm-up: existence is learned only after a plateau
    # at the yes/no prior (about 120 steps for colors alone at a constant 3e-4, benchmarks/bench_toy_exists.py)
    min_ratio = cfg.min_lr_ratio if main else 1.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, steps, min_ratio))
    device = next(model.parameters()).device
    image_token_id = model.config.image_token_id
    model.train()
    rows, window = [], []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=f"toy base {phase} ({cfg.model}, seed {cfg.seed})", disable=not cfg.progress)
    for step in bar:
        if main:
            examples = [pool[(step * cfg.batch_size + j) % len(pool)] for j in range(cfg.batch_size)]
        else:
            examples = next(fresh)
        batch = encode_examples(processor, examples, image_token_id).to(device)
        loss = toy_base_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        window.append(float(loss.detach()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            row = {"phase": phase, "step": step + 1 + (0 if main else cfg.steps),
                   "loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0],
                   "seconds": time.perf_counter() - start,
                   "max_objects": curriculum_max_objects(step, cfg) if main else cfg.max_objects}
            window = []
            rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            if log is not None:
                log(row)
    bar.close()
    if rows and main:
        rows[-1]["pool_seconds"] = pool_seconds
    model.eval()
    return rows


def train_toy_base(model, processor, cfg: ToyBaseConfig, log: Callable[[dict], None] | None = None,
                   phases: Sequence[str] = ("main", "conditions")) -> list[dict]:
    """Full-parameter pretraining of a toy: the main phase, then (if `condition_steps`) the condition phase,
    each with its own pool and a fresh optimizer. `phases=("conditions",)` runs the condition phase alone on a
    model that already went through the main phase (what a full build does next). Returns the logged rows."""
    from mpi.device import seed_everything

    seed_everything(cfg.seed)
    rows: list[dict] = []
    for phase in phases:
        if phase == "conditions" and cfg.condition_steps == 0:
            continue
        rows += _train_phase(model, processor, cfg, phase, log)
    return rows


# =========================================================================== evaluation


def _skill_builder(item, with_policy=False, response=None):
    return example_messages(item, with_answer=False)


def general_skill_accuracy(model, processor, items: Sequence[dict[str, Any]], *, batch_size: int = 16,
                           max_new_tokens: int = 32) -> dict[str, Any]:
    """Exact-match accuracy on held-out general-skill questions, overall and per task (greedy).

    This is the forgetting measure: evaluated on the toy base, then after each MPI method."""
    from mpi.evaluate import generate_texts
    from mpi.rewards import normalize_answer

    texts = generate_texts(model, processor, list(items), batch_size=batch_size, max_new_tokens=max_new_tokens,
                           build_messages=_skill_builder)
    per_task: dict[str, list[float]] = {}
    for item, text in zip(items, texts):
        per_task.setdefault(item["task"], []).append(float(normalize_answer(text) == normalize_answer(item["answer"])))
    flat = [s for v in per_task.values() for s in v]
    return {"accuracy": sum(flat) / len(flat) if flat else float("nan"), "n": len(flat),
            "per_task": {k: sum(v) / len(v) for k, v in sorted(per_task.items())},
            "examples": [{"question": i["question"], "answer": i["answer"], "prediction": t}
                         for i, t in list(zip(items, texts))[:6]]}


def in_context_policy_accuracy(model, processor, items: Sequence[dict[str, Any]], *, batch_size: int = 8,
                               max_new_tokens: int = 160) -> dict[str, Any]:
    """Accuracy of following held-out random policies given in context (the base's instruction following)."""
    from mpi.evaluate import evaluate_accuracy

    r = evaluate_accuracy(model, processor, list(items), with_policy=True, batch_size=batch_size,
                          max_new_tokens=max_new_tokens)
    return {"accuracy": r["accuracy"], "n": r["n"], "parsed_rate": r["parsed_rate"], "referral": r["referral"]}


# =========================================================================== cache


def _recipe_config(cfg: ToyBaseConfig) -> dict[str, Any]:
    """The knobs that change the weights: not the log cadence, and not the condition phase's when it does not run
    (`condition_steps=0` trains exactly what v4 trained, so the v4 base and its caches stay valid)."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in ("progress", "log_every")}
    if cfg.condition_steps == 0:
        for k in ("condition_steps", "condition_lr", "condition_task_weights"):
            config.pop(k)
    return config


def toy_base_key(cfg: ToyBaseConfig) -> str:
    from mpi.toy import toy_path

    record = {"version": TOY_BASE_VERSION, "config": _recipe_config(cfg), "toy": toy_path(cfg.model, cfg.seed).name}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:12]


def recipe_record(cfg: ToyBaseConfig) -> dict[str, Any]:
    """What makes two toy bases the same: the recipe version and every training knob (not the log cadence).

    Unlike `toy_base_key`, this leaves out the toy tokenizer's corpus hash, so a shipped base stays valid when
    the project's prompt text changes (the base carries its own tokenizer)."""
    return json.loads(json.dumps({"version": TOY_BASE_VERSION, "config": _recipe_config(cfg)}, sort_keys=True,
                                 default=str))


def shipped_toy_base(cfg: ToyBaseConfig) -> Path | None:
    """The toy base shipped in the repo (`mpi/assets/toy_base/<model>-s<seed>`) if its recorded recipe is `cfg`'s."""
    path = SHIPPED_ROOT / f"{cfg.model}-s{cfg.seed}"
    info = path / "toy_base.json"
    if not info.exists():
        return None
    return path if json.loads(info.read_text()).get("recipe") == recipe_record(cfg) else None


def toy_base_path(cfg: ToyBaseConfig, *, shipped: bool = True) -> Path:
    """Where the toy base for `cfg` lives: a base built on this machine (the cache) wins, then the shipped one
    with the same recipe, else the cache path a build would write to."""
    from mpi.toy import cache_root

    cached = cache_root() / "toy_base" / f"{cfg.model}-s{cfg.seed}-{toy_base_key(cfg)}"
    if shipped and not (cached / "toy_base.json").exists():
        found = shipped_toy_base(cfg)
        if found is not None:
            return found
    return cached


def load_toy_base_info(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "toy_base.json").read_text())


def build_toy_base(cfg: ToyBaseConfig | None = None, *, overwrite: bool = False, device: str | None = None,
                   log: Callable[[dict], None] | None = None) -> Path:
    """Pretrain (once) and cache the toy base for `cfg`; return its directory.

    The directory is a loadable model (`load_model_and_processor(str(path))`) with `toy_base.json`:
    the config, the training log, and the held-out general-skill and in-context-policy accuracy of
    the random-init toy and of the base (the forgetting baseline)."""
    from mpi.modeling import load_model_and_processor
    from mpi.toy import build_toy

    cfg = (cfg or ToyBaseConfig()).validate()
    path = toy_base_path(cfg, shipped=not overwrite)  # a rebuild goes to the cache, never over the shipped copy
    if (path / "toy_base.json").exists() and not overwrite:
        return path
    build_toy(cfg.model, seed=cfg.seed)
    model, processor = load_model_and_processor(cfg.model, quantization=None, lora=None, seed=cfg.seed,
                                                device=device, trainable=True)
    model.train()
    skill_items = general_skill_items(cfg.model, cfg.n_eval, seed=cfg.seed, max_objects=cfg.max_objects)
    pol_items = policy_items(cfg.model, max(8, cfg.n_eval // 4), seed=cfg.seed, depths=cfg.policy_depths,
                             n_objects=(cfg.min_objects, cfg.max_objects))
    t0 = time.perf_counter()
    before = general_skill_accuracy(model, processor, skill_items, max_new_tokens=cfg.max_new_tokens)
    rows = train_toy_base(model, processor, cfg, log=log)
    train_seconds = time.perf_counter() - t0
    after = general_skill_accuracy(model, processor, skill_items, max_new_tokens=cfg.max_new_tokens)
    following = in_context_policy_accuracy(model, processor, pol_items)
    info = {"config": cfg.to_dict(), "recipe": recipe_record(cfg), "key": toy_base_key(cfg), "log": rows, "train_seconds": train_seconds,
            "general_skill_random_init": before, "general_skill": after, "in_context_policy": following}
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        processor.tokenizer.save_pretrained(tmp)
        src = Path(build_toy(cfg.model, seed=cfg.seed))
        (tmp / "toy_spec.json").write_text((src / "toy_spec.json").read_text())
        (tmp / "toy_base.json").write_text(json.dumps(info, indent=2, default=str))
    return path


def ship_toy_base(cfg: ToyBaseConfig | None = None, *, src: str | Path | None = None, device: str | None = None) -> Path:
    """Copy the toy base built here into the repo (`SHIPPED_ROOT`), weights stored in fp16 to keep it a few MB.

    fp16 keeps ~3 decimal digits, so the shipped weights are not bit-equal to the trained ones: the general-skill
    accuracy recorded with it is measured again on the shipped weights (loaded back in fp32, as every stage
    loads them), and a test reproduces that number."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mpi.atomic import atomic_directory
    from mpi.modeling import load_model_and_processor

    cfg = (cfg or ToyBaseConfig()).validate()
    src = Path(src) if src is not None else toy_base_path(cfg, shipped=False)
    if not (src / "toy_base.json").exists():
        raise FileNotFoundError(f"no toy base built at {src}: run `python -m mpi toy-base --rebuild` first")
    info = load_toy_base_info(src)
    dst = SHIPPED_ROOT / f"{cfg.model}-s{cfg.seed}"
    with atomic_directory(dst) as tmp:
        for f in src.iterdir():
            if f.name not in ("model.safetensors", "toy_base.json"):
                shutil.copy2(f, tmp / f.name)
        weights = load_file(str(src / "model.safetensors"))
        save_file({k: (v.half() if v.is_floating_point() else v) for k, v in weights.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model, processor = load_model_and_processor(str(tmp), quantization=None, lora=None, device=device,
                                                     trainable=False)
        items = general_skill_items(cfg.model, cfg.n_eval, seed=cfg.seed, max_objects=cfg.max_objects)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread: the recorded number is then reproduced exactly on any machine
        try:
            shipped_acc = general_skill_accuracy(model, processor, items, max_new_tokens=cfg.max_new_tokens)
        finally:
            torch.set_num_threads(threads)
        info.update(recipe=recipe_record(cfg), general_skill_trained_fp32=info.get("general_skill"),
                    general_skill=shipped_acc, weights_dtype="float16")
        (tmp / "toy_base.json").write_text(json.dumps(info, indent=2, default=str))
    return dst
