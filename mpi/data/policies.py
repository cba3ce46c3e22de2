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
"""

from __future__ import annotations

import functools
import itertools
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
