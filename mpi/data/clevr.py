"""ClevrPolicy items: policies per depth, scenes per policy, gold outcomes, forward CoT, override.

An item pairs one policy with one scene. Its gold outcome comes from walking the tree on the scene
graph (`Policy.evaluate`), never from the picture.

How a split's scenes are drawn (see data_samples/README.md for the numbers):

- *Natural scenes*: the plain sampler's distribution, object count uniform over
  `DataConfig.n_objects`, every attribute uniform (`scenes.sample_scene`).
- *Balanced outcomes* (default): targets go round-robin over the policy's outcomes, and each scene
  is a natural scene conditioned on walking to its target: the distribution rejection sampling
  would give, computed exactly by `policies.NaturalPathSampler` (no rejections, so outcomes that
  natural scenes reach once in 10^5 cost nothing; an outcome no scene of n_objects can reach
  raises `UnreachableOutcome` naming the policy and the outcome). Because an equal mix of
  outcomes is not the natural mix ("no small object" favours 1-object scenes), every outcome's
  natural scenes are tilted by one per-policy factor w(n) * prod v(attribute values), fitted
  (`policies.fit_balance_weights`) so that the split keeps the natural object-count histogram and
  attribute marginals; `match_natural=False` gives the untilted conditional. Without balancing,
  rare outcomes almost never occur and a policy-free model scores high by guessing the common case;
  `outcome_report` gives that chance line.
- *Unseen test scenes*: the test and override splits never hold an object multiset
  (`object_set_key`) that the training split holds under the same policy name; a draw that does
  is redrawn. `split_overlap` measures the share of unseen test items from the data alone.
- Objects are drawn first (attributes only, one stream per policy and split), the layout after
  (one stream per item), so the training split's object sets are known without laying it out.
- N = 6 trees are full: 64 outcomes, all reachable. The paper reports 55 distinct outcomes at
  N = 6 but states no rule that removes 9 leaves (its N = 2 and N = 4 counts, 4 and 16, are full
  trees); data_samples/README.md gives the reasoning.

Records here are plain dicts with a `scene` (not yet rendered); `mpi.data.build` renders them into
a `datasets.Dataset`.
"""

from __future__ import annotations

import json
import random
import warnings
from collections import Counter
from typing import Any, Iterable

from .policies import (
    ALL_OBJECT_TYPES,
    Condition,
    NaturalPathSampler,
    Policy,
    UnreachableOutcome,
    find_witness,
    fit_balance_weights,
    generate_policy,
    natural_object_types,
    policy_name,
    sample_objects_for,
)
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


def describe_target(objects: Iterable[dict[str, Any]]) -> str:
    """'colors: red, blue. shapes: cube. sizes: large. materials: metal, rubber.' (each list in ontology order,
    so the same scene always gives the same words)."""
    objects = list(objects)
    parts = []
    for attr, name in (("color", "colors"), ("shape", "shapes"), ("size", "sizes"), ("material", "materials")):
        seen = {o[attr] for o in objects}
        parts.append(f"{name}: {', '.join(v for v in ATTRIBUTES[attr] if v in seen)}.")
    return " ".join(parts)


def compact_cot(policy: Policy, scene: dict[str, Any]) -> str:
    """The toy presets' evidence-first CoT over the compact policy (`Policy.render_compact`): first what the
    image shows, attribute by attribute, then one line per section visited, then the leaf's case:

        colors: red, blue. shapes: cube, sphere. sizes: large. materials: metal.
        #1 metal? yes
        #1.1 cube? no
        #1.1.2 Case 2

    Checking a condition is then finding its word among the words just written (the evidence), and every
    section id cites the policy (`mpi.evaluate.cited_conditions` reads them)."""
    from .policies import compact_condition

    objects = scene["objects"]
    lines = [describe_target(objects)]
    node = policy.root
    while not node.is_leaf:
        answer = node.condition.holds(objects)
        lines.append(f"#{node.id} {compact_condition(node.condition)}? {'yes' if answer else 'no'}")
        node = node.yes if answer else node.no
    lines.append(f"#{node.id} {node.outcome}")
    return "\n".join(lines)


