"""ClevrPolicy policies: binary decision trees over CLEVR scenes, their generator, names and text.

A decision node asks one yes/no question about the scene ("is there a cyan object?"); its *yes*
child goes to section `<id>.1`, its *no* child to `<id>.2`, so the root is "# Condition 1" and its
children "# Condition 1.1" / "# Condition 1.2", as in the paper. Leaves are unique outcomes
"Case k" (numbers shuffled so that a case number does not spell out its path).

Rules the generator keeps (and `Policy.validate` checks):
- a node on its parent's *true* edge never tests an attribute type its parent tested;
- a node never repeats a condition of its own path;
- both answers of every node stay possible given the path above it, so every leaf is reachable
  (`unreachable_leaves` reports any that are not, e.g. in a hand-written tree).

A tree of N layers is full: 2**N outcomes (64 at N = 6, where the paper reports 55 without a rule
that would remove leaves; see data_samples/README.md).

`NaturalPathSampler` draws the objects of a natural scene given one path (exactly what rejection
sampling would give) and `fit_balance_weights` the per-policy tilt that keeps an outcome-balanced
split's object counts and attribute values at the natural statistics.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

from .scenes import ATTRIBUTES

CONDITION_KINDS = ("exists", "count", "and")

GENERAL_INSTRUCTION = (
    "You are a visual assistant that answers by following a decision policy. The policy is a list of "
    "numbered sections. Start at # Condition 1 and check its condition against the image. Each section "
    "says where to go next when the condition holds (yes) and when it does not (no); keep jumping between "
    "sections until a section gives the response. The response is a case name such as \"Case 3\"."
)
IMAGE_PLACEHOLDER = "<image>"


class PolicyError(ValueError):
    """A policy tree that cannot be evaluated (unknown attribute, bad structure, bad depth)."""


class _Stuck(Exception):
    """No condition keeps both answers possible at this node."""


# ----------------------------------------------------------------------------- conditions
def _plural(shape: str) -> str:
    return {"cube": "cubes", "sphere": "spheres", "cylinder": "cylinders"}[shape]


def noun_phrase(attrs: dict[str, str], plural: bool = False) -> str:
    """CLEVR word order: size color material shape ("large red metal cube", "small object")."""
    words = [attrs[a] for a in ("size", "color", "material") if a in attrs]
    noun = attrs.get("shape")
    noun = (_plural(noun) if plural else noun) if noun else ("objects" if plural else "object")
    return " ".join(words + [noun])


@dataclass(frozen=True)
class Condition:
    """`exists`: an object with attr=value exists; `count`: at least `count` such objects;
    `and`: one object has attr=value and attr2=value2."""

    attr: str
    value: str
    kind: str = "exists"
    count: int = 1
    attr2: str | None = None
    value2: str | None = None

    def attrs(self) -> dict[str, str]:
        out = {self.attr: self.value}
        if self.kind == "and" and self.attr2:
            out[self.attr2] = self.value2
        return out

    def matches(self, obj: dict[str, Any], where: str = "object") -> bool:
        for a, v in self.attrs().items():
            if a not in obj:
                raise PolicyError(f"{where} has no field '{a}' that the policy tests; "
                                  f"scene objects need CLEVR's fields {list(ATTRIBUTES)}")
            if obj[a] != v:
                return False
        return True

    def n_matching(self, objects: list[dict[str, Any]]) -> int:
        return sum(self.matches(o, where=f"scene object {k}") for k, o in enumerate(objects))

    def holds(self, objects: list[dict[str, Any]]) -> bool:
        need = self.count if self.kind == "count" else 1
        return self.n_matching(objects) >= need

    def text(self, image_attr: bool = False) -> str:
        """'there is a cyan object'; with image_attr the first value is shown by `<image>`."""
        attrs = self.attrs()
        if image_attr:
            rest = {a: v for a, v in attrs.items() if a != self.attr}
            same = f"the same {self.attr} as the object in {IMAGE_PLACEHOLDER}"
            if self.kind == "count":
                return f"there are at least {self.count} {noun_phrase(rest, plural=True)} with {same}"
            return f"there is {_article(noun_phrase(rest))} with {same}"
        if self.kind == "count":
            return f"there are at least {self.count} {noun_phrase(attrs, plural=True)}"
        return f"there is {_article(noun_phrase(attrs))}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "attr": self.attr, "value": self.value}
        if self.kind == "count":
            d["count"] = self.count
        if self.kind == "and":
            d["attr2"], d["value2"] = self.attr2, self.value2
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Condition":
        return Condition(attr=d["attr"], value=d["value"], kind=d.get("kind", "exists"),
                         count=int(d.get("count", 1)), attr2=d.get("attr2"), value2=d.get("value2"))


COMPACT_INSTRUCTION = ("Start at #1. If the image shows what a section names, go to its id plus .1, else plus .2, "
                       "until a section gives the case.")


def compact_condition(cond: Condition, image_attr: bool = False) -> str:
    """A condition in the compact policy: 'metal', 'red cube', 'at least 2 red objects' (the words the scene lists);
    with `image_attr` (-M) the first value is shown by an image: 'color of <image>'."""
    if cond.kind == "count":
        return f"at least {cond.count} {noun_phrase(cond.attrs(), plural=True)}"
    attrs = cond.attrs()
    words = [attrs[a] for a in ("size", "color", "material", "shape") if a in attrs]
    if image_attr:
        words = [w for w in words if w != cond.value] + [f"{cond.attr} of {IMAGE_PLACEHOLDER}"]
    return " ".join(words)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# ----------------------------------------------------------------------------- tree
@dataclass
class Node:
    """A decision node (condition set, yes/no children) or a leaf (outcome set)."""

    id: str
    condition: Condition | None = None
    yes: "Node | None" = None
    no: "Node | None" = None
    outcome: str | None = None
    image: dict[str, str] | None = None  # -M: the object whose crop replaces the condition's value

    @property
    def is_leaf(self) -> bool:
        return self.condition is None


@dataclass
class Policy:
    name: str
    depth: int
    root: Node
    variant: str = "T"
    meta: dict[str, Any] = field(default_factory=dict)

    # -- walking
    def decision_nodes(self) -> list[Node]:
        """Decision nodes in section order (depth-first, yes before no): 1, 1.1, 1.1.1, ..., 1.2."""
        return [n for n in _walk(self.root) if not n.is_leaf]

    def leaves(self) -> list[Node]:
        return [n for n in _walk(self.root) if n.is_leaf]

    def outcomes(self) -> list[str]:
        return sorted((n.outcome for n in self.leaves()), key=_case_number)

    def evaluate(self, scene: dict[str, Any]) -> tuple[str, list[str], list[bool]]:
        """Walk the tree on a scene graph: (outcome, condition ids visited, answers given)."""
        objects = scene["objects"]
        node, path, answers = self.root, [], []
        while not node.is_leaf:
            ans = node.condition.holds(objects)
            path.append(node.id)
            answers.append(ans)
            node = node.yes if ans else node.no
        return node.outcome, path, answers

    def leaf_constraints(self) -> dict[str, list[tuple[Condition, bool]]]:
        """For every outcome, the (condition, answer) pairs on its path."""
        out: dict[str, list[tuple[Condition, bool]]] = {}

        def rec(node: Node, acc: list[tuple[Condition, bool]]) -> None:
            if node.is_leaf:
                out[node.outcome] = acc
                return
            rec(node.yes, acc + [(node.condition, True)])
            rec(node.no, acc + [(node.condition, False)])

        rec(self.root, [])
        return out

    def policy_images(self) -> list[dict[str, str]]:
        """-M: object specs of the image crops, in the order their placeholders appear in the text."""
        return [n.image for n in self.decision_nodes() if n.image is not None]

    # -- checks
    def validate(self) -> None:
        """Raise PolicyError naming the section and field at fault."""
        if self.depth < 1:
            raise PolicyError(f"policy {self.name}: depth (tree layers N) must be >= 1, got {self.depth}")
        seen: set[str] = set()
        for node in _walk(self.root):
            if node.is_leaf:
                if not node.outcome:
                    raise PolicyError(f"policy {self.name}: leaf under {node.id} has no outcome")
                if node.outcome in seen:
                    raise PolicyError(f"policy {self.name}: outcome {node.outcome!r} appears twice; leaves must be unique")
                seen.add(node.outcome)
                continue
            if node.yes is None or node.no is None:
                raise PolicyError(f"policy {self.name}: # Condition {node.id} needs both a yes and a no child")
            for attr, value in node.condition.attrs().items():
                if attr not in ATTRIBUTES:
                    raise PolicyError(
                        f"policy {self.name}: # Condition {node.id} tests attribute '{attr}', which scene "
                        f"objects do not have; use one of {list(ATTRIBUTES)}")
                if value not in ATTRIBUTES[attr]:
                    raise PolicyError(
                        f"policy {self.name}: # Condition {node.id} tests {attr}={value!r}; "
                        f"'{attr}' takes one of {list(ATTRIBUTES[attr])}")
            if not node.yes.is_leaf:
                shared = set(node.condition.attrs()) & set(node.yes.condition.attrs())
                if shared:
                    raise PolicyError(
                        f"policy {self.name}: # Condition {node.yes.id} is on the true edge of # Condition "
                        f"{node.id} and tests the same attribute type {sorted(shared)}")

    def unreachable_leaves(self) -> list[str]:
        """Outcomes that no CLEVR scene (3-10 objects) can reach."""
        return [o for o, cons in self.leaf_constraints().items() if find_witness(cons) is None]

    # -- text
    def render_text(self) -> str:
        """General instruction, the policy name, then one '# Condition <id>' section per node."""
        lines = [GENERAL_INSTRUCTION, "", f"Policy: {self.name}", ""]
        for node in self.decision_nodes():
            lines.append(f"# Condition {node.id}")
            lines.append(f"Check whether {_located(node.condition.text(image_attr=node.image is not None))}.")
            lines.append(f"- If yes, {_goto(node.yes)}")
            lines.append(f"- If no, {_goto(node.no)}")
            lines.append("")
        return "\n".join(lines).rstrip() + "\n"

    def render_compact(self) -> str:
        """The same tree in the toy presets' compact form: one line per section, the condition as its words
        and a leaf as its case. A toy learns to read it far faster than the paper's prose: every section id is
        one token of the toy tokenizer (`mpi.toy.COMPACT_TOKENS`), written once, so finding a section is a
        single look-up, and a child's id follows from its parent's (yes adds .1, no adds .2)."""
        lines = [f"Policy: {self.name}. {COMPACT_INSTRUCTION}"]
        lines += [f"#{node.id} {compact_condition(node.condition, node.image is not None)}"
                  for node in self.decision_nodes()]
        lines += [f"#{leaf.id} {leaf.outcome}" for leaf in sorted(self.leaves(), key=lambda n: n.id)]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        def rec(node: Node) -> dict[str, Any]:
            if node.is_leaf:
                return {"id": node.id, "outcome": node.outcome}
            d = {"id": node.id, "condition": node.condition.to_dict(), "yes": rec(node.yes), "no": rec(node.no)}
            if node.image is not None:
                d["image"] = node.image
            return d

        return {"name": self.name, "depth": self.depth, "variant": self.variant, "root": rec(self.root)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Policy":
        def rec(n: dict[str, Any]) -> Node:
            if "outcome" in n:
                return Node(id=n["id"], outcome=n["outcome"])
            if "condition" not in n:
                raise PolicyError(f"policy node {n.get('id', '?')}: needs 'condition' (decision) or 'outcome' (leaf)")
            return Node(id=n["id"], condition=Condition.from_dict(n["condition"]), yes=rec(n["yes"]),
                        no=rec(n["no"]), image=n.get("image"))

        policy = Policy(name=d["name"], depth=int(d["depth"]), root=rec(d["root"]), variant=d.get("variant", "T"))
        policy.validate()
        return policy


def _located(text: str) -> str:
    """'there is a cube' -> 'there is a cube in the image' (before a 'with the same ...' clause)."""
    if " with the same " in text:
        return text.replace(" with the same ", " in the image with the same ", 1)
    return text + " in the image"


def _goto(child: Node) -> str:
    return f'the response is "{child.outcome}".' if child.is_leaf else f"go to # Condition {child.id}."


def _walk(node: Node) -> Iterator[Node]:
    yield node
    if not node.is_leaf:
        yield from _walk(node.yes)
        yield from _walk(node.no)


def _case_number(outcome: str) -> int:
    return int(outcome.split()[-1])


# ----------------------------------------------------------------------------- satisfiability
ALL_OBJECT_TYPES = [dict(zip(ATTRIBUTES, combo)) for combo in itertools.product(*ATTRIBUTES.values())]


def _all_hold(constraints: list[tuple[Condition, bool]], objects: list[dict[str, str]]) -> bool:
    return all(c.holds(objects) == want for c, want in constraints)


@functools.lru_cache(maxsize=4096)
def _type_mask(cond: Condition) -> int:
    """Bit i set when object type ALL_OBJECT_TYPES[i] matches the condition's attributes."""
    return sum(1 << i for i, t in enumerate(ALL_OBJECT_TYPES) if cond.matches(t))


