"""GTAPolicy: a tool catalogue with versions, a tool-calling rulebook, and next-tool-call items.

The paper builds GTAPolicy from the GTA agent benchmark's real images. We cannot download them, so
every item's pictures are rendered here (signs and receipts to read, formulas, CLEVR-style scenes
to count in or to locate objects in), and the rest follows the paper: a synthetic user profile
(account_type A-D, credits, age), a query, an interaction history where the task needs one (e.g.
TextToBbox before RegionAttributeDescription) and the gold next call as JSON
`{"name": "OCR_v3", "arguments": {"image": "image/image_12.png"}}`.

The rulebook picks a tool *version* from the profile. The OCR rule is the paper's, word for word
in substance; the others are written in the same spirit. Rules are data (first-matching branch
wins), so the rule-override set can permute their versions and re-render the text.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image, ImageDraw, ImageFont

from .scenes import COLOR_RGB, SHAPES, render_scene, sample_object, sample_scene

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
    default: Any = None


@dataclass(frozen=True)
class Tool:
    name: str
    versions: int  # 0 = unversioned
    description: str
    args: tuple[Arg, ...]

    def call_names(self) -> list[str]:
        return [self.name] if not self.versions else [f"{self.name}_v{k}" for k in range(1, self.versions + 1)]


_IMG = Arg("image", "image", True, "the image path, e.g. image/image_3.png")
_BBOX = Arg("bbox", "text", True, "the box as a string '(x1, y1, x2, y2)' in pixels")
TOOLS: tuple[Tool, ...] = (
    Tool("Calculator", 0, "Evaluates one Python arithmetic expression (functions of `math` allowed, no imports).",
         (Arg("expression", "text", True, "a Python expression such as '3.5 + 2 * 4'"),)),
    Tool("OCR", 5, "Recognizes the text in a photo and returns it.", (_IMG,)),
    Tool("CountGivenObject", 4, "Counts the objects of one kind in the image.",
         (_IMG, Arg("text", "text", True, "the object to count, in English"))),
    Tool("ImageDescription", 5, "Returns a brief description of the image.", (_IMG,)),
    Tool("GoogleSearch", 3, "Searches the web for the query and returns the top results.",
         (Arg("query", "text", True, "what to search for"), Arg("k", "int", False, "number of results", 10))),
    Tool("RegionAttributeDescription", 2, "Describes one attribute (color, material, ...) of a region of the image.",
         (_IMG, _BBOX, Arg("attribute", "text", True, "the attribute to describe"))),
    Tool("TextToBbox", 0, "Finds the region of the image that the text describes and returns its box.",
         (_IMG, Arg("text", "text", True, "the object to find"),
          Arg("top1", "bool", False, "return only the best box", True))),
    Tool("Plot", 0, "Runs Python code with matplotlib; the code defines solution() that returns the figure.",
         (Arg("command", "text", True, "Python code"),)),
    Tool("MathOCR", 0, "Recognizes a math expression in the image and returns it in LaTeX.", (_IMG,)),
    Tool("Solver", 0, "Runs Python code with sympy; the code defines solution() that returns the answer as a string.",
         (Arg("command", "text", True, "Python code"),)),
    Tool("DrawBox", 0, "Draws a box on a region of the image.",
         (_IMG, _BBOX, Arg("annotation", "text", False, "a label written on the box", ""))),
    Tool("AddText", 0, "Writes text on the image at a position.",
         (_IMG, Arg("text", "text", True, "the text to write"),
          Arg("position", "text", True, "one of lt, mt, rt, lm, mm, rm, lb, mb, rb (left/middle/right, top/middle/bottom)"),
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
class Branch:
    when: str  # text shown in the policy
    test: Callable[[dict[str, Any]], bool]
    version: int


@dataclass
class Rule:
    """Pick `tool`'s version from the profile: the first branch whose test holds wins."""

    id: int
    tool: str
    branches: list[Branch]
    note: str = ""

    def choose(self, profile: dict[str, Any]) -> str:
        for b in self.branches:
            if b.test(profile):
                return f"{self.tool}_v{b.version}"
        raise AssertionError(f"rule {self.id} ({self.tool}) has no branch for {profile}")

    def text(self) -> str:
        parts = [f"if {b.when}, use {self.tool}_v{b.version}" if b.when != "otherwise" else
                 f"otherwise use {self.tool}_v{b.version}" for b in self.branches]
        return f"Rule {self.id} ({self.tool} version): " + "; ".join(parts) + "." + (f" {self.note}" if self.note else "")


