"""The toy base: a toy VLM pretrained offline to see the sprite world and to follow a policy in its prompt.

The paper starts from an instruction-tuned VLM that already sees colors and shapes and follows a policy
given in its prompt. A random-init toy does neither, so before any MPI method runs, the toy is pretrained
here (full parameters, from random init) on

1. general visual skills over sprite scenes (`mpi.data.sprites`): "Is there a metal object in the image?"
   (yes/no), "How many cubes are there?", and a description that lists the colors, shapes, sizes and
   materials in view ("colors: red, blue. shapes: cube. sizes: large. materials: metal.");
2. following *randomly generated* compact policies given in context (`Policy.render_compact`, never the
   evaluation policies: their own random stream), with the evidence-first CoT (`mpi.data.clevr.compact_cot`):
   the description first, then one line per section visited, then the case.

What the recipe adds, and what it bought (docs/results-history.md, from "Toy base v5" on; the shipped base, v6, is
the "toy" preset of `TOY_BASE_PRESETS`):

- **a grounding loss**: at every visual token the merger's output vector, scored against the language model's
  input embeddings of the 15 attribute words (and of `<|vision_pad|>` for an empty cell), is trained to name what
  that token's cell holds, so the visual tokens look like the words to the language model. With it the base
  describes 1-4-object scenes exactly (100% held out); asked "is there a metal object?" directly it is still near
  the prior (59% mean), a binding it has not learned;
- **compact policies with one-token section ids** (`mpi.toy.COMPACT_TOKENS`) and text-only reading drills
  (`lookup_example`, `repeat_example`): each CoT step is then one look-up (find this id, copy what follows it). The
  toy did not learn that copy in 4,000 steps (in-context N=2 33%, chance 25%); `GATES` and
  `tests/test_toy_base_shipped.py` hold the next base to it;
- **an optional copy phase** (`copy_steps`, the "toy-copy" preset): 6,000 steps of the drills alone first. It taught
  the drills (repeat 5.8 -> 0.70 nats/token) and, downstream, existence (mean 91%), but not reading: given the gold
  CoT so far, the base still copies a leaf's case right only 31% of the time at N=2 (as v5), so it is not shipped;
- **an option to shuffle** the training policies' section lines (`shuffle_sections`): the bases find a condition by
  where its line sits (shuffled at evaluation, v5's condition copy falls 100% -> 18%). Trained shuffled, order no
  longer matters, but 4,000 steps formed no look-up by id either (condition copy 36-40%); not shipped. After a
  copy phase with shuffled drills the look-up by id is learned on the drills (look-up loss 0.48) and still not used
  in policy CoTs (condition copy 43%);
- **an optional check drill** (task `check`, `check_example`: the CoT's own check lines without a policy): with it the
  yes/no check rose to 100% (N=2) teacher-forced in one run, not in another; on in the shipped recipe.
- **why none of that read**: every base copied by offset or by line position, never by content (the benchmark's copy
  probes: the repeat drill 100% at its trained 6-24 words, 28% at 40; the word after an id in a look-up 38%), and
  drills built to force a content look-up stayed on that plateau. **An optional look-up circuit** (`lookup_circuit`,
  `mpi.toy_circuit`): a previous-token head and an induction-style look-up head set in the random-init weights and
  kept as set while the rest pretrains: the random-init toy then copies 91-96% of condition words and 98-100% of cases
  after an id, wherever the line sits, and after pretraining all of them;
- **optional evidence-first existence** (`exists_evidence`): "Is there a metal object?" is answered as a condition is
  checked in a CoT, the description first and then "metal? yes", scored by its final yes/no (`final_yes_no`).

The shipped base (v6: circuit, evidence-first existence, check drill, 6,000 steps, 83 min of one thread) meets every
gate: existence 100% on each of the 15 values, describe 100%, unseen in-context policies N=2 97.9% and N=4 95.8%,
section ids exact 96.9% (`benchmarks/bench_toy_base_skills.py`).

    cfg = toy_base_config("toy")                                       # the shipped recipe (TOY_BASE_PRESETS)
    path = build_toy_base(cfg)                                         # cached, resumable, deterministic per seed
    model, processor = load_model_and_processor(str(path), quantization=None, lora=...)
    toy_base_skills(model, processor, cfg)                             # the gates: existence, describe, policies

The checkpoint is a normal model directory (plus `toy_base.json` with the config, the training log and the
measured skills), written atomically under `mpi.toy.cache_root()/toy_base/<model>-s<seed>-<key>`. A build that
is interrupted resumes from its last checkpoint (`<dir>.ckpt/`, every `checkpoint_every` steps) on the next call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mpi.atomic import atomic_directory
from mpi.data.clevr import describe_target  # the describe task's target = the evidence line of a compact CoT

# bump when the recipe changes so old caches are not reused. 5: the sprite world, the grounding loss, compact
# policies with the evidence-first CoT, batches drawn per step (resumable). v1-v4 (CLEVR-like renderer, zoom
# curriculum, condition phase) are in docs/results-history.md.
TOY_BASE_VERSION = 5
# The toy base trained by this recipe, shipped so that every machine starts from the same weights in seconds.
# `python -m mpi toy-base --rebuild` trains it again.
SHIPPED_ROOT = Path(__file__).resolve().parent / "assets" / "toy_base"
SKILL_TASKS = ("describe", "exists", "count", "policy", "lookup", "repeat", "check")
BATCH_KINDS = {"describe": "skill", "exists": "skill", "count": "skill", "policy": "policy", "lookup": "lookup",
               "repeat": "lookup", "check": "skill"}


@dataclass
class ToyBaseConfig:
    """Every knob of the toy base. Sizes in steps (not seconds) so that a seed gives one checkpoint."""

    model: str = "toy-small"
    seed: int = 0
    steps: int = 4000
    batch_size: int = 32  # skill batches (~60 tokens each)
    policy_batch_size: int = 16  # policy batches (the policy is in the prompt: 100-250 tokens)
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    warmup_steps: int = 50
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    grounding_weight: float = 1.0  # the grounding loss (see the module docstring); 0 = off
    # sampling weights of the tasks (SKILL_TASKS; after `perception_steps`; before, describe and exists only)
    task_weights: dict[str, float] = field(default_factory=lambda: {"describe": 1.0, "exists": 1.5, "count": 0.25,
                                                                      "policy": 2.0, "lookup": 1.5})
    # an optional first phase: `copy_steps` of the text-only reading drills only (drawn by `copy_task_weights`, the
    # peak learning rate held), before `perception_steps` of describe/exists and then every task. Off in the shipped
    # recipe: 6,000 such steps taught copying and existence but not reading (docs/results-history.md, "A copying
    # curriculum"); the "toy-copy" preset is that measured recipe.
    copy_steps: int = 0
    copy_task_weights: dict[str, float] = field(default_factory=lambda: {"repeat": 1.0, "lookup": 1.0})
    # training policies and look-up drills with their section lines in a random order: a section can then be found
    # only by its id, not by where its line sits (the bases read conditions by position: docs/results-history.md)
    shuffle_sections: bool = False
    # set a look-up circuit (a previous-token head and a head that copies the word after an id) in the random-init
    # weights before pretraining (`mpi.toy_circuit`): the bases never formed one by themselves
    lookup_circuit: bool = False
    # answer "Is there a <value> object?" evidence first, as a policy CoT checks a condition: the scene's description,
    # then "<value>? yes" (`skill_example`); scored by that final yes/no (`final_yes_no`)
    exists_evidence: bool = False
    perception_steps: int = 300
    policy_depths: tuple[int, ...] = (1, 2, 3, 4)  # depths of the random in-context policies
    world: str = "sprites"  # = the toy data's DataConfig.world and policy_format (a test keeps them equal)
    policy_format: str = "compact"
    min_objects: int = 1
    max_objects: int = 4  # = the toy data's DataConfig.n_objects max ("small" preset; a test keeps them equal)
    n_eval: int = 96  # held-out general-skill questions (the forgetting baseline)
    max_new_tokens: int = 32
    checkpoint_every: int = 250
    log_every: int = 50
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "ToyBaseConfig":
        from mpi.toy import TOY_SPECS

        if self.model not in TOY_SPECS:
            raise ValueError(f"ToyBaseConfig.model must be a toy model ({sorted(TOY_SPECS)}), got {self.model!r}; "
                             "a hub model is already a base and needs no toy base")
        unknown = sorted(set(self.task_weights) - set(SKILL_TASKS))
        if unknown:
            raise ValueError(f"ToyBaseConfig.task_weights: unknown task(s) {unknown}; tasks are {SKILL_TASKS}")
        if set(self.copy_task_weights) - {"repeat", "lookup"} or sum(self.copy_task_weights.values()) <= 0:
            raise ValueError(f"ToyBaseConfig.copy_task_weights draws the copy phase's drills: only 'repeat' and "
                             f"'lookup', with a positive total; got {self.copy_task_weights!r}")
        for name in ("steps", "batch_size", "policy_batch_size", "checkpoint_every", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ToyBaseConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"ToyBaseConfig.learning_rate must be > 0, got {self.learning_rate!r}")
        if self.grounding_weight < 0 or self.perception_steps < 0 or self.copy_steps < 0:
            raise ValueError("ToyBaseConfig.grounding_weight, copy_steps and perception_steps must be >= 0")
        if not 1 <= self.min_objects <= self.max_objects <= 16:
            raise ValueError(f"ToyBaseConfig: need 1 <= min_objects <= max_objects <= 16, got "
                             f"{self.min_objects}..{self.max_objects}")
        if self.world not in ("sprites", "clevr") or self.policy_format not in ("compact", "paper"):
            raise ValueError(f"ToyBaseConfig.world must be 'sprites' or 'clevr' and policy_format 'compact' or "
                             f"'paper', got {self.world!r} / {self.policy_format!r}")
        return self


TOY_BASE_PRESETS: dict[str, dict[str, Any]] = {
    # CI: seconds. Proves the code path; learns close to nothing. (A build with the shipped recipe's circuit:
    # mpi/tests/test_toy_circuit.py.)
    "tiny": dict(model="toy-tiny", steps=12, batch_size=4, policy_batch_size=2, n_eval=12, copy_steps=2,
                 perception_steps=4, warmup_steps=2, policy_depths=(1, 2), max_new_tokens=16, log_every=4,
                 checkpoint_every=6),
    # The laptop toy, shipped: 83 minutes of one CPU thread once. It meets every gate (GATES) only with the look-up
    # circuit set at init (no base formed a content look-up by itself), existence answered evidence first, the yes/no
    # check drill and 6,000 steps (4,000: existence min 94%; existence weight 3.0: N=2 60%; docs/results-history.md).
    "toy": dict(model="toy-small", steps=6000, lookup_circuit=True, exists_evidence=True, max_new_tokens=48,
                task_weights={"describe": 1.0, "exists": 1.5, "count": 0.25, "policy": 2.0, "lookup": 1.5,
                              "check": 1.0}),
    # Measured, not shipped: 6,000 steps of reading drills first (copying, then existence 91% but in-context N=2
    # 17%; docs/results-history.md). `python -m mpi toy-base --set toy_base=toy-copy` builds it (51 min, 2 threads).
    "toy-copy": dict(model="toy-small", steps=10000, copy_steps=6000,
                     task_weights={**ToyBaseConfig().task_weights, "repeat": 0.5}),
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



DESCRIBE_QUESTION = "List the colors, shapes, sizes and materials of the objects in the image."


def _noun(attr: str, value: str) -> str:
    return f"{value}" if attr == "shape" else f"{value} object"


def _plural_noun(attr: str, value: str) -> str:
    return {"cube": "cubes", "sphere": "spheres", "cylinder": "cylinders"}[value] if attr == "shape" else f"{value} objects"


def skill_example(rng: random.Random, task: str, image_size: int, max_objects: int, min_objects: int = 1,
                  index: int = 0, attribute: str | None = None, value: str | None = None,
                  want: bool | None = None, evidence: bool = False) -> dict[str, Any]:
    """One general-skill example: {"task", "question", "answer", "scene"} (scene not yet rendered).
    `attribute` / `value` fix what an exists/count question asks about and `want` an existence answer
    (default: drawn; fixing one skips its draw). With `evidence`, an existence answer is the scene's description and
    then the check line "<value>? yes" (`ToyBaseConfig.exists_evidence`)."""
    from mpi.data.scenes import ATTRIBUTES, sample_object, sample_scene

    lo = max(1, min(min_objects, max_objects))
    if task == "describe":
        scene = sample_scene(rng, image_size, n_objects=(lo, max_objects), index=index, split="toybase")
        return {"task": task, "question": DESCRIBE_QUESTION, "answer": describe_target(scene["objects"]), "scene": scene}
    if attribute is not None and attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; attributes are {sorted(ATTRIBUTES)}")
    attr = attribute or rng.choice(list(ATTRIBUTES))
    value = value or rng.choice(ATTRIBUTES[attr])
    if task == "exists":
        want = rng.random() < 0.5 if want is None else want  # balanced yes/no: a blind model scores 50%
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
        answer = "yes" if want else "no"
        if evidence:
            answer = f"{describe_target(scene['objects'])}\n{value}? {answer}"
        return {"task": task, "question": f"Is there a {_noun(attr, value)} in the image? Answer yes or no.",
                "answer": answer, "scene": scene}
    if task == "count":
        scene = sample_scene(rng, image_size, n_objects=(lo, max_objects), index=index, split="toybase")
        count = sum(o[attr] == value for o in scene["objects"])
        return {"task": task, "question": f"How many {_plural_noun(attr, value)} are there? Answer with a number.",
                "answer": str(count), "scene": scene}
    if task == "check":
        return check_example(rng, image_size, max_objects, lo, index=index)
    raise ValueError(f"unknown skill task {task!r}; tasks are {SKILL_TASKS}")


CHECK_QUESTION = "Check in this order: {words}."


def check_example(rng: random.Random, image_size: int, max_objects: int, min_objects: int = 1,
                  index: int = 0) -> dict[str, Any]:
    """The yes/no check of a policy CoT without the policy: "Check in this order: yellow, cube." -> the scene's
    description, then "#1 yellow? no" / "#1.2 cube? yes", one line per word, the ids following the CoT's rule (yes
    adds .1, no .2). The same tokens as a CoT's check lines, so that "is this word among the words just written?"
    is trained on every line instead of once or twice per policy example. Each word is drawn shown or not with
    probability 1/2 (the other side when none is left; a blind model scores ~50% per line)."""
    from mpi.data.scenes import ATTRIBUTES, sample_scene

    scene = sample_scene(rng, image_size, n_objects=(min_objects, max_objects), index=index, split="toybase")
    shown = {o[a] for o in scene["objects"] for a in ATTRIBUTES}
    values = [v for vs in ATTRIBUTES.values() for v in vs]
    words: list[str] = []
    for _ in range(rng.randint(1, 4)):
        want = rng.random() < 0.5
        pool = [v for v in values if (v in shown) == want and v not in words]
        words.append(rng.choice(pool or [v for v in values if v not in words]))
    lines, node = [describe_target(scene["objects"])], "1"
    for word in words:
        yes = word in shown
        lines.append(f"#{node} {word}? {'yes' if yes else 'no'}")
        node += ".1" if yes else ".2"
    return {"task": "check", "question": CHECK_QUESTION.format(words=", ".join(words)), "answer": "\n".join(lines),
            "scene": scene}


def shuffle_sections(rng: random.Random, compact: str) -> str:
    """A compact policy with its section lines (all but the header) in a random order: the same tree."""
    head, *lines = compact.rstrip("\n").split("\n")
    rng.shuffle(lines)
    return "\n".join([head, *lines]) + ("\n" if compact.endswith("\n") else "")


def policy_example(rng: random.Random, depth: int, image_size: int, index: int = 0, cot: bool = True,
                   n_objects: tuple[int, int] = (3, 10), policy_format: str = "compact",
                   shuffled: bool = False) -> dict[str, Any]:
    """A random policy (never an evaluation one: its own random stream) with a balanced scene, as an mpi.data item.
    `shuffled`: the compact policy's section lines in a random order (`shuffle_sections`)."""
    from mpi.data.clevr import QUERY, natural_scene_for, policy_text_and_cot
    from mpi.data.policies import generate_policy, policy_name

    policy = generate_policy(rng, depth, policy_name(rng, depth))
    target = rng.choice(policy.outcomes())
    scene = natural_scene_for(rng, policy, target, image_size, index=index, n_objects=n_objects)
    outcome, path, _ = policy.evaluate(scene)
    text, chain = policy_text_and_cot(policy, scene, policy_format)
    if shuffled:
        text = shuffle_sections(rng, text)
    return {"task": "policy", "id": f"toybase-{index}", "dataset": "clevr", "variant": "T", "depth": depth,
            "policy_name": policy.name, "policy_text": text, "policy_images": [],
            "query": QUERY.format(name=policy.name), "cot": chain if cot else "",
            "answer": outcome, "gold_path": path, "override": False, "extra": "{}", "scene": scene}