def _bits(mask: int) -> list[int]:
    return [i for i in range(len(ALL_OBJECT_TYPES)) if mask >> i & 1]


def find_witness(
    constraints: list[tuple[Condition, bool]],
    rng: random.Random | None = None,
    n_objects: tuple[int, int] = (3, 10),
    tries: int = 30,
) -> list[dict[str, str]] | None:
    """A list of objects (3-10) meeting every (condition, answer) pair, or None if none was found.

    Negative `exists`/`and` answers remove object types; positive answers each need matching
    objects. For those kinds this search is exact; for `count` it is a randomized search whose
    witnesses are always checked (so a returned witness is always right).
    """
    rng = rng or random.Random(0)
    lo, hi = n_objects
    allowed_mask = (1 << len(ALL_OBJECT_TYPES)) - 1
    capped_mask = 0
    for c, want in constraints:
        if not want and c.kind != "count":
            allowed_mask &= ~_type_mask(c)
        elif not want:
            capped_mask |= _type_mask(c)
    allowed = _bits(allowed_mask)
    if not allowed:
        return None
    positives = [c for c, want in constraints if want]
    matching_by = {c: _bits(allowed_mask & _type_mask(c)) for c in positives}
    if any(not m for m in matching_by.values()):
        return None  # exact: no allowed object type can satisfy this positive answer
    # pad with objects that no "fewer than k" answer counts, when there are such objects
    safe = _bits(allowed_mask & ~capped_mask) or allowed
    for attempt in range(tries):
        idx: list[int] = []
        for cond in positives:
            mask = _type_mask(cond)
            have = sum(mask >> i & 1 for i in idx)
            need = (cond.count if cond.kind == "count" else 1) - have
            matching = matching_by[cond]
            for _ in range(max(0, need)):
                idx.append(rng.choice(matching) if attempt else matching[0])
        if len(idx) > hi:
            continue
        target = max(lo, len(idx)) if attempt == 0 else rng.randint(max(lo, len(idx)), hi)
        while len(idx) < target:
            idx.append(rng.choice(safe))
        objects = [dict(ALL_OBJECT_TYPES[i]) for i in idx]
        if _all_hold(constraints, objects):
            return objects
    return None