def _c(lo: int | None, hi: int | None) -> Callable[[dict], bool]:
    return lambda p: (lo is None or p["credits"] > lo) and (hi is None or p["credits"] <= hi)


def version_rules() -> list[Rule]:
    """One version rule per versioned tool. Rule 1 is the paper's OCR rule."""
    ab = lambda p: p["account_type"] in ("A", "B")  # noqa: E731
    return [
        Rule(1, "OCR", [
            Branch("credits <= 250", _c(None, 250), 5),
            Branch("250 < credits <= 750 and account_type is A or B", lambda p: _c(250, 750)(p) and ab(p), 4),
            Branch("250 < credits <= 750 (account_type C or D)", _c(250, 750), 3),
            Branch("credits > 750 and age < 21", lambda p: p["credits"] > 750 and p["age"] < 21, 2),
            Branch("otherwise", lambda p: True, 1),
        ], note="If the image holds math (a formula or an equation), use MathOCR instead of any OCR version."),
        Rule(2, "CountGivenObject", [
            Branch("credits <= 300", _c(None, 300), 4),
            Branch("300 < credits <= 700 and age < 30", lambda p: _c(300, 700)(p) and p["age"] < 30, 3),
            Branch("credits > 700 and account_type is A or C",
                   lambda p: p["credits"] > 700 and p["account_type"] in ("A", "C"), 1),
            Branch("otherwise", lambda p: True, 2),
        ]),
        Rule(3, "ImageDescription", [
            Branch("account_type is D", lambda p: p["account_type"] == "D", 5),
            Branch("credits <= 200", _c(None, 200), 4),
            Branch("200 < credits <= 600 and age >= 60", lambda p: _c(200, 600)(p) and p["age"] >= 60, 3),
            Branch("200 < credits <= 600", _c(200, 600), 2),
            Branch("otherwise", lambda p: True, 1),
        ]),
        Rule(4, "GoogleSearch", [
            Branch("age < 18", lambda p: p["age"] < 18, 3),
            Branch("account_type is A or B", ab, 1),
            Branch("otherwise", lambda p: True, 2),
        ]),
        Rule(5, "RegionAttributeDescription", [
            Branch("account_type is A or B or credits > 800", lambda p: ab(p) or p["credits"] > 800, 1),
            Branch("otherwise", lambda p: True, 2),
        ]),
        Rule(6, "TextToImage", [
            Branch("age < 18", lambda p: p["age"] < 18, 3),
            Branch("credits <= 400", _c(None, 400), 2),
            Branch("otherwise", lambda p: True, 1),
        ]),
        Rule(7, "ImageStylization", [
            Branch("account_type is A", lambda p: p["account_type"] == "A", 1),
            Branch("account_type is B or C and credits > 500",
                   lambda p: p["account_type"] in ("B", "C") and p["credits"] > 500, 2),
            Branch("otherwise", lambda p: True, 3),
        ]),
    ]


ARGUMENT_RULES = (
    "Rule 8 (GoogleSearch k): set k to 3 when credits <= 500, otherwise to 10.",
    "Rule 9 (regions): RegionAttributeDescription and DrawBox need a box; if no earlier call returned the box "
    "of the region, call TextToBbox first with the object's description as text.",
    "Rule 10 (TextToBbox top1): set top1 to false when the user asks for all objects of a kind, otherwise true.",
    "Rule 11 (arithmetic): compute with Calculator on numbers an earlier call returned; the expression is a plain "
    "Python expression of those numbers.",
    "Rule 12 (equations and plots): to solve an equation call Solver, to draw a function call Plot; read the "
    "formula from the image with MathOCR first.",
    "Rule 13 (text in images): to act on text shown in an image (search it, draw it, compute with it), read it "
    "with OCR first (MathOCR for math).",
    "Rule 14 (AddText color): use the color the user names; if none is named, use red for account_type A or B "
    "and black otherwise.",
    "Rule 15 (images): refer to an image by its path exactly as given, e.g. image/image_3.png.",
)