def policy_text_and_cot(policy: Policy, scene: dict[str, Any], policy_format: str = "paper") -> tuple[str, str]:
    """The policy as the prompt shows it and the CoT that follows it, in the paper's format or the toy's compact one."""
    if policy_format == "compact":
        return policy.render_compact(), compact_cot(policy, scene)
    if policy_format != "paper":
        raise ValueError(f"policy_format must be 'paper' or 'compact', got {policy_format!r}")
    return policy.render_text(), forward_cot(policy, scene)


# ----------------------------------------------------------------------------- scenes per item
def sample_scene_for(
    rng: random.Random, policy: Policy, target: str | None, image_size: int, index: int, max_tries: int = 100,
    n_objects: tuple[int, int] = (3, 10),
) -> dict[str, Any]:
    """A scene of n_objects[0]..n_objects[1] objects whose walk ends at `target` (balanced), or an
    unconstrained scene (target None).

    Legacy witness search (first matching object type, fewest objects: skewed scenes; 90% of 1-4-object
    scenes hold one object). The splits use `item_object_lists` and the toy base `natural_scene_for`; this
    stays for the toy tokenizer's corpus (`tokenizer_corpus(legacy_scenes=True)`), which must not change."""
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


def natural_scene_for(
    rng: random.Random, policy: Policy, target: str, image_size: int, index: int,
    n_objects: tuple[int, int] = (3, 10),
) -> dict[str, Any]:
    """One natural scene (count uniform over n_objects, attributes uniform) conditioned on its walk ending at
    `target`: the distribution of rejection sampling, drawn exactly (`NaturalPathSampler`). The toy base's
    random in-context policies use it, so the base practises on the same kind of scenes as the splits."""
    n_objects = (int(n_objects[0]), int(n_objects[1]))
    types = _path_samplers(policy, n_objects)[target].sample_types(rng)
    scene = sample_scene(rng, image_size, objects=[dict(ALL_OBJECT_TYPES[t]) for t in types], index=index)
    if policy.evaluate(scene)[0] != target:  # the walk has the last word
        raise AssertionError(f"policy {policy.name}: a scene drawn for {target} walks to {policy.evaluate(scene)[0]}")
    return scene


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


def object_set_key(objects: Iterable[dict[str, Any]]) -> tuple[tuple[str, str, str, str], ...]:
    """What a scene is up to its layout: the multiset of (shape, color, size, material), sorted."""
    return tuple(sorted((o["shape"], o["color"], o["size"], o["material"]) for o in objects))


_FIT_CACHE: dict[tuple, dict[str, Any]] = {}


def _path_samplers(policy: Policy, n_objects: tuple[int, int], match_natural: bool = False
                   ) -> dict[str, NaturalPathSampler]:
    """One sampler per outcome: natural scenes given the path, or (match_natural) tilted by the
    policy's `fit_balance_weights` so that a balanced mix keeps the natural statistics."""
    # cached on the policy object: the tables and the fit are computed once per policy
    key = ("_samplers", tuple(n_objects), match_natural)
    if key not in policy.meta:
        samplers = {outcome: NaturalPathSampler(cons, n_objects, label=f"policy {policy.name}: outcome {outcome}")
                    for outcome, cons in _leaf_constraints(policy).items()}
        if match_natural and all(s.exact and s.probability() for s in samplers.values()):
            # the same tree comes back for every split (and for the test split's training keys)
            fit_key = (tuple(sorted((o, tuple(c)) for o, c in _leaf_constraints(policy).items())), tuple(n_objects))
            if fit_key not in _FIT_CACHE:
                if len(_FIT_CACHE) > 256:
                    _FIT_CACHE.clear()
                _FIT_CACHE[fit_key] = fit_balance_weights(list(samplers.values()))
            fit = _FIT_CACHE[fit_key]
            for sampler in samplers.values():
                sampler.set_weights(fit["count_weights"], fit["type_weights"])
            policy.meta[("_balance_fit", tuple(n_objects))] = fit
        policy.meta[key] = samplers
    return policy.meta[key]