def sample_objects_for(
    rng: random.Random, constraints: list[tuple[Condition, bool]], n_objects: tuple[int, int] = (3, 10), tries: int = 50
) -> list[dict[str, str]] | None:
    """Random objects that follow a path: used for outcome-balanced sampling (then re-checked)."""
    for _ in range(tries):
        objects = find_witness(constraints, rng=rng, n_objects=n_objects, tries=1 + rng.randint(1, 3))
        if objects is not None:
            rng.shuffle(objects)
            return objects
    return find_witness(constraints, n_objects=n_objects)


# ----------------------------------------------------------------------------- natural scenes per path
class UnreachableOutcome(RuntimeError):
    """No natural scene reaches an outcome (or none did within the sampling budget)."""


def _is_type_set(cond: Condition) -> bool:
    # "at least 1 matching object" is a plain exists over a set of object types
    return cond.kind in ("exists", "and") or (cond.kind == "count" and cond.count <= 1)


def natural_object_types(rng: random.Random, n_objects: tuple[int, int]) -> list[int]:
    """Type indices of one natural scene: count uniform over n_objects, each object uniform over the
    96 types, i.e. each attribute uniform and independent, like `scenes.sample_scene`."""
    n_types = len(ALL_OBJECT_TYPES)
    return [rng.randrange(n_types) for _ in range(rng.randint(*n_objects))]