LOOKUP_QUESTION = "What do sections {ids} say?"


def lookup_example(rng: random.Random, depth: int, index: int = 0, shuffled: bool = False) -> dict[str, Any]:
    """A reading drill on a random compact policy, text only: "What do sections #1.2, #1.1.1 and #1 say?" ->
    "#1.2 small\n#1.1.1 Case 4\n#1 metal". Every answer word is the token that follows a section id in the policy:
    the look-up a CoT step makes, here several times per example instead of once or twice per CoT, so that the
    attention pattern that does it (find this id earlier, copy what follows it) forms in fewer steps."""
    from mpi.data.policies import generate_policy, policy_name

    policy = generate_policy(rng, depth, policy_name(rng, depth))
    text = policy.render_compact()
    lines = dict(line.split(" ", 1) for line in text.splitlines()[1:])
    ids = rng.sample(sorted(lines), min(len(lines), rng.randint(2, 6)))
    question = LOOKUP_QUESTION.format(ids=", ".join(ids[:-1]) + " and " + ids[-1])
    return {"task": "lookup", "question": (shuffle_sections(rng, text) if shuffled else text) + question,
            "answer": "\n".join(f"{i} {lines[i]}" for i in ids), "images": [], "index": index}



def circuit_calibration_text() -> str:
    """The text a build measures the residual's scale on before setting the look-up circuit (`mpi.toy_circuit`):
    one fixed compact N=2 look-up drill, so every build, test and benchmark sets the same circuit."""
    return lookup_example(random.Random(0), 2)["question"]