def natural_outcome_probabilities(policy: Policy, n_objects: tuple[int, int] = (3, 10)) -> dict[str, float | None]:
    """P(outcome) under natural scenes (count uniform over n_objects, attributes uniform), exact for
    `exists`/`and` trees (None for paths with `count` conditions). Sums to 1 over the outcomes."""
    return {o: s.probability() for o, s in _path_samplers(policy, n_objects).items()}


def item_object_lists(
    policy: Policy,
    n: int,
    *,
    split: str,
    seed: int,
    balanced: bool = True,
    override: bool = False,
    n_objects: tuple[int, int] = (3, 10),
    exclude: set | frozenset = frozenset(),
    dedupe_tries: int = 1000,
    match_natural: bool = True,
) -> tuple[list[tuple[str | None, list[dict[str, str]]]], int]:
    """The objects (attributes only, no layout) of one policy's n items, each with its target
    outcome, and how many of them still repeat an object set in `exclude`.

    Balanced: targets go round-robin over the outcomes, and each scene is a natural scene
    conditioned on reaching its target (`NaturalPathSampler`: the distribution of rejection
    sampling). Unbalanced: plain natural scenes. A draw whose object set is in `exclude` (the
    training split's sets of this policy) is redrawn, up to `dedupe_tries` times; after that it is
    kept and counted (only when the preset's scene space is nearly exhausted) and a warning says so.
    """
    i = policy.meta.get("index", 0)
    n_objects = (int(n_objects[0]), int(n_objects[1]))
    rng = make_rng(seed, "natural-objects", split, policy.depth, i, "override" if override else "")
    if balanced:
        samplers = _path_samplers(policy, n_objects, match_natural)
        for outcome, sampler in samplers.items():
            if sampler.exact and not sampler.probability():
                raise UnreachableOutcome(
                    f"policy {policy.name}: outcome {outcome} is unreachable with {n_objects[0]}-{n_objects[1]} "
                    f"objects per scene (DataConfig.n_objects); widen n_objects or use fewer layers")
        targets: list[str | None] = balanced_targets(rng, policy.outcomes(), n)
    else:
        targets = [None] * n
    items, n_seen = [], 0
    for target in targets:
        for _ in range(max(1, dedupe_tries)):
            types = samplers[target].sample_types(rng) if target else natural_object_types(rng, n_objects)
            objects = [dict(ALL_OBJECT_TYPES[t]) for t in types]
            if not exclude or object_set_key(objects) not in exclude:
                break
        else:
            n_seen += 1
        items.append((target, objects))
    if n_seen:
        warnings.warn(
            f"policy {policy.name} ({split}): {n_seen} of {n} items repeat an object set of the training split "
            f"after {dedupe_tries} redraws each; the scene space of {n_objects[0]}-{n_objects[1]} objects is too "
            f"small for these sizes. split_overlap() reports the unseen share", stacklevel=2)
    return items, n_seen


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
    exclude_keys: dict[str, set] | None = None,
    match_natural: bool = True,
    legacy_scenes: bool = False,
    policy_format: str = "paper",
) -> list[dict[str, Any]]:
    """Unrendered items (one dict per policy x scene) in a fixed order.

    `exclude_keys` maps a policy name to object sets (`object_set_key`) its scenes must avoid:
    the test and override splits pass the training split's, so no test scene repeats a training
    scene's objects under the same policy name. `legacy_scenes=True` draws the scenes as before
    natural balancing (`sample_scene_for`): only for the toy tokenizer's corpus, whose text must not
    change (the toy model and every cached toy base are keyed by its hash). `policy_format`: "paper" (the
    paper's prose sections and forward CoT) or "compact" (the toy presets', see `compact_cot`).
    """
    records = []
    for policy in policies:
        i = policy.meta.get("index", 0)
        tag = "override" if override else ""
        exclude = (exclude_keys or {}).get(policy.name, frozenset())
        if legacy_scenes and scene_pool is None:
            rng = make_rng(seed, "scenes", split, policy.depth, i, tag)
            legacy = balanced_targets(rng, policy.outcomes(), n_per_policy) if balanced else [None] * n_per_policy
            targets = [None] * n_per_policy
            contents = [sample_scene_for(rng, policy, t, image_size, index=k, n_objects=n_objects)
                        for k, t in enumerate(legacy)]
        else:
            targets, contents = _item_contents(policy, n_per_policy, split=split, seed=seed, balanced=balanced,
                                               override=override, n_objects=n_objects, scene_pool=scene_pool,
                                               exclude=exclude, match_natural=match_natural)
        if scene_pool is not None or legacy_scenes:
            scenes = contents
        else:
            # the layout gets its own stream per item, so that the objects above do not depend on it
            scenes = [sample_scene(make_rng(seed, "layout", split, policy.depth, i, tag, k), image_size,
                                   objects=objects, index=k) for k, objects in enumerate(contents)]
        for k, (scene, target) in enumerate(zip(scenes, targets)):
            text, cot = policy_text_and_cot(policy, scene, policy_format)
            outcome, path, answers = policy.evaluate(scene)
            if target is not None and outcome != target:  # the walk has the last word
                raise RuntimeError(f"policy {policy.name}: a scene sampled for {target} walks to {outcome}; "
                                   f"NaturalPathSampler disagrees with Policy.evaluate (a bug)")
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
                "cot": cot,
                "answer": outcome,
                "gold_path": path,
                "override": override,
                "extra": json.dumps({"scene": public_scene(scene), "answers": answers,
                                     "policy_index": i, "split": split}, sort_keys=True),
            })
    return records