# value index of every attribute for every object type: (96, 4)
_TYPE_VALUE = [[list(ATTRIBUTES[a]).index(t[a]) for a in ATTRIBUTES] for t in ALL_OBJECT_TYPES]


class NaturalPathSampler:
    """Objects of a natural scene conditioned on following one path of a tree.

    Natural means `scenes.sample_scene`'s distribution: the object count uniform over `n_objects`,
    every object uniform over the 96 object types. Conditioning on the path is what rejection
    sampling does (draw natural scenes, keep those whose walk ends at the target outcome). For
    paths of `exists`/`and` conditions it is done here exactly, without rejections, so rare
    outcomes cost nothing and the draws have the distribution of rejection sampling:

    - a "no" answer removes the matching types, so objects are drawn from an allowed set A;
    - each "yes" answer j needs at least one object in P_j = A & match_j. By inclusion-exclusion,
      F(k, R) = P(k objects drawn from A hit every P_j, j in R)
              = sum over S subset of R of (-1)^|S| (1 - q(union_{j in S} P_j))^k,
      q(X) being the chance that one object drawn from A falls in X;
    - the count n is drawn with weight w(n) (V_A / V)^n F(n, all), then the objects one at a time:
      the next object's group g (the P_j it hits) with weight q(g) F(objects left, R minus g),
      and a type inside the group in proportion to its weight.

    Weights generalize the natural sampler before conditioning: the count n with weight
    `count_weights` w(n), each object's type with probability v(type) / V (`type_weights` v; q is v
    restricted to A). With the defaults (w = 1, v = 1: q uniform on A, V_A/V = |A|/96) this is
    exactly natural sampling given the path. `fit_balance_weights` picks w and v so that a balanced
    mix of outcomes keeps the natural count and attribute statistics.

    Paths with `count` conditions (at least 2 or 3 matching objects) use plain rejection from
    natural scenes (weights ignored), at most `budget` draws per scene, and raise
    `UnreachableOutcome` beyond it.
    """

    def __init__(self, constraints: list[tuple[Condition, bool]], n_objects: tuple[int, int] = (3, 10),
                 label: str = "path", budget: int = 200_000, count_weights: list[float] | None = None,
                 type_weights: list[float] | None = None) -> None:
        self.constraints = list(constraints)
        self.n_objects = (int(n_objects[0]), int(n_objects[1]))
        self.label = label
        self.budget = budget
        self.exact = all(_is_type_set(c) for c, _ in self.constraints)
        self._checks = [(_type_mask(c), c.count if c.kind == "count" else 1, want) for c, want in self.constraints]
        if not self.exact:
            return
        allowed = (1 << len(ALL_OBJECT_TYPES)) - 1
        for c, want in self.constraints:
            if not want:
                allowed &= ~_type_mask(c)
        positives = [_type_mask(c) & allowed for c, want in self.constraints if want]
        self.allowed = _bits(allowed)
        self.m = len(positives)
        self.full = (1 << self.m) - 1
        # signature of an allowed type: the bitmask of the positive sets it falls in
        self.signature = [sum(1 << j for j, p in enumerate(positives) if p >> t & 1) for t in self.allowed]
        lo, hi = self.n_objects
        natural = _path_tables(self.allowed, self.signature, self.m, [1.0] * len(ALL_OBJECT_TYPES), hi)
        self._p_natural = float(sum(natural["base"][lo:]) / (hi - lo + 1))
        self.set_weights(count_weights, type_weights)

    # -- tables
    def set_weights(self, count_weights: list[float] | None, type_weights: list[float] | None) -> None:
        """Tilt the sampler this path conditions (None: natural); see the class docstring."""
        import numpy as np

        lo, hi = self.n_objects
        v = np.ones(len(ALL_OBJECT_TYPES)) if type_weights is None else np.asarray(type_weights, dtype=float)
        w = np.ones(hi - lo + 1) if count_weights is None else np.asarray(count_weights, dtype=float)
        tables = _path_tables(self.allowed, self.signature, self.m, v, hi)
        self._F = tables["F"].tolist()  # F[k][R], k = 0..hi
        self._base = tables["base"][lo:]  # (V_A/V)^n F(n, all), n = lo..hi
        self._n_weights = (w * self._base).tolist()
        groups: dict[int, list[int]] = {}
        for t, sig in zip(self.allowed, self.signature):
            groups.setdefault(sig, []).append(t)
        total = float(v[self.allowed].sum()) if self.allowed else 1.0
        self._groups = []
        for sig, types in sorted(groups.items()):
            tw = [float(v[t]) for t in types]
            self._groups.append((sig, types, tw, sum(tw) / total))

    def f(self, k: int, need: int) -> float:
        """P(k objects drawn from the allowed types hit every positive set in the bitmask `need`)."""
        return self._F[k][need]

    def probability(self) -> float | None:
        """P(a natural scene follows this path); None when not computed exactly (`count` paths)."""
        return self._p_natural if self.exact else None

    def sample_types(self, rng: random.Random) -> list[int]:
        """Type indices (into ALL_OBJECT_TYPES) of one scene that follows the path."""
        if not self.exact:
            return self._reject(rng)
        if not any(w > 0 for w in self._n_weights):
            raise UnreachableOutcome(
                f"{self.label}: no scene of {self.n_objects[0]}-{self.n_objects[1]} objects follows this path")
        n = self.n_objects[0] + _pick(rng, self._n_weights)
        need, types, F = self.full, [], self._F
        for left in range(n - 1, -1, -1):
            row = F[left]
            k = _pick(rng, [q * row[need & ~sig] for sig, _, _, q in self._groups])
            sig, group, tw, _ = self._groups[k]
            types.append(group[_pick(rng, tw)] if len(group) > 1 else group[0])
            need &= ~sig
        return types

    def holds(self, types: list[int]) -> bool:
        return all((sum(mask >> t & 1 for t in types) >= need) == want for mask, need, want in self._checks)

    def _reject(self, rng: random.Random) -> list[int]:
        for _ in range(self.budget):
            types = natural_object_types(rng, self.n_objects)
            if self.holds(types):
                return types
        raise UnreachableOutcome(
            f"{self.label}: none of {self.budget:,} natural scenes ({self.n_objects[0]}-{self.n_objects[1]} objects) "
            f"followed this path; the outcome is too rare to balance. Use balanced=False, fewer layers, or "
            f"only 'exists'/'and' conditions (sampled exactly)")