@dataclass
class Rulebook:
    name: str
    rules: list[Rule] = field(default_factory=version_rules)

    def version(self, tool: str, profile: dict[str, Any]) -> str:
        for rule in self.rules:
            if rule.tool == tool:
                return rule.choose(profile)
        return tool

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
        ]
        lines += [r.text() for r in self.rules]
        lines += list(ARGUMENT_RULES)
        return "\n".join(lines) + "\n"


def override_rulebook(base: Rulebook, rng: random.Random) -> Rulebook:
    """Same name, new rules: every version rule maps its branches to a permutation of its versions
    with no branch keeping its old version (the paper's rule override)."""
    new_rules = []
    for rule in base.rules:
        versions = [b.version for b in rule.branches]
        perm = list(versions)
        while any(a == b for a, b in zip(perm, versions)):  # a derangement: every branch changes
            rng.shuffle(perm)
        new_rules.append(Rule(rule.id, rule.tool, [Branch(b.when, b.test, v) for b, v in zip(rule.branches, perm)],
                              note=rule.note))
    return Rulebook(base.name, new_rules)


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


def sample_profile(rng: random.Random) -> dict[str, Any]:
    return {"account_type": rng.choice("ABCD"), "credits": rng.randint(0, 1000), "age": rng.randint(13, 80)}


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


def _bbox_str(b: list[int]) -> str:
    return f"({b[0]}, {b[1]}, {b[2]}, {b[3]})"