def repeat_example(rng: random.Random, index: int = 0) -> dict[str, Any]:
    """The plainest copying drill, text only: "Repeat: #1.2 cube Case 3 red ..." -> the same words. After the first
    word, each next one is the word that followed the current one in the question (no word repeats), the look-up
    a policy CoT makes when it copies what a section says."""
    from mpi.data.scenes import ATTRIBUTES
    from mpi.toy import COMPACT_TOKENS

    words = [w.strip() for w in COMPACT_TOKENS if not w.startswith(" ")] + [v for vs in ATTRIBUTES.values() for v in vs]
    seq = " ".join(rng.sample(words, rng.randint(6, 24)))
    return {"task": "repeat", "question": f"Repeat: {seq}", "answer": seq, "images": [], "index": index}


def render(example: dict[str, Any], image_size: int, world: str = "sprites") -> dict[str, Any]:
    from mpi.data.scenes import scene_image

    out = dict(example)
    out["images"] = [scene_image(example["scene"], image_size, world=world)]
    return out


def example_messages(example: dict[str, Any], with_answer: bool = True):
    """Chat messages and images for one rendered example (policy examples go through mpi.data's builder)."""
    if example["task"] == "policy":
        from mpi.data.messages import build_messages, format_response

        response = format_response(example["cot"] or None, example["answer"]) if with_answer else None
        return build_messages(example, with_policy=True, response=response)
    image = [{"type": "image"}] if example.get("images") else []
    messages = [{"role": "user", "content": image + [{"type": "text", "text": example["question"]}]}]
    if with_answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": example["answer"]}]})
    return messages, list(example["images"])