@functools.lru_cache(maxsize=8192)
def _subset_structure(signature: tuple[int, ...], m: int, hi: int) -> tuple[Any, Any, Any]:
    """What F's tables need besides the weights: which types fall in each union of positive sets,
    the inclusion-exclusion signs and the powers k = 0..hi (shared by paths of the same shape)."""
    import numpy as np

    subsets = np.arange(1 << m)
    hits = ((np.asarray(signature, dtype=np.int64)[None, :] & subsets[:, None]) != 0).astype(float)
    sign = np.where(np.array([bin(x).count("1") for x in subsets]) % 2, -1.0, 1.0)
    return hits, sign, np.arange(hi + 1)[:, None]


def _path_tables(allowed: list[int], signature: list[int], m: int, v, hi: int) -> dict[str, Any]:
    """F[k, R] for k = 0..hi and every R (see NaturalPathSampler) and base[n] = (V_A/V)^n F(n, all)."""
    import numpy as np

    n_sets = 1 << m
    if not allowed:
        F = np.zeros((hi + 1, n_sets))
        F[0, 0] = 1.0
        return {"F": F, "base": np.zeros(hi + 1), "q": np.zeros(0)}
    hits, sign, powers = _subset_structure(tuple(signature), m, hi)
    v = np.asarray(v, dtype=float)
    va = v[allowed]
    q = va / va.sum()
    miss = np.clip(1.0 - hits @ q, 0.0, 1.0)  # P(one object misses every P_j, j in S), per S
    F = sign[None, :] * miss[None, :] ** powers
    # subset-sum (zeta) transform: F[k, R] = sum over S subset of R (one binary axis per positive set)
    F = F.reshape((hi + 1,) + (2,) * m)
    for axis in range(1, m + 1):
        F = np.cumsum(F, axis=axis)
    F = np.clip(F.reshape(hi + 1, n_sets), 0.0, 1.0)
    ratio = va.sum() / v.sum()
    base = ratio ** powers[:, 0] * F[:, n_sets - 1]
    return {"F": F, "base": base, "q": q}


