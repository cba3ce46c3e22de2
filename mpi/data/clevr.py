"""ClevrPolicy items: policies per depth, scenes per policy, gold outcomes, forward CoT, override.

An item pairs one policy with one scene. Its gold outcome comes from walking the tree on the scene
graph (`Policy.evaluate`), never from the picture. Scenes are *outcome-balanced* by default: for
each item a target outcome is drawn round-robin, a scene is sampled under that outcome's path
constraints, and the walk re-checks it (rejection sampling; a mismatch is re-drawn). Without
balancing, rare outcomes (e.g. "no small object" in a 10-object scene) almost never occur and a
policy-free model scores high by guessing the common case; `outcome_report` gives that chance line.

Records here are plain dicts with a `scene` (not yet rendered); `mpi.data.build` renders them into
a `datasets.Dataset`.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any, Iterable

from .policies import Condition, Policy, find_witness, generate_policy, policy_name, sample_objects_for
from .scenes import ATTRIBUTES, describe_object, public_scene, sample_scene

QUERY = "According to the Policy: {name}, what should be the response for the given image?"
OVERRIDE_QUERY = "According to the updated Policy: {name}, what should be the response for the given image?"


def make_rng(*parts: Any) -> random.Random:
    """An independent, reproducible stream per purpose: random.Random(str) hashes with SHA-512."""
    return random.Random("/".join(str(p) for p in parts))


# ----------------------------------------------------------------------------- policies
def clevr_policies(
    depth: int,
    n_policies: int,
    seed: int = 0,
    variant: str = "T",
    kinds: tuple[str, ...] = ("exists",),
    override: bool = False,
    image_fraction: float = 0.5,
    max_images: int = 6,
) -> list[Policy]:
    """The `n_policies` policies of one depth. -T and -M share the trees (only images differ);
    `override=True` gives a *new* random tree under each of the same names."""
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth (tree layers N) must be an integer >= 1, got {depth!r}")
    taken: set[str] = set()
    name_rng = make_rng(seed, "names", depth)
    names = [policy_name(name_rng, depth, taken) for _ in range(n_policies)]
    policies = []
    for i, name in enumerate(names):
        tree_rng = make_rng(seed, "override-tree" if override else "tree", depth, i)
        policy = generate_policy(tree_rng, depth, name, kinds=kinds, variant="T")
        if variant == "M":
            from .policies import add_policy_images

            add_policy_images(policy, make_rng(seed, "override-mimg" if override else "mimg", depth, i),
                              image_fraction, max_images)
        policy.meta = {"index": i, "override": override, "seed": seed}
        policies.append(policy)
    return policies


# ----------------------------------------------------------------------------- CoT
def _question(cond: Condition, image_attr: bool) -> str:
    text = cond.text(image_attr=False)
    if text.startswith("there is "):
        text = "is there " + text[len("there is "):]
    elif text.startswith("there are "):
        text = "are there " + text[len("there are "):]
    return text + "?"


def _plural_values(attr: str, values: list[str]) -> str:
    vals = sorted(set(values), key=list(ATTRIBUTES[attr]).index)
    if attr == "shape":
        vals = [{"cube": "cubes", "sphere": "spheres", "cylinder": "cylinders"}[v] for v in vals]
    return vals[0] if len(vals) == 1 else ", ".join(vals[:-1]) + " and " + vals[-1]


def _what_i_see(cond: Condition, answer: bool, objects: list[dict[str, Any]]) -> str:
    matching = [o for o in objects if cond.matches(o)]
    if cond.kind == "count":
        noun = " ".join(cond.text().split()[4:])  # "there are at least 2 red objects" -> "red objects"
        return f"{'Yes' if answer else 'No'}, I count {len(matching)} {noun if len(matching) != 1 else _singular(noun)}."
    if answer:
        return f"Yes, I see a {describe_object(matching[0])}."
    if cond.kind == "and":
        return f"No, I see no {' '.join(cond.text().split()[3:])}."
    seen = [o[cond.attr] for o in objects]
    if cond.attr == "shape":
        return f"No, the shapes I see are {_plural_values('shape', seen)}."
    if cond.attr == "color":
        return f"No, the colors I see are {_plural_values('color', seen)}."
    return f"No, every object is {_plural_values(cond.attr, seen)}."


def _singular(noun: str) -> str:
    return noun[:-1] if noun.endswith("s") else noun


def forward_cot(policy: Policy, scene: dict[str, Any]) -> str:
    """The paper's forward CoT: visit the sections in order, cite each id, say what is seen."""
    objects = scene["objects"]
    node = policy.root
    lines = [f"I follow Policy {policy.name} from # Condition 1."]
    while not node.is_leaf:
        cond = node.condition
        answer = cond.holds(objects)
        prefix = f"# Condition {node.id}: "
        if node.image is not None:
            shown = f"a {cond.value}" if cond.attr == "shape" else f"a {cond.value} object"
            prefix += f"the policy image shows {shown}, so: "
        line = prefix + _question(cond, node.image is not None) + " " + _what_i_see(cond, answer, objects)
        nxt = node.yes if answer else node.no
        line += f" So the response is {nxt.outcome}." if nxt.is_leaf else f" Go to # Condition {nxt.id}."
        lines.append(line)
        node = nxt
    return "\n".join(lines)