def batch_at(cfg: ToyBaseConfig, step: int) -> list[dict[str, Any]]:
    """The rendered examples of training step `step`: a pure function of (seed, step), so a resumed run sees
    exactly the batches an uninterrupted one would.

    A batch holds one kind of example (`BATCH_KINDS`: skills ~60 tokens, policies with the policy in the prompt,
    text-only look-up drills), so short examples are never padded to policy length. The first `copy_steps` batches
    are reading drills only (repeat, lookup), the next `perception_steps` describe/exists only, then every task."""
    image_size = _image_size(cfg.model)
    rng = _rng(cfg.seed, "train", step)
    weights = dict(cfg.task_weights)
    if step < cfg.copy_steps:
        weights = dict(cfg.copy_task_weights)
    elif step < cfg.copy_steps + cfg.perception_steps:
        weights = {t: w for t, w in weights.items() if t in ("describe", "exists")}
    skills = [t for t in SKILL_TASKS if BATCH_KINDS[t] == "skill" and weights.get(t, 0) > 0]
    kinds = ["skill", "policy", "lookup"]
    kind = rng.choices(kinds, [sum(w for t, w in weights.items() if BATCH_KINDS[t] == k) for k in kinds])[0]
    batch = []
    if kind == "lookup":
        drills = [t for t in ("lookup", "repeat") if weights.get(t, 0) > 0]
        task = rng.choices(drills, [weights[t] for t in drills])[0]
        if task == "repeat":
            return [repeat_example(rng, index=step * 1000 + k) for k in range(cfg.batch_size)]
        return [lookup_example(rng, rng.choice(cfg.policy_depths), index=step * 1000 + k,
                               shuffled=cfg.shuffle_sections) for k in range(cfg.policy_batch_size)]
    if kind == "policy":
        for k in range(cfg.policy_batch_size):
            ex = policy_example(rng, rng.choice(cfg.policy_depths), image_size, index=step * 1000 + k,
                                n_objects=(cfg.min_objects, cfg.max_objects), policy_format=cfg.policy_format,
                                shuffled=cfg.shuffle_sections)
            batch.append(render(ex, image_size, cfg.world))
    else:
        for k in range(cfg.batch_size):
            task = rng.choices(skills, [weights[t] for t in skills])[0]
            ex = skill_example(rng, task, image_size, cfg.max_objects, cfg.min_objects, index=step * 1000 + k,
                               evidence=cfg.exists_evidence)
            batch.append(render(ex, image_size, cfg.world))
    return batch