def _mixture_statistics(paths: list[NaturalPathSampler], v, w) -> tuple[Any, Any]:
    """For an equal mix of the paths under weights (v per type, w per count): P(n) and E[objects of each type]."""
    import numpy as np

    lo, hi = paths[0].n_objects
    ns = np.arange(lo, hi + 1)
    p_n = np.zeros(len(ns))
    counts = np.zeros(len(ALL_OBJECT_TYPES))
    for path in paths:
        t = _path_tables(path.allowed, path.signature, path.m, v, hi)
        pn = w * t["base"][lo:]
        if pn.sum() <= 0:
            continue
        pn = pn / pn.sum()
        p_n += pn
        F = t["F"]
        full = path.full
        rest = full & ~np.asarray(path.signature)
        # E[objects of type t | n] = n q_t F(n-1, all minus sig_t) / F(n, all); where F(n, all) = 0, pn = 0
        f_all = F[ns, full]
        scale = np.divide(pn * ns, f_all, out=np.zeros_like(f_all), where=f_all > 0)
        counts[path.allowed] += t["q"] * (scale @ F[ns - 1][:, rest])
    return p_n / len(paths), counts / len(paths)


def fit_balance_weights(paths: list[NaturalPathSampler], iters: int = 300, tol: float = 0.002,
                        max_log: float = 3.0, step: float = 1.0) -> dict[str, Any]:
    """Weights that keep an equal mix of the outcomes close to natural scenes.

    Rejection sampling per outcome is exact, but an equal mix of outcomes is not the natural mix:
    "no small object" has 1-object scenes far more often than "a small cyan object". The weights
    w(n) (object count) and v(type) = prod over attributes of v_a(value) tilt the sampler that
    every outcome conditions (count with weight w(n), types with probability proportional to v),
    the same for all outcomes of a policy. Iterative scaling fits them so that the equal mix has a
    uniform object count over n_objects and uniform attribute values: the natural sampler's
    statistics. This family is the Lagrange solution of "draw each outcome's scenes as close to
    its natural conditional as possible (mean KL divergence) with those pooled statistics", so a
    converged fit changes the natural scenes as little as the statistics allow. Log-weights are
    capped at +-max_log; a tree whose balanced mix cannot reach the natural statistics (e.g. "is
    there a brown object?" at the root with 1-4 objects: half the scenes hold brown, so brown is
    at least 20% of objects) stops at the closest it gets, and `gap` says how close (the largest
    share error).
    """
    import numpy as np

    exact = [p for p in paths if p.exact]
    lo, hi = paths[0].n_objects
    n_bins = hi - lo + 1
    type_value = np.asarray(_TYPE_VALUE)
    log_v = [np.zeros(len(vals)) for vals in ATTRIBUTES.values()]
    log_w = np.zeros(n_bins)
    gap, best = 0.0, (math.inf, 0)
    if len(exact) < len(paths) or not exact:
        return {"count_weights": None, "type_weights": None, "gap": None, "iterations": 0}
    for it in range(iters):
        v = np.exp(sum(lv[type_value[:, a]] for a, lv in enumerate(log_v)))
        p_n, counts = _mixture_statistics(exact, v, np.exp(log_w))
        shares = [np.bincount(type_value[:, a], weights=counts, minlength=len(lv)) / counts.sum()
                  for a, lv in enumerate(log_v)]
        gap = max([np.abs(p_n - 1 / n_bins).max()] + [np.abs(s - 1 / len(s)).max() for s in shares])
        if gap < tol:
            break
        if gap < best[0] - 1e-4:
            best = (gap, it)
        elif it - best[1] >= 10:
            break  # stalled: the natural statistics are out of reach for this tree (see docstring)
        with np.errstate(divide="ignore"):
            log_w = np.clip(log_w + np.where(p_n > 0, np.log(1 / n_bins / np.maximum(p_n, 1e-300)), 0.0),
                            -max_log * n_bins, max_log * n_bins)
            for a, s in enumerate(shares):
                log_v[a] = np.clip(log_v[a] + step * np.log(1 / len(s) / np.maximum(s, 1e-300)), -max_log, max_log)
    v = np.exp(sum(lv[type_value[:, a]] for a, lv in enumerate(log_v)))
    # rounded, so that the draws do not hang on the last bits of floating-point sums
    return {"count_weights": [float(f"{x:.6g}") for x in np.exp(log_w - log_w.max())],
            "type_weights": [float(f"{x:.6g}") for x in v / v.max()], "gap": float(gap), "iterations": it + 1}