def _item_contents(policy: Policy, n: int, *, split: str, seed: int, balanced: bool, override: bool,
                   n_objects: tuple[int, int], scene_pool: list[dict[str, Any]] | None,
                   exclude: set | frozenset, match_natural: bool = True) -> tuple[list[str | None], list]:
    """Targets and, per item, its object list (sampled) or its scene (from a real CLEVR pool)."""
    if scene_pool is not None:
        rng = make_rng(seed, "scenes", split, policy.depth, policy.meta.get("index", 0), "override" if override else "")
        scenes = _pool_scenes(rng, policy, scene_pool, n, balanced, exclude)
        return [None] * len(scenes), scenes
    items, _ = item_object_lists(policy, n, split=split, seed=seed, balanced=balanced, override=override,
                                 n_objects=n_objects, exclude=exclude, match_natural=match_natural)
    return [t for t, _ in items], [objects for _, objects in items]


def split_object_keys(policies: list[Policy], n_per_policy: int, *, split: str, seed: int, balanced: bool = True,
                      n_objects: tuple[int, int] = (3, 10),
                      scene_pool: list[dict[str, Any]] | None = None) -> dict[str, frozenset]:
    """The object sets of a split's scenes per policy name, as `clevr_records` would draw them
    (same streams), without laying out or rendering anything: what test/override must avoid."""
    out = {}
    for policy in policies:
        _, contents = _item_contents(policy, n_per_policy, split=split, seed=seed, balanced=balanced, override=False,
                                     n_objects=n_objects, scene_pool=scene_pool, exclude=frozenset())
        objects = [c["objects"] for c in contents] if scene_pool is not None else contents
        out[policy.name] = frozenset(object_set_key(o) for o in objects)
    return out


def _pool_scenes(rng: random.Random, policy: Policy, pool: list[dict[str, Any]], n: int, balanced: bool,
                 exclude: set | frozenset = frozenset()) -> list:
    """Real CLEVR scenes: draw from the pool (minus object sets in `exclude`), balanced over the
    outcomes the pool can reach; a warning names the outcomes it cannot."""
    if exclude:
        pool = [s for s in pool if object_set_key(s["objects"]) not in exclude]
    if not pool:
        raise ValueError(f"policy {policy.name}: no scene of the CLEVR pool is left (empty pool, or every scene's "
                         f"objects are in the training split); check clevr_scenes_json")
    if not balanced:
        return [rng.choice(pool) for _ in range(n)]
    by_outcome: dict[str, list[dict[str, Any]]] = {}
    for scene in pool:
        by_outcome.setdefault(policy.evaluate(scene)[0], []).append(scene)
    reachable = [o for o in policy.outcomes() if o in by_outcome]
    missing = [o for o in policy.outcomes() if o not in by_outcome]
    if missing:
        warnings.warn(f"policy {policy.name}: no scene of the {len(pool)}-scene CLEVR pool reaches "
                      f"{', '.join(missing)}; items are balanced over the {len(reachable)} outcomes it reaches "
                      f"(a larger clevr_scenes_json fixes this)", stacklevel=2)
    return [rng.choice(by_outcome[t]) for t in balanced_targets(rng, reachable, n)]