def general_skill_items(model: str, n: int, seed: int = 0, max_objects: int = 10,
                        world: str = "sprites", evidence: bool = False) -> list[dict[str, Any]]:
    """Held-out general-skill questions (exists, count, describe) on scenes of up to `max_objects`
    objects (at least min(3, max_objects)).

    The stream is fixed by `seed` and named 'eval', so it never overlaps the training batches."""
    image_size = _image_size(model)
    rng = _rng(seed, "eval")
    order = ("exists", "exists", "count", "describe")
    lo = min(3, max_objects)
    return [render(skill_example(rng, order[k % len(order)], image_size, max_objects, lo, index=k, evidence=evidence),
                   image_size, world) for k in range(n)]


def existence_items(model: str, n_per_value: int, seed: int = 0, max_objects: int = 4,
                    world: str = "sprites", evidence: bool = False) -> list[dict[str, Any]]:
    """Held-out "Is there a <value> object?" items: for each of the 15 attribute values, `n_per_value` items with
    yes and no alternating (exactly balanced), 1..max_objects objects, from their own stream."""
    from mpi.data.scenes import ATTRIBUTES

    image_size = _image_size(model)
    rng = _rng(seed, "eval-exists")
    items = []
    for attr, values in ATTRIBUTES.items():
        for value in values:
            for k in range(n_per_value):
                ex = skill_example(rng, "exists", image_size, max_objects, 1, index=len(items), attribute=attr,
                                   value=value, want=k % 2 == 0, evidence=evidence)
                items.append({**render(ex, image_size, world), "attribute": attr, "value": value})
    return items


def describe_items(model: str, n: int, seed: int = 0, max_objects: int = 4,
                   world: str = "sprites") -> list[dict[str, Any]]:
    """Held-out describe items on 1..max_objects-object scenes (object counts cycled), from their own stream."""
    image_size = _image_size(model)
    rng = _rng(seed, "eval-describe")
    return [render(skill_example(rng, "describe", image_size, 1 + k % max_objects, 1 + k % max_objects, index=k),
                   image_size, world) for k in range(n)]


def policy_items(model: str, n: int, seed: int = 0, depths: Sequence[int] = (1, 2),
                 n_objects: tuple[int, int] = (3, 10), world: str = "sprites",
                 policy_format: str = "compact") -> list[dict[str, Any]]:
    """Held-out random in-context policies (their own stream), one outcome each drawn uniformly: how well the base
    follows a policy it is given. Chance is 1 / 2^N."""
    image_size = _image_size(model)
    rng = _rng(seed, "eval-policy")
    return [render(policy_example(rng, depths[k % len(depths)], image_size, index=k, cot=True, n_objects=n_objects,
                                  policy_format=policy_format), image_size, world) for k in range(n)]


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


def grounding_words(tokenizer) -> list[int]:
    """Token ids of the 15 attribute words (" red", " cube", ...; ATTRIBUTES order) and of `<|vision_pad|>` (an
    empty cell), the classes the grounding loss scores each visual token against."""
    from mpi.data.scenes import ATTRIBUTES

    ids = []
    for values in ATTRIBUTES.values():
        for v in values:
            toks = tokenizer(" " + v, add_special_tokens=False)["input_ids"]
            if len(toks) != 1:
                raise ValueError(f"the grounding loss needs ' {v}' to be one token of the toy tokenizer, got {toks}")
            ids += toks
    return ids + [tokenizer.convert_tokens_to_ids("<|vision_pad|>")]


def grounding_targets(examples: Sequence[dict[str, Any]], tokens_per_side: int) -> torch.Tensor:
    """(images * tokens, 16) target distributions: an object's four words 1/4 each, an empty cell the pad class."""
    from mpi.data.scenes import ATTRIBUTES
    from mpi.data.sprites import cell_objects

    index = {(a, v): i for i, (a, v) in enumerate((a, v) for a, vs in ATTRIBUTES.items() for v in vs)}
    n = tokens_per_side ** 2
    out = torch.zeros(len(examples) * n, len(index) + 1)
    for e, ex in enumerate(examples):
        cells = cell_objects(ex["scene"], tokens_per_side)
        for t in range(n):
            obj = cells.get(t)
            if obj is None:
                out[e * n + t, -1] = 1.0
            else:
                for a in ATTRIBUTES:
                    out[e * n + t, index[(a, obj[a])]] = 0.25
    return out