def _pick(rng: random.Random, weights: list[float]) -> int:
    """Index drawn with probability proportional to weights (one rng.random() call)."""
    total = sum(weights)
    x = rng.random() * total
    for i, w in enumerate(weights):
        x -= w
        if x < 0 and w > 0:
            return i
    return max(i for i, w in enumerate(weights) if w > 0)  # float round-off at the top end


# ----------------------------------------------------------------------------- generation
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def policy_name(rng: random.Random, depth: int, taken: set[str] | None = None) -> str:
    """A unique pronounceable name such as 'L3-Surinu' (consonant-vowel syllables)."""
    taken = taken if taken is not None else set()
    for _ in range(10_000):
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(3))
        name = f"L{depth}-{word.capitalize()}"
        if name not in taken:
            taken.add(name)
            return name
    raise RuntimeError("ran out of policy names")


def _sample_condition(rng: random.Random, kinds: tuple[str, ...], banned_attrs: set[str]) -> Condition:
    kind = rng.choice(kinds)
    attrs = [a for a in ATTRIBUTES if a not in banned_attrs]
    attr = rng.choice(attrs)
    value = rng.choice(ATTRIBUTES[attr])
    if kind == "count":
        return Condition(attr, value, kind="count", count=rng.choice((2, 3)))
    if kind == "and":
        others = [a for a in attrs if a != attr]
        if not others:
            return Condition(attr, value)
        attr2 = rng.choice(others)
        # keep CLEVR word order stable in the text: shape last
        return Condition(attr, value, kind="and", attr2=attr2, value2=rng.choice(ATTRIBUTES[attr2]))
    return Condition(attr, value)