def _unique_scene(rng: random.Random, size: int, attr: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A scene with exactly one object of some shape, so 'the <shape>' names one region."""
    shape = rng.choice(SHAPES)
    target = sample_object(rng, shape=shape)
    others = [sample_object(rng, shape=rng.choice([s for s in SHAPES if s != shape])) for _ in range(rng.randint(2, 5))]
    scene = sample_scene(rng, size, objects=[target] + others)
    return scene, scene["objects"][0]


def _task_ocr(rng, profile, rules, size, paths):
    word = rng.choice(WORDS)
    q = rng.choice(("What does the sign in the image say?", "Read the text in this picture.",
                    "What is written on the sign?"))
    return [ImageSpec("text", [word], path=paths[0])], q, [], _call(rules.version("OCR", profile), image=paths[0])


def _formula(rng) -> tuple[str, str]:
    a, b, c = rng.randint(2, 9), rng.randint(1, 20), rng.randint(21, 60)
    return f"{a}x + {b} = {c}", f"Eq({a}*x + {b}, {c})"


def _task_mathocr(rng, profile, rules, size, paths):
    shown, _ = _formula(rng)
    q = rng.choice(("Read the text in this picture.", "What is the formula in the image?",
                    "Transcribe what is written in the image."))
    return [ImageSpec("formula", [shown], path=paths[0])], q, [], _call("MathOCR", image=paths[0])


def _task_count(rng, profile, rules, size, paths):
    n_images = rng.choice((1, 1, 2))
    specs = [ImageSpec("scene", scene=sample_scene(rng, size), path=p) for p in paths[:n_images]]
    which = rng.randrange(n_images)
    attr = rng.choice(("shape", "color"))
    obj = rng.choice(specs[which].scene["objects"])
    thing = obj["shape"] + "s" if attr == "shape" else f"{obj['color']} objects"
    where = "" if n_images == 1 else (" in the first image" if which == 0 else " in the second image")
    q = f"How many {thing} are there{where}?"
    text = obj["shape"] if attr == "shape" else f"{obj['color']} object"
    return specs, q, [], _call(rules.version("CountGivenObject", profile), image=paths[which], text=text)


def _task_describe(rng, profile, rules, size, paths):
    q = rng.choice(("Describe this image.", "What is in this picture?", "Give me a short description of the image."))
    return ([ImageSpec("scene", scene=sample_scene(rng, size), path=paths[0])], q, [],
            _call(rules.version("ImageDescription", profile), image=paths[0]))


def _task_locate(rng, profile, rules, size, paths):
    scene, obj = _unique_scene(rng, size, "shape")
    q = f"Where is the {obj['shape']} in the image?"
    return [ImageSpec("scene", scene=scene, path=paths[0])], q, [], _call("TextToBbox", image=paths[0],
                                                                          text=obj["shape"], top1=True)


def _task_locate_all(rng, profile, rules, size, paths):
    scene = sample_scene(rng, size)
    shape = rng.choice([o["shape"] for o in scene["objects"]])
    q = f"Find all the {shape}s in the image."
    return [ImageSpec("scene", scene=scene, path=paths[0])], q, [], _call("TextToBbox", image=paths[0],
                                                                          text=shape, top1=False)


def _task_region(rng, profile, rules, size, paths):
    scene, obj = _unique_scene(rng, size, "shape")
    attribute = rng.choice(("color", "material"))
    q = f"What {attribute} is the {obj['shape']}?"
    first = _call("TextToBbox", image=paths[0], text=obj["shape"], top1=True)
    history = [{**first, "result": _bbox_str(obj["bbox"])}]
    gold = _call(rules.version("RegionAttributeDescription", profile), image=paths[0],
                 bbox=_bbox_str(obj["bbox"]), attribute=attribute)
    return [ImageSpec("scene", scene=scene, path=paths[0])], q, history, gold


def _task_region_first(rng, profile, rules, size, paths):
    scene, obj = _unique_scene(rng, size, "shape")
    attribute = rng.choice(("color", "material"))
    q = f"What {attribute} is the {obj['shape']}?"
    return ([ImageSpec("scene", scene=scene, path=paths[0])], q, [],
            _call("TextToBbox", image=paths[0], text=obj["shape"], top1=True))


def _task_drawbox(rng, profile, rules, size, paths):
    scene, obj = _unique_scene(rng, size, "shape")
    q = f"Draw a box around the {obj['shape']} and label it."
    first = _call("TextToBbox", image=paths[0], text=obj["shape"], top1=True)
    history = [{**first, "result": _bbox_str(obj["bbox"])}]
    return ([ImageSpec("scene", scene=scene, path=paths[0])], q, history,
            _call("DrawBox", image=paths[0], bbox=_bbox_str(obj["bbox"]), annotation=obj["shape"]))


def _task_receipt(rng, profile, rules, size, paths):
    items = rng.sample(GOODS, rng.randint(2, 4))
    prices = [f"{rng.randint(1, 9)}.{rng.choice((0, 25, 50, 75, 99)):02d}" for _ in items]
    lines = [f"{it} {p}" for it, p in zip(items, prices)]
    ocr = _call(rules.version("OCR", profile), image=paths[0])
    history = [{**ocr, "result": "\n".join(lines)}]
    q = "How much do the items on this receipt cost in total?"
    return [ImageSpec("text", lines, path=paths[0])], q, history, _call("Calculator", expression=" + ".join(prices))


def _task_search(rng, profile, rules, size, paths):
    title = rng.choice(BOOKS)
    ocr = _call(rules.version("OCR", profile), image=paths[0])
    history = [{**ocr, "result": title}]
    ask, query = rng.choice((("Who wrote the book in the picture?", f"author of the book {title}"),
                             ("When was the book in the picture first published?", f"{title} book first published year")))
    gold = _call(rules.version("GoogleSearch", profile), query=query, k=3 if profile["credits"] <= 500 else 10)
    return [ImageSpec("text", ["A NOVEL", title], path=paths[0])], ask, history, gold


def _task_solve(rng, profile, rules, size, paths):
    shown, sym = _formula(rng)
    history = [{**_call("MathOCR", image=paths[0]), "result": shown}]
    cmd = ("from sympy import symbols, Eq, solve\n"
           f"def solution():\n    x = symbols('x')\n    return str(solve({sym}, x))")
    return ([ImageSpec("formula", [shown], path=paths[0])], "Solve the equation in the image for x.", history,
            _call("Solver", command=cmd))


def _task_plot(rng, profile, rules, size, paths):
    a, b = rng.randint(1, 5), rng.randint(-5, 5)
    shown = f"y = {a}x^2 + {b}x" if b >= 0 else f"y = {a}x^2 - {-b}x"
    history = [{**_call("MathOCR", image=paths[0]), "result": shown}]
    cmd = ("import numpy as np\nimport matplotlib.pyplot as plt\n"
           f"def solution():\n    x = np.linspace(-5, 5, 200)\n    fig = plt.figure()\n"
           f"    plt.plot(x, {a}*x**2 + ({b})*x)\n    return fig")
    return ([ImageSpec("formula", [shown], path=paths[0])], "Plot the function in the image for x from -5 to 5.",
            history, _call("Plot", command=cmd))


def _task_addtext(rng, profile, rules, size, paths):
    word = rng.choice(("SALE", "HELLO", "Happy Birthday", "DRAFT", "Summer 2024", "Thank you"))
    where = rng.choice(list(POSITIONS))
    named = rng.random() < 0.6
    color = rng.choice(("blue", "green", "yellow", "white")) if named else (
        "red" if profile["account_type"] in ("A", "B") else "black")
    q = f"Write '{word}' at the {where} of the picture" + (f" in {color}." if named else ".")
    return ([ImageSpec("scene", scene=sample_scene(rng, size), path=paths[0])], q, [],
            _call("AddText", image=paths[0], text=word, position=POSITIONS[where], color=color))


def _task_generate(rng, profile, rules, size, paths):
    prompt = rng.choice(PROMPTS)
    history = [{**_call(rules.version("OCR", profile), image=paths[0]), "result": prompt}]
    return ([ImageSpec("text", [prompt], path=paths[0])], "Generate an image of what is written on this note.",
            history, _call(rules.version("TextToImage", profile), keywords=prompt))


def _task_stylize(rng, profile, rules, size, paths):
    style = rng.choice(STYLES)
    q = f"Make this picture look like {style}."
    return ([ImageSpec("scene", scene=sample_scene(rng, size), path=paths[0])], q, [],
            _call(rules.version("ImageStylization", profile), image=paths[0], instruction=f"make it look like {style}"))


TASKS: dict[str, Callable] = {
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
    """Unrendered GTAPolicy items; images are `ImageSpec`s until `mpi.data.build` renders them."""
    from .clevr import make_rng

    if n < 0:
        raise ValueError(f"n (number of GTAPolicy items) must be >= 0, got {n}")
    base = Rulebook(gta_policy_name(seed))
    rules = override_rulebook(base, make_rng(seed, "gta-override-rules")) if override else base
    policy_text = rules.render_text()
    task_names = list(VERSIONED_TASKS) if override else list(TASKS)
    records = []
    for k in range(n):
        rng = make_rng(seed, "gta", split, "override" if override else "", k)
        task = task_names[k % len(task_names)] if k < len(task_names) else rng.choice(task_names)
        profile = sample_profile(rng)
        numbers = rng.sample(range(1, 1000), 2)
        paths = [f"image/image_{m}.png" for m in numbers]
        specs, query, history, gold = TASKS[task](rng, profile, rules, image_size, paths)
        answer = json.dumps(gold, ensure_ascii=False)
        records.append({
            "id": f"gta-{split}{'-override' if override else ''}-{k:05d}",
            "dataset": "gta",
            "variant": "gta",
            "depth": 0,
            "policy_name": rules.name,
            "policy_text": policy_text,
            "specs": specs,
            "query": query,
            "cot": gta_cot(task, profile, history, gold, rules),
            "answer": answer,
            "gold_path": [],
            "override": override,
            "extra": json.dumps({"task": task, "profile": profile, "history": history,
                                 "image_paths": [s.path for s in specs], "gold": gold}, sort_keys=True),
        })
    return records


def gta_cot(task: str, profile: dict[str, Any], history: list[dict], gold: dict[str, Any], rules: Rulebook) -> str:
    """A short forward CoT citing the rules that decide the call."""
    name = gold["name"]
    base = name.split("_v")[0]
    steps = [f"The user needs {base} next" + (f" (calls so far: {', '.join(h['name'] for h in history)})." if history else ".")]
    if base == "MathOCR":
        steps.append("The image holds math, so Rule 1 says MathOCR instead of OCR.")
    for rule in rules.rules:
        if rule.tool == base:
            for b in rule.branches:
                if b.test(profile):
                    why = "no earlier branch applies" if b.when == "otherwise" else b.when
                    steps.append(f"Rule {rule.id}: account_type {profile['account_type']}, credits {profile['credits']}, "
                                 f"age {profile['age']}; {why}, so {name}.")
                    break
    if base == "GoogleSearch":
        steps.append(f"Rule 8: credits {profile['credits']}, so k = {gold['arguments']['k']}.")
    if base in ("RegionAttributeDescription", "DrawBox"):
        steps.append("Rule 9: the box comes from the TextToBbox result in the history.")
    if base == "TextToBbox":
        steps.append(f"Rule 10: top1 = {str(gold['arguments']['top1']).lower()}.")
    return " ".join(steps)