def toy_base_loss(model, batch, grounding: tuple[list[int], torch.Tensor] | None = None,
                  grounding_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token loss of a batch that carries its labels, plus `grounding_weight` x the grounding loss.

    The output layer is applied only where a label exists (about 1.5x faster than full logits: most positions
    are prompt and image tokens). `grounding` = (class token ids, targets from `grounding_targets`): the merger's
    output at each visual token, scored against those words' input embeddings, is trained toward the words of
    the object its cell holds (soft cross-entropy)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    captured = {}
    hook = None
    if grounding is not None:
        hook = model.model.visual.register_forward_hook(
            lambda module, args, output: captured.__setitem__("features", output.pooler_output))
    try:
        hidden = model.model(**inputs).last_hidden_state  # (B, T, H)
    finally:
        if hook is not None:
            hook.remove()
    target = labels[:, 1:]
    keep = target != -100
    logits = model.lm_head(hidden[:, :-1][keep]).float()
    lm = torch.nn.functional.cross_entropy(logits, target[keep])
    parts = {"lm": float(lm.detach())}
    if grounding is None:
        return lm, parts
    word_ids, targets = grounding
    words = model.get_input_embeddings().weight[torch.tensor(word_ids, device=hidden.device)]
    scores = captured["features"].float() @ words.float().T
    ground = -(targets.to(scores.device) * torch.log_softmax(scores, dim=-1)).sum(-1).mean()
    parts["grounding"] = float(ground.detach())
    return lm + grounding_weight * ground, parts


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float, hold_steps: int = 0) -> float:
    """Linear warm-up, the peak held until `hold_steps` (the copy phase), then cosine decay to `min_lr_ratio` of the
    peak at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    start = max(warmup_steps, hold_steps)
    if step < start:
        return 1.0
    progress = (step - start) / max(1, total_steps - start)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_toy_base_optimizer(model, cfg: ToyBaseConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                             weight_decay=cfg.weight_decay, betas=(0.9, 0.98))


def _save_checkpoint(ckpt: Path, model, optimizer, step: int, rows: list[dict], seconds: float, key: str) -> None:
    """Weights, optimizer and progress, written to a temporary file and renamed: a kill never leaves half of one."""
    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / "state.pt.tmp"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "rows": rows,
                "seconds": seconds, "key": key, "torch_rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, ckpt / "state.pt")


def train_toy_base(model, processor, cfg: ToyBaseConfig, log: Callable[[dict], None] | None = None,
                   checkpoint_dir: str | os.PathLike | None = None) -> list[dict]:
    """Full-parameter pretraining of a toy on `batch_at(cfg, step)` for cfg.steps steps; returns the logged rows.

    With `checkpoint_dir`, the state is saved every `checkpoint_every` steps and a call that finds a checkpoint of
    the same recipe there continues from it: the batches are a function of the step, so the resumed run trains
    on exactly what the uninterrupted one would have."""
    from tqdm.auto import tqdm

    from mpi.device import seed_everything

    seed_everything(cfg.seed)
    device = next(model.parameters()).device
    optimizer = make_toy_base_optimizer(model, cfg)
    key = toy_base_key(cfg)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start_step, rows, seconds = 0, [], 0.0
    if ckpt is not None and (ckpt / "state.pt").exists():
        state = torch.load(ckpt / "state.pt", map_location=device, weights_only=False)
        if state.get("key") == key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_step, rows, seconds = state["step"], state["rows"], state["seconds"]
            torch.set_rng_state(state["torch_rng"])
    image_token_id = model.config.image_token_id
    word_ids = grounding_words(processor.tokenizer) if cfg.grounding_weight > 0 else None
    per_side = int(round(_tokens_per_image(processor) ** 0.5))
    model.train()
    window: dict[str, list[float]] = {}
    t0 = time.perf_counter() - seconds
    bar = tqdm(range(start_step, cfg.steps), desc=f"toy base ({cfg.model}, seed {cfg.seed})", disable=not cfg.progress,
               initial=start_step, total=cfg.steps)
    for step in bar:
        examples = batch_at(cfg, step)
        batch = encode_examples(processor, examples, image_token_id).to(device)
        has_images = bool(examples[0].get("images"))
        grounding = (word_ids, grounding_targets(examples, per_side)) if word_ids is not None and has_images else None
        loss, parts = toy_base_loss(model, batch, grounding, cfg.grounding_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        lr = cfg.learning_rate * lr_factor(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio, cfg.copy_steps)
        for group in optimizer.param_groups:  # the schedule is a function of the step: nothing to restore on resume
            group["lr"] = lr
        optimizer.step()
        kind = examples[0]["task"] if examples[0]["task"] in ("lookup", "repeat") else BATCH_KINDS[examples[0]["task"]]
        window.setdefault(f"{kind}_loss", []).append(parts["lm"])
        if "grounding" in parts:
            window.setdefault("grounding_loss", []).append(parts["grounding"])
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            row = {"step": step + 1, "lr": lr, "seconds": time.perf_counter() - t0,
                   **{k: sum(v) / len(v) for k, v in window.items()}}
            window = {}
            rows.append(row)
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k.endswith("loss")})
            if log is not None:
                log(row)
        if ckpt is not None and ((step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps):
            _save_checkpoint(ckpt, model, optimizer, step + 1, rows, time.perf_counter() - t0, key)
    bar.close()
    model.eval()
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
        if item["task"] == "exists":  # with or without the evidence first, the answer is its final yes/no
            right = final_yes_no(text) == final_yes_no(item["answer"])
        else:
            right = normalize_answer(text) == normalize_answer(item["answer"])
        per_task.setdefault(item["task"], []).append(float(right))
    flat = [s for v in per_task.values() for s in v]
    return {"accuracy": sum(flat) / len(flat) if flat else float("nan"), "n": len(flat),
            "per_task": {k: sum(v) / len(v) for k, v in sorted(per_task.items())},
            "examples": [{"question": i["question"], "answer": i["answer"], "prediction": t}
                         for i, t in list(zip(items, texts))[:6]]}


def final_yes_no(text: str) -> str | None:
    """The last "yes" or "no" word of an answer ("... materials: metal.\nmetal? yes" -> "yes"); None without one."""
    import re

    words = re.findall(r"\b(yes|no)\b", (text or "").lower())
    return words[-1] if words else None


def in_context_policy_accuracy(model, processor, items: Sequence[dict[str, Any]], *, batch_size: int = 8,
                               max_new_tokens: int = 160) -> dict[str, Any]:
    """Following held-out random policies given in context: accuracy, parse rate, referral, and `sections_exact`,
    the share of answers whose CoT visits exactly the gold CoT's section ids, in order (leaf included)."""
    import re

    from mpi.evaluate import evaluate_accuracy

    r = evaluate_accuracy(model, processor, list(items), with_policy=True, batch_size=batch_size,
                          max_new_tokens=max_new_tokens)
    ids = re.compile(r"#(\d+(?:\.\d+)*)")
    exact = [float(ids.findall(p or "") == ids.findall(i["cot"])) for i, p in zip(items, r["predictions"])]
    return {"accuracy": r["accuracy"], "n": r["n"], "parsed_rate": r["parsed_rate"], "referral": r["referral"],
            "sections_exact": sum(exact) / len(exact) if exact else float("nan"),
            "examples": [{"answer": i["answer"], "prediction": p} for i, p in list(zip(items, r["predictions"]))[:3]]}