# ----------------------------------------------------------------------------- scenes per item
def sample_scene_for(
    rng: random.Random, policy: Policy, target: str | None, image_size: int, index: int, max_tries: int = 100,
    n_objects: tuple[int, int] = (3, 10),
) -> dict[str, Any]:
    """A scene of n_objects[0]..n_objects[1] objects whose walk ends at `target` (balanced), or an
    unconstrained scene (target None)."""
    if target is None:
        return sample_scene(rng, image_size, n_objects=n_objects, index=index)
    constraints = _leaf_constraints(policy)[target]
    for _ in range(max_tries):
        objects = sample_objects_for(rng, constraints, n_objects=n_objects)
        if objects is None:
            break
        scene = sample_scene(rng, image_size, objects=objects, index=index)
        if policy.evaluate(scene)[0] == target:  # rejection: the walk has the last word
            return scene
    raise RuntimeError(f"policy {policy.name}: outcome {target} is unreachable (see Policy.unreachable_leaves)")


def _leaf_constraints(policy: Policy) -> dict:
    # cached on the policy object: the walk below is repeated for every item otherwise
    if "_constraints" not in policy.meta:
        policy.meta["_constraints"] = policy.leaf_constraints()
    return policy.meta["_constraints"]


def balanced_targets(rng: random.Random, outcomes: list[str], n: int) -> list[str]:
    """n outcomes, each used floor(n/L) or ceil(n/L) times, in shuffled round-robin order."""
    out: list[str] = []
    while len(out) < n:
        block = list(outcomes)
        rng.shuffle(block)
        out.extend(block)
    return out[:n]