def generate_policy(
    rng: random.Random,
    depth: int,
    name: str,
    kinds: tuple[str, ...] = ("exists",),
    variant: str = "T",
    image_fraction: float = 0.5,
    max_images: int = 6,
) -> Policy:
    """A random full binary decision tree with `depth` layers of conditions (2**depth outcomes)."""
    if not isinstance(depth, int) or depth < 1:
        raise PolicyError(f"depth (tree layers N) must be an integer >= 1, got {depth!r}")
    for kind in kinds:
        if kind not in CONDITION_KINDS:
            raise PolicyError(f"condition kind {kind!r} unknown; use some of {CONDITION_KINDS}")
    if variant not in ("T", "M"):
        raise PolicyError(f"variant must be 'T' (text policy) or 'M' (policy with image crops), got {variant!r}")

    def build(node_id: str, level: int, path: list[tuple[Condition, bool]], banned: set[str]) -> Node:
        if level > depth:
            return Node(id=node_id)  # outcome assigned below
        for _ in range(500):
            cond = _sample_condition(rng, kinds, banned)
            if any(cond == c for c, _ in path):
                continue
            # both answers must stay possible, or a leaf below would be unreachable
            if find_witness(path + [(cond, True)]) is None or find_witness(path + [(cond, False)]) is None:
                continue
            break
        else:
            raise _Stuck(node_id)
        yes = build(node_id + ".1", level + 1, path + [(cond, True)], set(cond.attrs()))
        no = build(node_id + ".2", level + 1, path + [(cond, False)], set())
        return Node(id=node_id, condition=cond, yes=yes, no=no)

    for attempt in range(20):
        try:
            root = build("1", 1, [], set())
            break
        except _Stuck:
            continue  # a rare dead end deep in the tree: draw the whole tree again
    else:
        raise PolicyError(f"could not generate a depth-{depth} tree with kinds {kinds}; use fewer layers")
    policy = Policy(name=name, depth=depth, root=root, variant=variant)
    leaves = policy.leaves()
    cases = list(range(1, len(leaves) + 1))
    rng.shuffle(cases)
    for leaf, k in zip(leaves, cases):
        leaf.outcome = f"Case {k}"
    if variant == "M":
        add_policy_images(policy, rng, image_fraction, max_images)
    policy.validate()
    return policy


def add_policy_images(policy: Policy, rng: random.Random, fraction: float = 0.5, max_images: int = 6) -> None:
    """-M: show the tested value of some conditions as a rendered object instead of a word."""
    nodes = policy.decision_nodes()
    k = min(max_images, max(1, round(fraction * len(nodes))))
    chosen = set(n.id for n in rng.sample(nodes, k))
    for node in nodes:
        if node.id in chosen:
            # The crop shows the tested value; its other attributes are random, so only
            # "the same <attr> as the object in <image>" is meant.
            obj = {a: rng.choice(vals) for a, vals in ATTRIBUTES.items()}
            obj[node.condition.attr] = node.condition.value
            node.image = obj
    policy.variant = "M"