GATES = {"exists_min": 0.95, "describe": 0.90, "policy_N2": 0.70, "policy_N4": 0.40, "sections_exact": 0.95}


def toy_base_skills(model, processor, cfg: ToyBaseConfig, *, exists_per_value: int = 16, n_describe: int = 64,
                    policies_per_depth: int = 48, depths: Sequence[int] = (2, 4)) -> dict[str, Any]:
    """The premises the toy base must meet (`GATES`), on held-out scenes and unseen random policies:

    - existence: "Is there a <value> object?" accuracy for each of the 15 values (yes/no exactly balanced);
    - describe: the share of exact descriptions of 1..max_objects-object scenes;
    - policies: following unseen random N-layer compact policies in context (chance 1 / 2^N), and the share of
      CoTs that visit exactly the gold section ids."""
    from mpi.evaluate import generate_texts

    ex_items = existence_items(cfg.model, exists_per_value, seed=cfg.seed, max_objects=cfg.max_objects, world=cfg.world,
                               evidence=cfg.exists_evidence)
    texts = generate_texts(model, processor, ex_items, batch_size=32,
                           max_new_tokens=cfg.max_new_tokens if cfg.exists_evidence else 4,  # the description first
                           build_messages=_skill_builder)
    per_value: dict[str, list[float]] = {}
    yes = 0
    for item, text in zip(ex_items, texts):
        per_value.setdefault(item["value"], []).append(float(final_yes_no(text) == final_yes_no(item["answer"])))
        yes += final_yes_no(text) == "yes"
    exists = {v: sum(x) / len(x) for v, x in per_value.items()}
    d_items = describe_items(cfg.model, n_describe, seed=cfg.seed, max_objects=cfg.max_objects, world=cfg.world)
    texts = generate_texts(model, processor, d_items, batch_size=32, max_new_tokens=40, build_messages=_skill_builder)
    describe = [float(t.strip() == i["answer"]) for i, t in zip(d_items, texts)]
    out: dict[str, Any] = {
        "exists": exists, "exists_min": min(exists.values()), "exists_mean": sum(exists.values()) / len(exists),
        "exists_yes_rate": yes / len(ex_items), "describe": sum(describe) / len(describe),
        "describe_examples": [{"answer": i["answer"], "prediction": t} for i, t in list(zip(d_items, texts))[:3]]}
    for depth in depths:
        items = policy_items(cfg.model, policies_per_depth, seed=cfg.seed, depths=(depth,),
                             n_objects=(cfg.min_objects, cfg.max_objects), world=cfg.world,
                             policy_format=cfg.policy_format)
        r = in_context_policy_accuracy(model, processor, items, max_new_tokens=32 + 12 * depth)
        out[f"policy_N{depth}"] = r["accuracy"]
        out[f"policy_N{depth}_chance"] = 1 / 2 ** depth
        out[f"policy_N{depth}_sections_exact"] = r["sections_exact"]
        out[f"policy_N{depth}_parsed"] = r["parsed_rate"]
        out[f"policy_N{depth}_examples"] = r["examples"]
    exact = [out[f"policy_N{d}_sections_exact"] for d in depths]
    out["sections_exact"] = sum(exact) / len(exact)
    out["gates"] = {k: {"value": out[k], "gate": g, "met": out[k] >= g} for k, g in GATES.items() if k in out}
    return out


