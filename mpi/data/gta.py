"""GTAPolicy: a tool catalogue with versions, the paper's 24 tool-calling rules, and next-tool-call items.

The paper builds GTAPolicy from the GTA agent benchmark's real images. We cannot download them, so
every item's pictures are rendered here (signs and receipts to read, formulas, CLEVR-style scenes
to count in or to locate objects in), and the rest follows the paper: a synthetic user profile
(account_type A-D, credits, age), a query, an interaction history where the task needs one (e.g.
TextToBbox before RegionAttributeDescription) and the gold next call as JSON
`{"name": "OCR_v3", "arguments": {"image": "image/image_12.png"}}`.

The rules are the paper's 24 (its Figure 20): Rules 1-20
choose a tool's version from the profile, grouped by tool, Rule 7 (MathOCR) overriding Rules 4-6;
Rules 21-24 are tips (describe every image of a multi-image task first, TextToBbox before
RegionAttributeDescription, exact image names, GoogleSearch k = 1 / 4). Version rules are data, so
the override split re-renders them with the versions permuted as in the paper's Figure 10.

Every gold call, every call in an interaction history and every CoT follows those rules; an item's
`extra` records which rule branch decided (`rule_branch`, e.g. "5a" = Rule 5's "then" branch,
"5b" = its "otherwise" branch, "7" = MathOCR, "21" = describe an image first, "22" = TextToBbox
first, null when no rule picks the tool) and, for GoogleSearch items, whether the question is
open-ended (`open_ended`, which decides k by Rule 24).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from PIL import Image, ImageDraw, ImageFont

from .scenes import SHAPES, describe_object, render_scene, sample_object, sample_scene

# ----------------------------------------------------------------------------- catalogue
EXACT_ARGS = ("image", "position", "color", "k", "top1")  # paper: exact match
EVAL_ARGS = ("expression",)  # paper: eval() equality
BBOX_ARGS = ("bbox",)  # paper: IoU
# every other argument (text, query, attribute, keywords, instruction, annotation, command) is free text


@dataclass(frozen=True)
class Arg:
    name: str
    type: str
    required: bool = True
    description: str = ""
    default: Any = None  # for an optional argument: the value a call that omits it gets (None = JSON null)


@dataclass(frozen=True)
class Tool:
    name: str
    versions: int  # 0 = unversioned
    description: str
    args: tuple[Arg, ...]

    def call_names(self) -> list[str]:
        return [self.name] if not self.versions else [f"{self.name}_v{k}" for k in range(1, self.versions + 1)]


_IMG = Arg("image", "image", True, "the image's exact name, e.g. image/image_3.png")
_BBOX = Arg("bbox", "text", True, "the box as a string '(x1, y1, x2, y2)' in pixels")
TOOLS: tuple[Tool, ...] = (
    Tool("Calculator", 0, "Evaluates one Python arithmetic expression (functions of `math` allowed, no imports).",
         (Arg("expression", "text", True, "a Python expression such as '3.5 + 2 * 4'"),)),
    Tool("OCR", 5, "Recognizes the text in a photo and returns it.", (_IMG,)),
    Tool("CountGivenObject", 4, "Counts the objects of one kind in the image.",
         (_IMG, Arg("text", "text", True, "the object to count, in English"))),
    Tool("ImageDescription", 5, "Returns a brief description of the image.", (_IMG,)),
    Tool("GoogleSearch", 3, "Searches the web for the query and returns the top k results.",
         (Arg("query", "text", True, "what to search for"),
          Arg("k", "int", False, "the number of results to return", 10))),
    Tool("RegionAttributeDescription", 2, "Describes one attribute (color, material, ...) of a region of the image.",
         (_IMG, _BBOX, Arg("attribute", "text", True, "the attribute to describe"))),
    Tool("TextToBbox", 0, "Finds the region of the image that the text describes and returns its box.",
         (_IMG, Arg("text", "text", True, "the object to find"),
          Arg("top1", "bool", False, "true: return only the best-matching box; false: return every matching box",
              True))),
    Tool("Plot", 0, "Runs Python code with matplotlib; the code defines solution() that returns the figure.",
         (Arg("command", "text", True, "Python code"),)),
    Tool("MathOCR", 0, "Recognizes a math expression in the image and returns it in LaTeX.", (_IMG,)),
    Tool("Solver", 0, "Runs Python code with sympy; the code defines solution() that returns the answer as a string.",
         (Arg("command", "text", True, "Python code"),)),
    Tool("DrawBox", 0, "Draws a box on a region of the image.",
         (_IMG, _BBOX, Arg("annotation", "text", False, "a label written on the box", None))),
    Tool("AddText", 0, "Writes text on the image at a position.",
         (_IMG, Arg("text", "text", True, "the text to write"),
          Arg("position", "text", True, "where the text goes: the left-bottom corner '(x, y)' in pixels, or a "
              "two-letter code, l/m/r (left/middle/right) then t/m/b (top/middle/bottom), e.g. 'mt'"),
          Arg("color", "text", False, "text color", "red"))),
    Tool("TextToImage", 3, "Generates an image from keywords.", (Arg("keywords", "text", True, "what to draw"),)),
    Tool("ImageStylization", 3, "Changes the image according to an instruction.",
         (_IMG, Arg("instruction", "text", True, "what to change"))),
)
TOOL_BY_NAME = {t.name: t for t in TOOLS}


def render_catalogue() -> str:
    lines = ["## Tools", "Call exactly one tool per step. A tool with versions must be called by its full name, "
             "e.g. OCR_v3; all versions of a tool take the same arguments."]
    for tool in TOOLS:
        names = ", ".join(tool.call_names())
        lines.append(f"- {tool.name} ({'versions: ' + names if tool.versions else 'no versions'}): {tool.description}")
        for a in tool.args:
            req = "required" if a.required else f"optional, default {json.dumps(a.default)}"
            lines.append(f"    - {a.name} ({a.type}, {req}): {a.description}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Cond:
    text: str  # as the policy writes it, e.g. "credits > 250 and credits <= 750"
    test: Callable[[dict[str, Any]], bool]


@dataclass(frozen=True)
class Rule:
    """A version rule, one of two shapes (both rendered with explicit parentheses):
    "Rule id: if (when) then use tool_v<version>." or
    "Rule id: if (when) then (if (split) then use tool_v<then_version>; otherwise use tool_v<else_version>)."
    Its branches are labelled "<id>" (first shape) or "<id>a" / "<id>b" (then / otherwise)."""

    id: int
    tool: str
    when: Cond
    version: int | None = None
    split: Cond | None = None
    then_version: int | None = None
    else_version: int | None = None

    def call(self, version: int) -> str:
        return f"{self.tool}_v{version}"

    def branches(self) -> list[tuple[str, int]]:
        if self.split is None:
            return [(str(self.id), self.version)]
        return [(f"{self.id}a", self.then_version), (f"{self.id}b", self.else_version)]

    def branch(self, profile: dict[str, Any]) -> tuple[str, int] | None:
        """(label, version) of the branch the profile takes, or None when the rule does not apply."""
        if not self.when.test(profile):
            return None
        if self.split is None:
            return str(self.id), self.version
        return (f"{self.id}a", self.then_version) if self.split.test(profile) else (f"{self.id}b", self.else_version)

    def text(self) -> str:
        if self.split is None:
            return f"Rule {self.id}: if ({self.when.text}) then use {self.call(self.version)}."
        return (f"Rule {self.id}: if ({self.when.text}) then (if ({self.split.text}) then use "
                f"{self.call(self.then_version)}; otherwise use {self.call(self.else_version)}).")

    def remap(self, new_version: Callable[[int], int]) -> "Rule":
        if self.split is None:
            return replace(self, version=new_version(self.version))
        return replace(self, then_version=new_version(self.then_version), else_version=new_version(self.else_version))


def _account(*types: str) -> Cond:
    words = types[0] if len(types) == 1 else ", ".join(types[:-1]) + " or " + types[-1]
    return Cond(f"account_type is {words}", lambda p: p["account_type"] in types)


def _range(key: str, lo: int | None, hi: int | None, lo_incl: bool = False, hi_incl: bool = False) -> Cond:
    """lo < key (or <=) and key < hi (or <=); the text spells both comparisons out."""
    parts, tests = [], []
    if lo is not None:
        parts.append(f"{key} {'>=' if lo_incl else '>'} {lo}")
        tests.append((lambda v, lo=lo: v >= lo) if lo_incl else (lambda v, lo=lo: v > lo))
    if hi is not None:
        parts.append(f"{key} {'<=' if hi_incl else '<'} {hi}")
        tests.append((lambda v, hi=hi: v <= hi) if hi_incl else (lambda v, hi=hi: v < hi))
    return Cond(" and ".join(parts), lambda p: all(t(p[key]) for t in tests))


def version_rules() -> list[Rule]:
    """Rules 1-20 of the paper (Rule 7, MathOCR, depends on the image, not the profile: see Rulebook)."""
    ID, GS, TI = "ImageDescription", "GoogleSearch", "TextToImage"
    RAD, CGO, IS = "RegionAttributeDescription", "CountGivenObject", "ImageStylization"
    return [
        Rule(1, ID, _account("A"), version=5),
        Rule(2, ID, _account("B", "C"), split=_range("credits", 500, None), then_version=4, else_version=3),
        Rule(3, ID, _account("D"), split=_range("credits", 500, None), then_version=2, else_version=1),
        Rule(4, "OCR", _range("credits", None, 250, hi_incl=True), version=5),
        Rule(5, "OCR", _range("credits", 250, 750, hi_incl=True), split=_account("A", "B"),
             then_version=4, else_version=3),
        Rule(6, "OCR", _range("credits", 750, None), split=_range("age", None, 21), then_version=2, else_version=1),
        Rule(8, GS, _range("age", None, 21), version=1),
        Rule(9, GS, _range("age", 21, None, lo_incl=True), split=_range("credits", None, 500),
             then_version=2, else_version=3),
        Rule(10, TI, _account("A", "B", "C"), version=1),
        Rule(11, TI, _account("D"), split=_range("credits", 500, None), then_version=2, else_version=3),
        Rule(12, RAD, _account("A", "B"), version=2),
        Rule(13, RAD, _account("C", "D"), version=1),
        Rule(14, CGO, _range("credits", None, 250), version=1),
        Rule(15, CGO, _range("credits", 250, 500, lo_incl=True), version=2),
        Rule(16, CGO, _range("credits", 500, 750, lo_incl=True), version=3),
        Rule(17, CGO, _range("credits", 750, None, lo_incl=True), version=4),
        Rule(18, IS, _range("age", None, 21), version=1),
        Rule(19, IS, _range("age", 21, 60, lo_incl=True), version=2),
        Rule(20, IS, _range("age", 60, None, lo_incl=True), version=3),
    ]


RULE_GROUPS = ("ImageDescription", "OCR", "GoogleSearch", "TextToImage", "RegionAttributeDescription",
               "CountGivenObject", "ImageStylization")
MATH_RULE = ("Rule 7: if (the image contains mathematical expressions, e.g. a formula or an equation) then use "
             "MathOCR instead of any OCR version. Rule 7 overrides Rules 4-6: for an image with mathematical "
             "expressions, MathOCR is the call whatever the profile.")
HOW_TO_APPLY = (
    "How to apply the rules. The profile is the user's account_type (A, B, C or D), credits and age.",
    "1. Rules 21 and 22 are checked first, Rule 21 before Rule 22: they can require another call before the "
    "tool the request needs.",
    "2. Then Rules 1-20 choose the version of the tool to call. They are grouped by tool. Within a group the rules "
    "are checked in order and the first rule that applies decides; the later rules of the group are not used. "
    "One exception: Rule 7 overrides Rules 4-6, so for OCR check Rule 7 first.",
    "3. Rules 23 and 24 fix arguments of every call.",
    "A rule reads \"if (condition) then use X\" or \"if (condition) then (if (condition 2) then use X; otherwise "
    "use Y)\": each condition in parentheses is checked as a whole, and \"otherwise\" means that condition 2 "
    "is false.",
)
TIP_RULES = (
    "Rule 21 (several images): if (the task has more than one image) then, before calling any other tool, call an "
    "ImageDescription version (chosen by Rules 1-3) on each image that no earlier ImageDescription call in the "
    "calls so far has described, one image per call, in the order the images are listed.",
    "Rule 22 (regions): before calling a RegionAttributeDescription version, get the region's box with TextToBbox "
    "(unless an earlier TextToBbox call already returned it); pass the box as bbox in the format (x1, y1, x2, y2).",
    "Rule 23 (image names): every image argument is the exact image name given in the task, e.g. image/image_1.png.",
    "Rule 24 (GoogleSearch k): if (the question is not open-ended: it asks for one fact, such as a name, a year or a "
    "number) then set k to 1; otherwise (an open-ended question, e.g. asking for reviews, ideas or "
    "recommendations) set k to 4.",
)


@dataclass(frozen=True)
class Decision:
    """Which call a rule group picks: `name` (e.g. "OCR_v4", "MathOCR"), the deciding `branch` label
    ("5a", "7", ...; None for a tool without a version rule) and `reason`, the CoT sentences."""

    name: str
    branch: str | None
    reason: str


@dataclass
class Rulebook:
    name: str
    rules: list[Rule] = field(default_factory=version_rules)

    def group(self, tool: str) -> list[Rule]:
        return [r for r in self.rules if r.tool == tool]

    def decide(self, tool: str, profile: dict[str, Any], *, math: bool = False) -> Decision:
        """The first rule of `tool`'s group that applies; `math=True` (an OCR image holding math) is Rule 7."""
        if tool == "OCR" and math:
            return Decision("MathOCR", "7", "Rule 7 applies: the image contains a mathematical expression, and "
                                            "Rule 7 overrides Rules 4-6, so MathOCR.")
        group = self.group(tool)
        if not group:
            return Decision(tool, None, f"{tool} has a single version, so no version rule applies.")
        said = ["Rule 7 does not apply: the image holds no mathematical expression."] if tool == "OCR" else []
        for rule in group:
            hit = rule.branch(profile)
            if hit is None:
                said.append(f"Rule {rule.id} does not apply: ({rule.when.text}) is false.")
                continue
            label, version = hit
            why = f"Rule {rule.id} applies: ({rule.when.text}) is true"
            if rule.split is not None:
                why += f" and ({rule.split.text}) is {'true' if label.endswith('a') else 'false'}"
            said.append(f"{why}, so {rule.call(version)}.")
            return Decision(rule.call(version), label, " ".join(said))
        raise AssertionError(f"no rule of the {tool} group applies to {profile}; the rules leave a gap")

    def version(self, tool: str, profile: dict[str, Any], *, math: bool = False) -> str:
        return self.decide(tool, profile, math=math).name

    def branches(self, tool: str) -> list[tuple[str, int]]:
        """(label, version) of every branch of `tool`'s rules, in rule order."""
        return [b for r in self.group(tool) for b in r.branches()]

    def render_text(self) -> str:
        lines = [
            "You are a tool-using assistant. Given the user's profile, images, request and the calls made so far, "
            "give the next tool call as JSON {\"name\": ..., \"arguments\": {...}}. Follow the tool-calling policy.",
            "",
            f"Policy: {self.name}",
            "",
            render_catalogue(),
            "",
            "## Rules",
            *HOW_TO_APPLY,
        ]
        for tool in RULE_GROUPS:
            lines += ["", f"### {tool} version (Rules {_span(self.group(tool), tool)})"]
            lines += [r.text() for r in self.group(tool)]
            if tool == "OCR":
                lines.append(MATH_RULE)
        lines += ["", "### Tips (Rules 21-24)", *TIP_RULES]
        return "\n".join(lines) + "\n"