# ----------------------------------------------------------------------------- scene statistics
def _objects_of(item: dict[str, Any]) -> list[dict[str, Any]]:
    if "scene" in item:
        return item["scene"]["objects"]
    return json.loads(item["extra"])["scene"]["objects"]


def _rows(items) -> Iterable[dict[str, Any]]:
    # a datasets.Dataset: read only the two light columns (no image decoding)
    if hasattr(items, "column_names"):
        return ({"policy_name": p, "extra": e} for p, e in zip(items["policy_name"], items["extra"]))
    return items


def scene_statistics(items) -> dict[str, Any]:
    """Object-count histogram and each attribute's marginal (share of all objects), for records or
    a Dataset: {"n_items", "n_objects": {n: share}, "<attr>": {value: share}}."""
    counts: Counter = Counter()
    values = {a: Counter() for a in ATTRIBUTES}
    n_items = 0
    for item in _rows(items):
        objects = _objects_of(item)
        n_items += 1
        counts[len(objects)] += 1
        for o in objects:
            for a in ATTRIBUTES:
                values[a][o[a]] += 1
    n_obj = sum(counts[k] * k for k in counts)
    out: dict[str, Any] = {"n_items": n_items,
                           "n_objects": {k: counts[k] / n_items for k in sorted(counts)} if n_items else {}}
    for a, vals in ATTRIBUTES.items():
        out[a] = {v: values[a][v] / n_obj if n_obj else 0.0 for v in vals}
    return out


def natural_scene_statistics(n_objects: tuple[int, int] = (3, 10)) -> dict[str, Any]:
    """What `scene_statistics` converges to for the plain (unbalanced) scene sampler: the object
    count uniform over n_objects, every attribute uniform."""
    lo, hi = n_objects
    out: dict[str, Any] = {"n_items": None, "n_objects": {k: 1 / (hi - lo + 1) for k in range(lo, hi + 1)}}
    for a, vals in ATTRIBUTES.items():
        out[a] = {v: 1 / len(vals) for v in vals}
    return out


def max_share_gap(stats: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    """Largest |share - reference share| per statistic (object count and each attribute)."""
    out = {}
    for field in ("n_objects", *ATTRIBUTES):
        keys = set(stats[field]) | set(reference[field])
        out[field] = max(abs(stats[field].get(k, 0.0) - reference[field].get(k, 0.0)) for k in keys)
    return out


def split_overlap(train, test) -> dict[str, Any]:
    """How many `test` items (records or a Dataset) hold an object set that a `train` item of the
    same policy name holds. {"n_items", "n_seen", "unseen_share", "per_policy": {name: unseen share}}.
    The override split reuses the policy names, so pass it as `test` too."""
    seen: dict[str, set] = {}
    for item in _rows(train):
        seen.setdefault(item["policy_name"], set()).add(object_set_key(_objects_of(item)))
    per: dict[str, list[int]] = {}
    for item in _rows(test):
        hit = object_set_key(_objects_of(item)) in seen.get(item["policy_name"], ())
        per.setdefault(item["policy_name"], [0, 0])
        per[item["policy_name"]][0] += 1
        per[item["policy_name"]][1] += hit
    n = sum(v[0] for v in per.values())
    n_seen = sum(v[1] for v in per.values())
    return {"n_items": n, "n_seen": n_seen, "unseen_share": (n - n_seen) / n if n else 1.0,
            "per_policy": {k: (v[0] - v[1]) / v[0] for k, v in sorted(per.items())}}


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