def skills_line(skills: dict[str, Any]) -> str:
    """One line for reports: 'exists 97% (min 95%), describe 91%, in-context policies N=2 74% (chance 25%), ...'."""
    parts = [f"exists {skills['exists_mean']:.0%} (min {skills['exists_min']:.0%})", f"describe {skills['describe']:.0%}"]
    depths = sorted(int(k[len("policy_N"):]) for k in skills if k.startswith("policy_N") and k[len("policy_N"):].isdigit())
    pols = [f"N={d} {skills[f'policy_N{d}']:.0%} (chance {skills[f'policy_N{d}_chance']:.0%})" for d in depths]
    return ", ".join(parts + [f"in-context policies {', '.join(pols)}",
                              f"sections exact {skills['sections_exact']:.0%}"])


# =========================================================================== cache


def _recipe_config(cfg: ToyBaseConfig) -> dict[str, Any]:
    """The knobs that change the weights: not the log or checkpoint cadence, nor the copy phase's or the section
    shuffle's knobs while they are off (such a recipe trains exactly as before they existed: same key and record)."""
    skip = {"progress", "log_every", "checkpoint_every"}
    if not cfg.copy_steps:
        skip |= {"copy_steps", "copy_task_weights"}
    if not cfg.shuffle_sections:
        skip.add("shuffle_sections")
    for knob in ("lookup_circuit", "exists_evidence"):
        if not getattr(cfg, knob):
            skip.add(knob)
    return {k: v for k, v in cfg.to_dict().items() if k not in skip}


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

    cfg = (cfg or toy_base_config("toy")).validate()  # None: the shipped recipe
    path = toy_base_path(cfg, shipped=not overwrite)  # a rebuild goes to the cache, never over the shipped copy
    if (path / "toy_base.json").exists() and not overwrite:
        return path
    build_toy(cfg.model, seed=cfg.seed)
    model, processor = load_model_and_processor(cfg.model, quantization=None, lora=None, seed=cfg.seed,
                                                device=device, trainable=True)
    model.train()
    skill_items = general_skill_items(cfg.model, cfg.n_eval, seed=cfg.seed, max_objects=cfg.max_objects,
                                      world=cfg.world, evidence=cfg.exists_evidence)
    before = general_skill_accuracy(model, processor, skill_items, max_new_tokens=cfg.max_new_tokens)
    if cfg.lookup_circuit:  # the initial weights (a resumed build loads its checkpoint over them), kept as set
        from mpi.toy_circuit import freeze_lookup_circuit, install_lookup_circuit

        circuit = install_lookup_circuit(model, processor.tokenizer, circuit_calibration_text())
        freeze_lookup_circuit(model, circuit["frozen"])
    ckpt = path.with_name(path.name + ".ckpt")
    rows = train_toy_base(model, processor, cfg, log=log, checkpoint_dir=ckpt)
    train_seconds = rows[-1]["seconds"] if rows else 0.0  # across interruptions: the checkpoint carries the clock
    after = general_skill_accuracy(model, processor, skill_items, max_new_tokens=cfg.max_new_tokens)
    small = cfg.model == "toy-tiny"  # CI: a few items prove the code path
    skills = toy_base_skills(model, processor, cfg, exists_per_value=2 if small else 16,
                             n_describe=4 if small else 64, policies_per_depth=2 if small else 48)
    info = {"config": cfg.to_dict(), "recipe": recipe_record(cfg), "key": toy_base_key(cfg), "log": rows,
            "train_seconds": train_seconds, "threads": torch.get_num_threads(),
            "general_skill_random_init": before, "general_skill": after, "skills": skills}
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        processor.tokenizer.save_pretrained(tmp)
        src = Path(build_toy(cfg.model, seed=cfg.seed))
        (tmp / "toy_spec.json").write_text((src / "toy_spec.json").read_text())
        (tmp / "toy_base.json").write_text(json.dumps(info, indent=2, default=str))
    shutil.rmtree(ckpt, ignore_errors=True)
    return path


def ship_toy_base(cfg: ToyBaseConfig | None = None, *, src: str | Path | None = None, device: str | None = None) -> Path:
    """Copy the toy base built here into the repo (`SHIPPED_ROOT`), weights stored in fp16 to keep it a few MB.

    fp16 keeps ~3 decimal digits, so the shipped weights are not bit-equal to the trained ones: the general-skill
    accuracy recorded with it is measured again on the shipped weights (loaded back in fp32, as every stage
    loads them), and a test reproduces that number."""
    from safetensors.torch import load_file, save_file

    from mpi.atomic import atomic_directory
    from mpi.modeling import load_model_and_processor

    cfg = (cfg or toy_base_config("toy")).validate()  # None: the shipped recipe
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
        items = general_skill_items(cfg.model, cfg.n_eval, seed=cfg.seed, max_objects=cfg.max_objects,
                                    world=cfg.world, evidence=cfg.exists_evidence)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread: the recorded numbers are then reproduced exactly on any machine
        try:
            shipped_acc = general_skill_accuracy(model, processor, items, max_new_tokens=cfg.max_new_tokens)
            skills = toy_base_skills(model, processor, cfg)
        finally:
            torch.set_num_threads(threads)
        info.update(recipe=recipe_record(cfg), general_skill_trained_fp32=info.get("general_skill"),
                    general_skill=shipped_acc, skills_trained_fp32=info.get("skills"), skills=skills,
                    weights_dtype="float16")
        (tmp / "toy_base.json").write_text(json.dumps(info, indent=2, default=str))
    return dst