def _span(rules: list[Rule], tool: str) -> str:
    ids = [r.id for r in rules] + ([7] if tool == "OCR" else [])
    return f"{min(ids)}-{max(ids)}" if len(ids) > 1 else str(ids[0])


def override_version(tool: str, version: int) -> int:
    """The paper's override (Figure 10) renumbers OCR's versions backwards, v -> 6 - v (v5 <-> v1, v4 <-> v2,
    v3 stays); every versioned tool is renumbered the same way, v -> n + 1 - v for its n versions."""
    return TOOL_BY_NAME[tool].versions + 1 - version


def override_rulebook(base: Rulebook, rng: random.Random | None = None) -> Rulebook:
    """Same name, same conditions, versions permuted as in the paper's override example (see
    `override_version`). `rng` is accepted for older callers and not used: the permutation is fixed."""
    return Rulebook(base.name, [r.remap(lambda v, t=r.tool: override_version(t, v)) for r in base.rules])


# ----------------------------------------------------------------------------- images
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(6, size))  # bundled with Pillow: same glyphs everywhere


@dataclass
class ImageSpec:
    kind: str  # "text" | "formula" | "scene"
    lines: list[str] = field(default_factory=list)
    scene: dict[str, Any] | None = None
    path: str = ""


def render_spec(spec: ImageSpec, size: int) -> Image.Image:
    if spec.kind == "scene":
        return render_scene(spec.scene, size)
    bg = (250, 248, 240) if spec.kind == "text" else (255, 255, 255)
    img = Image.new("RGB", (size * 2, size * 2), bg)  # draw at 2x, then downsample
    draw = ImageDraw.Draw(img)
    n = max(1, len(spec.lines))
    fsize = int(size * 2 * 0.8 / max(n + 1, max(len(t) for t in spec.lines) * 0.55))
    font = _font(fsize)
    y = (size * 2 - n * fsize * 1.3) / 2
    for line in spec.lines:
        w = draw.textlength(line, font=font)
        draw.text(((size * 2 - w) / 2, y), line, fill=(20, 20, 30) if spec.kind == "text" else (10, 10, 120), font=font)
        y += fsize * 1.3
    if spec.kind == "text":
        draw.rectangle([4, 4, size * 2 - 5, size * 2 - 5], outline=(120, 110, 90), width=max(2, size // 28))
    return img.resize((size, size), Image.Resampling.LANCZOS)


# ----------------------------------------------------------------------------- tasks
WORDS = ("OPEN", "EXIT", "CAFE", "SALE", "PARK", "STOP", "HOTEL", "BAKERY", "LIBRARY", "MUSEUM", "PHARMACY",
         "NO PARKING", "WELCOME", "GATE 12", "PLATFORM 3", "FRESH BREAD", "CITY HALL", "GARDEN")
BOOKS = ("The Silent River", "Stars Over Lima", "A Short Walk Home", "The Glass Orchard", "Winter Harbor",
         "The Last Lighthouse", "Paper Moons", "Echoes of Kyoto")
GOODS = ("apple", "milk", "bread", "coffee", "eggs", "rice", "tea", "butter", "cheese", "juice")
POSITIONS = {"top left": "lt", "top center": "mt", "top right": "rt", "center left": "lm", "center": "mm",
             "center right": "rm", "bottom left": "lb", "bottom center": "mb", "bottom right": "rb"}
STYLES = ("a watercolor painting", "a pencil sketch", "an oil painting", "a cartoon", "a mosaic", "night time")
PROMPTS = ("a cat riding a bicycle", "a red lighthouse at sunset", "a robot reading a book", "a snowy mountain village",
           "two dogs playing in a park", "a castle on a floating island")
# Rule 24: a question for one fact (k = 1) or an open-ended one (k = 4). Each is (request, search query).
CLOSED_SEARCHES = (("Who wrote the book in the picture?", "author of the book {t}"),
                   ("In which year was the book in the picture first published?", "{t} book first published year"))
OPEN_SEARCHES = (("Find some reviews of the book in the picture.", "{t} book reviews"),
                 ("Recommend some books similar to the one in the picture.", "books similar to {t}"))
SEARCH_K = {False: 1, True: 4}  # Rule 24, keyed by "the question is open-ended"


def sample_profile(rng: random.Random) -> dict[str, Any]:
    return {"account_type": rng.choice("ABCD"), "credits": rng.randint(0, 1000), "age": rng.randint(13, 80)}


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


def _bbox_str(b: list[int]) -> str:
    return f"({b[0]}, {b[1]}, {b[2]}, {b[3]})"


def describe_scene(scene: dict[str, Any]) -> str:
    """What an ImageDescription call returns in an interaction history."""
    objs = [describe_object(o) for o in scene["objects"]]
    return f"A rendered scene with {len(objs)} objects on a gray floor: " + ", ".join(objs) + "."


@dataclass
class _Item:
    """What a task builds: the images, the request, the calls so far and the gold next call, plus the
    rule branch that decided the gold call and the CoT sentences."""

    specs: list[ImageSpec]
    query: str
    history: list[dict[str, Any]]
    gold: dict[str, Any]
    branch: str | None
    cot: list[str]
    notes: dict[str, Any] = field(default_factory=dict)


class _Ctx:
    """Per-item state shared by the task builders: the rng, the rulebook, the image names and `slot`, the
    item's index among the split's items of its task (it cycles the rule branches so every branch is reached)."""

    def __init__(self, rng: random.Random, rules: Rulebook, base: Rulebook, size: int, paths: list[str],
                 slot: int, override: bool) -> None:
        self.rng, self.rules, self.base, self.size, self.paths = rng, rules, base, size, paths
        self.slot, self.override = slot, override
        self.profile: dict[str, Any] = {}

    def random_profile(self) -> dict[str, Any]:
        self.profile = sample_profile(self.rng)
        return self.profile

    def profile_for(self, tool: str, slot: int) -> dict[str, Any]:
        """A profile that takes branch number `slot` (mod the count) of `tool`'s rules. In the override split
        only branches whose version the override changes are used: an item there must tell the policies apart."""
        labels = [label for label, version in self.rules.branches(tool)
                  if not self.override or version != dict(self.base.branches(tool))[label]]
        target = labels[slot % len(labels)]
        for _ in range(10_000):
            profile = sample_profile(self.rng)
            if self.rules.decide(tool, profile).branch == target:
                self.profile = profile
                return profile
        raise RuntimeError(f"no sampled profile reaches branch {target} of the {tool} rules")

    def versioned(self, tool: str, *, math: bool = False) -> Decision:
        return self.rules.decide(tool, self.profile, math=math)


def _unique_scene(rng: random.Random, size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A scene with exactly one object of some shape, so 'the <shape>' names one region."""
    shape = rng.choice(SHAPES)
    target = sample_object(rng, shape=shape)
    others = [sample_object(rng, shape=rng.choice([s for s in SHAPES if s != shape])) for _ in range(rng.randint(2, 5))]
    scene = sample_scene(rng, size, objects=[target] + others)
    return scene, scene["objects"][0]


def _image_sentence(path: str) -> str:
    return f"Rule 23: the image argument is the exact name {path}."


def _ocr_history(c: _Ctx, path: str, result: str) -> tuple[dict[str, Any], str]:
    d = c.versioned("OCR")
    return {**_call(d.name, image=path), "result": result}, d.name


def _task_ocr(c: _Ctx) -> _Item:
    c.profile_for("OCR", c.slot)
    word = c.rng.choice(WORDS)
    q = c.rng.choice(("What does the sign in the image say?", "Read the text in this picture.",
                      "What is written on the sign?"))
    d = c.versioned("OCR")
    return _Item([ImageSpec("text", [word], path=c.paths[0])], q, [], _call(d.name, image=c.paths[0]), d.branch,
                 ["The request is to read the text in the image, which needs OCR.", d.reason,
                  _image_sentence(c.paths[0])])


def _formula(rng) -> tuple[str, str]:
    a, b, k = rng.randint(2, 9), rng.randint(1, 20), rng.randint(21, 60)
    return f"{a}x + {b} = {k}", f"Eq({a}*x + {b}, {k})"


def _task_mathocr(c: _Ctx) -> _Item:
    c.random_profile()
    shown, _ = _formula(c.rng)
    q = c.rng.choice(("Read the text in this picture.", "What is the formula in the image?",
                      "Transcribe what is written in the image."))
    d = c.versioned("OCR", math=True)
    return _Item([ImageSpec("formula", [shown], path=c.paths[0])], q, [], _call(d.name, image=c.paths[0]), d.branch,
                 ["The request is to read the image, which needs OCR.", d.reason, _image_sentence(c.paths[0])])


def _task_count(c: _Ctx) -> _Item:
    """Four shapes, cycled: one image; two images both described; two with none or only the first described
    (Rule 21). The two shapes that call CountGivenObject come first in the cycle and take its rule branches in
    turn, so its four branches (Rules 14-17) are reached within six count items (by item 82 of a split: the
    paper-size test split of 106 items reaches them all; it reached two when the branch advanced once per cycle)."""
    state, cycle = c.slot % 4, c.slot // 4
    n_images, n_described = ((1, 0), (2, 2), (2, 0), (2, 1))[state]
    slot = 2 * cycle + state if state < 2 else cycle  # CountGivenObject: a branch per counting item
    specs = [ImageSpec("scene", scene=sample_scene(c.rng, c.size), path=p) for p in c.paths[:n_images]]
    which = c.rng.randrange(n_images)
    attr = c.rng.choice(("shape", "color"))
    obj = c.rng.choice(specs[which].scene["objects"])
    thing = obj["shape"] + "s" if attr == "shape" else f"{obj['color']} objects"
    where = "" if n_images == 1 else (" in the first image" if which == 0 else " in the second image")
    q = f"How many {thing} are there{where}?"
    text = obj["shape"] if attr == "shape" else f"{obj['color']} object"
    if n_images > 1 and n_described < n_images:  # Rule 21: the next call describes the first undescribed image
        c.profile_for("ImageDescription", slot)
    else:
        c.profile_for("CountGivenObject", slot)
    desc = c.versioned("ImageDescription")
    history = [{**_call(desc.name, image=s.path), "result": describe_scene(s.scene)} for s in specs[:n_described]]
    cot = [f"The request is to count {thing}{where}, which needs CountGivenObject."]
    if n_images > 1 and n_described < n_images:
        target = c.paths[n_described]
        done = "none of them" if n_described == 0 else "only " + ", ".join(c.paths[:n_described])
        cot += [f"The task has {n_images} images and the calls so far describe {done}, so Rule 21 applies: first "
                f"call ImageDescription on {target}, the first image not described yet.", desc.reason,
                _image_sentence(target)]
        return _Item(specs, q, history, _call(desc.name, image=target), "21", cot)
    if n_images > 1:
        cot.append(f"The task has {n_images} images and the calls so far describe all of them, so Rule 21 "
                   "asks for nothing more.")
    d = c.versioned("CountGivenObject")
    cot += [d.reason, _image_sentence(c.paths[which])]
    return _Item(specs, q, history, _call(d.name, image=c.paths[which], text=text), d.branch, cot)


def _task_describe(c: _Ctx) -> _Item:
    c.profile_for("ImageDescription", c.slot)
    q = c.rng.choice(("Describe this image.", "What is in this picture?", "Give me a short description of the image."))
    d = c.versioned("ImageDescription")
    return _Item([ImageSpec("scene", scene=sample_scene(c.rng, c.size), path=c.paths[0])], q, [],
                 _call(d.name, image=c.paths[0]), d.branch,
                 ["The request is to describe the image, which needs ImageDescription.", d.reason,
                  _image_sentence(c.paths[0])])


def _task_locate(c: _Ctx) -> _Item:
    c.random_profile()
    scene, obj = _unique_scene(c.rng, c.size)
    q = f"Where is the {obj['shape']} in the image?"
    return _Item([ImageSpec("scene", scene=scene, path=c.paths[0])], q, [],
                 _call("TextToBbox", image=c.paths[0], text=obj["shape"], top1=True), None,
                 [f"The request is to locate the one {obj['shape']}, which needs TextToBbox with top1 true "
                  "(only the best box).", "TextToBbox has a single version, so no version rule applies.",
                  _image_sentence(c.paths[0])])


def _task_locate_all(c: _Ctx) -> _Item:
    c.random_profile()
    scene = sample_scene(c.rng, c.size)
    shape = c.rng.choice([o["shape"] for o in scene["objects"]])
    q = f"Find all the {shape}s in the image."
    return _Item([ImageSpec("scene", scene=scene, path=c.paths[0])], q, [],
                 _call("TextToBbox", image=c.paths[0], text=shape, top1=False), None,
                 [f"The request is to find every {shape}, which needs TextToBbox with top1 false (every matching "
                  "box).", "TextToBbox has a single version, so no version rule applies.",
                  _image_sentence(c.paths[0])])


def _task_region(c: _Ctx) -> _Item:
    c.profile_for("RegionAttributeDescription", c.slot)
    scene, obj = _unique_scene(c.rng, c.size)
    attribute = c.rng.choice(("color", "material"))
    q = f"What {attribute} is the {obj['shape']}?"
    first = _call("TextToBbox", image=c.paths[0], text=obj["shape"], top1=True)
    history = [{**first, "result": _bbox_str(obj["bbox"])}]
    d = c.versioned("RegionAttributeDescription")
    gold = _call(d.name, image=c.paths[0], bbox=_bbox_str(obj["bbox"]), attribute=attribute)
    return _Item([ImageSpec("scene", scene=scene, path=c.paths[0])], q, history, gold, d.branch,
                 [f"The request asks the {attribute} of the {obj['shape']}, which needs RegionAttributeDescription.",
                  f"TextToBbox already returned its box {_bbox_str(obj['bbox'])}, so Rule 22 is satisfied.",
                  d.reason, _image_sentence(c.paths[0])])


def _task_region_first(c: _Ctx) -> _Item:
    c.random_profile()
    scene, obj = _unique_scene(c.rng, c.size)
    attribute = c.rng.choice(("color", "material"))
    q = f"What {attribute} is the {obj['shape']}?"
    return _Item([ImageSpec("scene", scene=scene, path=c.paths[0])], q, [],
                 _call("TextToBbox", image=c.paths[0], text=obj["shape"], top1=True), "22",
                 [f"The request asks the {attribute} of the {obj['shape']}, which needs RegionAttributeDescription.",
                  "No call so far returned the region's box, so Rule 22 applies: call TextToBbox first, with top1 "
                  "true for the one box.", _image_sentence(c.paths[0])])


def _task_drawbox(c: _Ctx) -> _Item:
    c.random_profile()
    scene, obj = _unique_scene(c.rng, c.size)
    labelled = c.slot % 2 == 0
    q = f"Draw a box around the {obj['shape']}" + (" and label it." if labelled else ".")
    first = _call("TextToBbox", image=c.paths[0], text=obj["shape"], top1=True)
    history = [{**first, "result": _bbox_str(obj["bbox"])}]
    annotation = obj["shape"] if labelled else TOOL_BY_NAME["DrawBox"].args[2].default
    return _Item([ImageSpec("scene", scene=scene, path=c.paths[0])], q, history,
                 _call("DrawBox", image=c.paths[0], bbox=_bbox_str(obj["bbox"]), annotation=annotation), None,
                 [f"TextToBbox returned the box of the {obj['shape']}, so the next call is DrawBox with that box "
                  + (f"and annotation {obj['shape']}." if labelled else "and no label (annotation null)."),
                  "DrawBox has a single version, so no version rule applies.", _image_sentence(c.paths[0])])


def _task_receipt(c: _Ctx) -> _Item:
    c.random_profile()
    goods = c.rng.sample(GOODS, c.rng.randint(2, 4))
    prices = [f"{c.rng.randint(1, 9)}.{c.rng.choice((0, 25, 50, 75, 99)):02d}" for _ in goods]
    lines = [f"{it} {p}" for it, p in zip(goods, prices)]
    ocr, ocr_name = _ocr_history(c, c.paths[0], "\n".join(lines))
    q = "How much do the items on this receipt cost in total?"
    return _Item([ImageSpec("text", lines, path=c.paths[0])], q, [ocr],
                 _call("Calculator", expression=" + ".join(prices)), None,
                 [f"{ocr_name} returned the receipt's prices; the total is their sum, which needs Calculator.",
                  "Calculator has a single version and takes no image, so no rule of 1-24 constrains it."])


def _task_search(c: _Ctx) -> _Item:
    open_ended, slot = c.slot % 2 == 1, c.slot // 2
    c.profile_for("GoogleSearch", slot)
    title = c.rng.choice(BOOKS)
    ocr, ocr_name = _ocr_history(c, c.paths[0], title)
    ask, query = c.rng.choice(OPEN_SEARCHES if open_ended else CLOSED_SEARCHES)
    d = c.versioned("GoogleSearch")
    k = SEARCH_K[open_ended]
    kind = ("open-ended (it asks for several results)" if open_ended
            else "not open-ended (it asks for one fact)")
    return _Item([ImageSpec("text", ["A NOVEL", title], path=c.paths[0])], ask, [ocr],
                 _call(d.name, query=query.format(t=title), k=k), d.branch,
                 [f"{ocr_name} returned the title {title}; the request needs GoogleSearch.", d.reason,
                  f"Rule 24: the question is {kind}, so k = {k}."], {"open_ended": open_ended})


def _task_solve(c: _Ctx) -> _Item:
    c.random_profile()
    shown, sym = _formula(c.rng)
    history = [{**_call(c.versioned("OCR", math=True).name, image=c.paths[0]), "result": shown}]
    cmd = ("from sympy import symbols, Eq, solve\n"
           f"def solution():\n    x = symbols('x')\n    return str(solve({sym}, x))")
    return _Item([ImageSpec("formula", [shown], path=c.paths[0])], "Solve the equation in the image for x.", history,
                 _call("Solver", command=cmd), None,
                 [f"MathOCR returned the equation {shown}; solving it needs Solver.",
                  "Solver has a single version and takes no image, so no rule of 1-24 constrains it."])


def _task_plot(c: _Ctx) -> _Item:
    c.random_profile()
    a, b = c.rng.randint(1, 5), c.rng.randint(-5, 5)
    shown = f"y = {a}x^2 + {b}x" if b >= 0 else f"y = {a}x^2 - {-b}x"
    history = [{**_call(c.versioned("OCR", math=True).name, image=c.paths[0]), "result": shown}]
    cmd = ("import numpy as np\nimport matplotlib.pyplot as plt\n"
           f"def solution():\n    x = np.linspace(-5, 5, 200)\n    fig = plt.figure()\n"
           f"    plt.plot(x, {a}*x**2 + ({b})*x)\n    return fig")
    return _Item([ImageSpec("formula", [shown], path=c.paths[0])], "Plot the function in the image for x from -5 to 5.",
                 history, _call("Plot", command=cmd), None,
                 [f"MathOCR returned the function {shown}; drawing it needs Plot.",
                  "Plot has a single version and takes no image, so no rule of 1-24 constrains it."])


def _task_addtext(c: _Ctx) -> _Item:
    c.random_profile()
    word = c.rng.choice(("SALE", "HELLO", "Happy Birthday", "DRAFT", "Summer 2024", "Thank you"))
    where = c.rng.choice(list(POSITIONS))
    named = c.rng.random() < 0.6
    default = TOOL_BY_NAME["AddText"].args[3].default
    color = c.rng.choice(("blue", "green", "yellow", "white")) if named else default
    q = f"Write '{word}' at the {where} of the picture" + (f" in {color}." if named else ".")
    return _Item([ImageSpec("scene", scene=sample_scene(c.rng, c.size), path=c.paths[0])], q, [],
                 _call("AddText", image=c.paths[0], text=word, position=POSITIONS[where], color=color), None,
                 [f"The request is to write '{word}' at the {where} ({POSITIONS[where]}) "
                  + (f"in {color}" if named else f"with no color named, so the default {default}")
                  + ", which needs AddText.", "AddText has a single version, so no version rule applies.",
                  _image_sentence(c.paths[0])])


def _task_generate(c: _Ctx) -> _Item:
    c.profile_for("TextToImage", c.slot)
    prompt = c.rng.choice(PROMPTS)
    ocr, ocr_name = _ocr_history(c, c.paths[0], prompt)
    d = c.versioned("TextToImage")
    return _Item([ImageSpec("text", [prompt], path=c.paths[0])], "Generate an image of what is written on this note.",
                 [ocr], _call(d.name, keywords=prompt), d.branch,
                 [f"{ocr_name} returned the note's text; drawing it needs TextToImage.", d.reason])


def _task_stylize(c: _Ctx) -> _Item:
    c.profile_for("ImageStylization", c.slot)
    style = c.rng.choice(STYLES)
    q = f"Make this picture look like {style}."
    d = c.versioned("ImageStylization")
    return _Item([ImageSpec("scene", scene=sample_scene(c.rng, c.size), path=c.paths[0])], q, [],
                 _call(d.name, image=c.paths[0], instruction=f"make it look like {style}"), d.branch,
                 ["The request is to restyle the image, which needs ImageStylization.", d.reason,
                  _image_sentence(c.paths[0])])


TASKS: dict[str, Callable[[_Ctx], _Item]] = {
    "ocr": _task_ocr, "mathocr": _task_mathocr, "count": _task_count, "describe": _task_describe,
    "locate": _task_locate, "locate_all": _task_locate_all, "region": _task_region,
    "region_first": _task_region_first, "drawbox": _task_drawbox, "receipt": _task_receipt,
    "search": _task_search, "solve": _task_solve, "plot": _task_plot, "addtext": _task_addtext,
    "generate": _task_generate, "stylize": _task_stylize,
}
# Tasks whose gold call is a versioned tool: the ones a rule override can change.
VERSIONED_TASKS = ("ocr", "count", "describe", "region", "search", "generate", "stylize")


def gta_policy_name(seed: int) -> str:
    from .clevr import make_rng

    rng = make_rng(seed, "gta-name")
    word = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))
    return f"GTA-{word.capitalize()}"


def gta_records(n: int, *, split: str, seed: int, image_size: int, override: bool = False) -> list[dict[str, Any]]:
    """Unrendered GTAPolicy items; images are `ImageSpec`s until `mpi.data.build` renders them.

    Tasks go round-robin, so the j-th item of a task has slot j; the slot cycles that task's rule
    branches (and, for counting, the number of images described so far), so every branch of Rules
    1-24 is reached by a split of a few hundred items (the paper's 451 / 106 reach all of them)."""
    from .clevr import make_rng

    if n < 0:
        raise ValueError(f"n (number of GTAPolicy items) must be >= 0, got {n}")
    base = Rulebook(gta_policy_name(seed))
    rules = override_rulebook(base) if override else base
    policy_text = rules.render_text()
    task_names = list(VERSIONED_TASKS) if override else list(TASKS)
    records = []
    for k in range(n):
        rng = make_rng(seed, "gta", split, "override" if override else "", k)
        task = task_names[k % len(task_names)]
        numbers = rng.sample(range(1, 1000), 2)
        paths = [f"image/image_{m}.png" for m in numbers]
        ctx = _Ctx(rng, rules, base, image_size, paths, k // len(task_names), override)
        item = TASKS[task](ctx)
        profile = ctx.profile
        cot = (f"Profile: account_type {profile['account_type']}, credits {profile['credits']}, "
               f"age {profile['age']}. " + " ".join(item.cot))
        records.append({
            "id": f"gta-{split}{'-override' if override else ''}-{k:05d}",
            "dataset": "gta",
            "variant": "gta",
            "depth": 0,
            "policy_name": rules.name,
            "policy_text": policy_text,
            "specs": item.specs,
            "query": item.query,
            "cot": cot,
            "answer": json.dumps(item.gold, ensure_ascii=False),
            "gold_path": [],
            "override": override,
            "extra": json.dumps({"task": task, "profile": profile, "history": item.history,
                                 "image_paths": [s.path for s in item.specs],
                                 "image_kinds": [s.kind for s in item.specs], "gold": item.gold,
                                 "rule_branch": item.branch, **item.notes}, sort_keys=True),
        })
    return records


def rule_leaf_coverage(records: list[dict[str, Any]], rules: Rulebook | None = None,
                       base: Rulebook | None = None) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(leaves reached, all leaves) of Rules 1-20's decision trees by `records`' gold calls: a leaf is a branch
    label and the call it decides ("5a", "OCR_v4"); 25 in all. With `base` (the override split), only the leaves
    whose version the override changes count: the override split uses only those (mpi.data.gta._Ctx)."""
    rules = rules or Rulebook("x")
    leaves = set()
    for tool in RULE_GROUPS:
        original = dict(base.branches(tool)) if base is not None else {}
        leaves |= {(label, f"{tool}_v{version}") for label, version in rules.branches(tool)
                   if base is None or original[label] != version}
    reached = {(json.loads(r["extra"])["rule_branch"], json.loads(r["answer"])["name"]) for r in records}
    return reached & leaves, leaves