def clevr_records(
    policies: list[Policy],
    n_per_policy: int,
    *,
    split: str,
    seed: int,
    image_size: int,
    balanced: bool = True,
    override: bool = False,
    scene_pool: list[dict[str, Any]] | None = None,
    n_objects: tuple[int, int] = (3, 10),
) -> list[dict[str, Any]]:
    """Unrendered items (one dict per policy x scene) in a fixed order."""
    records = []
    for policy in policies:
        i = policy.meta.get("index", 0)
        rng = make_rng(seed, "scenes", split, policy.depth, i, "override" if override else "")
        if scene_pool is not None:
            scenes = _pool_scenes(rng, policy, scene_pool, n_per_policy, balanced)
        else:
            targets = balanced_targets(rng, policy.outcomes(), n_per_policy) if balanced else [None] * n_per_policy
            scenes = [sample_scene_for(rng, policy, t, image_size, index=k, n_objects=n_objects)
                      for k, t in enumerate(targets)]
        text = policy.render_text()
        for k, scene in enumerate(scenes):
            outcome, path, answers = policy.evaluate(scene)
            name = policy.name
            records.append({
                "id": f"clevr-{policy.variant}-N{policy.depth}-{split}{'-override' if override else ''}-p{i:02d}-{k:05d}",
                "dataset": "clevr",
                "variant": policy.variant,
                "depth": policy.depth,
                "policy_name": name,
                "policy_text": text,
                "policy": policy,
                "scene": scene,
                "query": (OVERRIDE_QUERY if override else QUERY).format(name=name),
                "cot": forward_cot(policy, scene),
                "answer": outcome,
                "gold_path": path,
                "override": override,
                "extra": json.dumps({"scene": public_scene(scene), "answers": answers,
                                     "policy_index": i, "split": split}, sort_keys=True),
            })
    return records


def _pool_scenes(rng: random.Random, policy: Policy, pool: list[dict[str, Any]], n: int, balanced: bool) -> list:
    """Real CLEVR scenes: draw from the pool, balanced over the outcomes the pool can reach."""
    if not balanced:
        return [rng.choice(pool) for _ in range(n)]
    by_outcome: dict[str, list[dict[str, Any]]] = {}
    for scene in pool:
        by_outcome.setdefault(policy.evaluate(scene)[0], []).append(scene)
    reachable = [o for o in policy.outcomes() if o in by_outcome]
    if not reachable:
        raise ValueError(f"policy {policy.name}: the CLEVR scene pool is empty; check clevr_scenes_json")
    return [rng.choice(by_outcome[t]) for t in balanced_targets(rng, reachable, n)]


# ----------------------------------------------------------------------------- chance line
def outcome_report(policy_names: Iterable[str], answers: Iterable[str]) -> dict[str, Any]:
    """Outcome counts per policy and the majority-class accuracy (the chance line).

    A model that never looks at the image but knows each policy's most common case scores
    `majority_accuracy`; any accuracy below it means nothing was learned from the picture.
    """
    per_policy: dict[str, Counter] = {}
    for name, ans in zip(policy_names, answers):
        per_policy.setdefault(name, Counter())[ans] += 1
    total = sum(sum(c.values()) for c in per_policy.values())
    majority = sum(max(c.values()) for c in per_policy.values())
    return {
        "per_policy": {k: dict(sorted(v.items(), key=lambda kv: int(kv[0].split()[-1]))) for k, v in per_policy.items()},
        "n_items": total,
        "majority_accuracy": majority / total if total else 0.0,
        "uniform_accuracy": sum(sum(c.values()) / len(c) for c in per_policy.values()) / total if total else 0.0,
    }


def plot_outcomes(policy_names: list[str], answers: list[str], ax=None, title: str | None = None):
    """Bar chart of outcome frequencies (all policies pooled, by case number) with the chance line."""
    import matplotlib.pyplot as plt

    report = outcome_report(policy_names, answers)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3))
    counts = Counter(answers)
    cases = sorted(counts, key=lambda c: int(c.split()[-1]))
    n = len(answers)
    ax.bar([c.split()[-1] for c in cases], [counts[c] / n for c in cases], color="tab:blue")
    ax.axhline(report["majority_accuracy"], color="tab:red", ls="--",
               label=f"majority-class accuracy {report['majority_accuracy']:.3f}")
    ax.set_xlabel("outcome (Case k)")
    ax.set_ylabel("fraction of items")
    ax.set_title(title or "outcome distribution")
    ax.legend(loc="upper right")
    return ax


def check_reachable(policy: Policy) -> list[str]:
    """Outcomes no scene can reach (empty for generated policies)."""
    return [o for o, cons in policy.leaf_constraints().items() if find_witness(cons) is None]
