"""Build, save and load ClevrPolicy / GTAPolicy splits as `datasets.Dataset`s.

    cfg = get_data_config("toy")                      # or "small", "paper"; override fields by name
    train = build_clevr_policy(cfg, split="train")    # all cfg.depths; depth=4 for one N
    save_dataset(train, "data/clevr_train")           # atomic: temp dir, then rename
    train = load_dataset_dir("data/clevr_train")

Every random choice comes from a stream named by (seed, purpose, split, depth, policy, item), so
the same config gives byte-identical data, in any process count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from .clevr import clevr_policies, clevr_records, make_rng, outcome_report
from .gta import gta_records, render_spec
from .scenes import load_clevr_scenes, render_object, sample_scene, scene_image

SPLITS = ("train", "test", "override")


@dataclass
class DataConfig:
    """Every knob of data construction. Sizes are per depth N (ClevrPolicy) or per split (GTAPolicy)."""

    name: str = "toy"
    n_policies: int = 2  # policies per depth N (paper: 10)
    n_train_per_policy: int = 16  # scenes per policy in the train split (paper: 2000)
    n_test: int = 16  # test items per depth, spread over the policies (paper: 2000)
    n_override: int | None = None  # override-split items per depth; None = n_test
    depths: tuple[int, ...] = (2,)  # tree layers N (paper: 2, 4, 6)
    variant: str = "T"  # "T" text policy, "M" policy with image crops
    image_size: int = 56  # square input images (toy-tiny 56, toy-small 112, paper-like 224)
    policy_image_size: int | None = None  # -M crops; None = max(28, image_size // 2)
    seed: int = 0
    balanced: bool = True  # outcome-balanced scenes (rejection sampling); False = CLEVR's natural mix
    condition_kinds: tuple[str, ...] = ("exists",)  # add "count" and/or "and" for harder policies
    # objects per rendered scene (CLEVR: 3-10). The toy VLM learns to see far faster with few objects:
    # a small object is ~13 px, one of 16 image tokens at 112 px (benchmarks/bench_toy_perception.py).
    n_objects: tuple[int, int] = (3, 10)
    m_image_fraction: float = 0.5  # -M: share of conditions whose value is shown as an image
    m_max_images: int = 6  # -M: at most this many images per policy (they repeat in every item)
    n_gta_train: int = 24  # paper: 451
    n_gta_test: int = 16  # paper: 106
    num_proc: int = 1  # processes that render images (output is identical for any value)
    clevr_scenes_json: str | None = None  # real CLEVR_<split>_scenes.json instead of sampled scenes
    clevr_image_dir: str | None = None  # ... and its image folder

    def __post_init__(self) -> None:
        self.depths = tuple(self.depths)
        self.n_objects = tuple(self.n_objects)
        if len(self.n_objects) != 2 or not 1 <= self.n_objects[0] <= self.n_objects[1] <= 10:
            raise ValueError(f"DataConfig.n_objects must be (min, max) with 1 <= min <= max <= 10, got {self.n_objects!r}")
        for d in self.depths:
            if not isinstance(d, int) or d < 1:
                raise ValueError(f"DataConfig.depths: every tree depth N must be an integer >= 1, got {d!r}")
        if self.variant not in ("T", "M"):
            raise ValueError(f"DataConfig.variant must be 'T' or 'M', got {self.variant!r}")
        for field_name in ("n_policies", "n_train_per_policy", "n_test", "n_gta_train", "n_gta_test", "image_size"):
            if getattr(self, field_name) < 0 or (field_name in ("n_policies", "image_size") and getattr(self, field_name) < 1):
                raise ValueError(f"DataConfig.{field_name} must be positive, got {getattr(self, field_name)}")

    @property
    def crop_size(self) -> int:
        return self.policy_image_size or max(28, self.image_size // 2)


PRESETS: dict[str, dict[str, Any]] = {
    # seconds on a laptop; CI and unit tests
    "toy": dict(n_policies=2, n_train_per_policy=16, n_test=16, depths=(2,), image_size=56,
                n_gta_train=24, n_gta_test=16),
    # toy learning runs (toy-small model, 112 px)
    "small": dict(n_policies=4, n_train_per_policy=250, n_test=200, depths=(2,), image_size=112, n_objects=(1, 4),
                  n_gta_train=451, n_gta_test=106),
    # the paper's sizes: 10 policies x 2K train per N, 2K test per N; GTAPolicy 451 / 106
    "paper": dict(n_policies=10, n_train_per_policy=2000, n_test=2000, depths=(2, 4, 6), image_size=224,
                  n_gta_train=451, n_gta_test=106, num_proc=max(1, min(4, os.cpu_count() or 1))),
}


def get_data_config(name: str = "toy", **overrides: Any) -> DataConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown data preset {name!r}; choose one of {list(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    bad = [k for k in overrides if k not in fields]
    if bad:
        raise ValueError(f"unknown DataConfig field(s) {bad}; fields are {sorted(fields)}")
    return DataConfig(name=name, **{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------- schema
def features():
    from datasets import Features, Image as HFImage, List, Value

    return Features({
        "id": Value("string"), "dataset": Value("string"), "variant": Value("string"), "depth": Value("int32"),
        "policy_name": Value("string"), "policy_text": Value("string"),
        "policy_images": List(HFImage()), "images": List(HFImage()),
        "query": Value("string"), "cot": Value("string"), "answer": Value("string"),
        "gold_path": List(Value("string")), "override": Value("bool"), "extra": Value("string"),
    })


COLUMNS = ("id", "dataset", "variant", "depth", "policy_name", "policy_text", "policy_images", "images",
           "query", "cot", "answer", "gold_path", "override", "extra")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # fixed zlib level: same pixels, same bytes (1 = fast)
    return buf.getvalue()


def _render_clevr(job: tuple[dict[str, Any], int]) -> bytes:
    scene, size = job
    return png_bytes(scene_image(scene, size))


def _render_gta(job: tuple[Any, int]) -> bytes:
    spec, size = job
    return png_bytes(render_spec(spec, size))


def _map(fn, jobs: list, num_proc: int, desc: str) -> list:
    """Ordered map with an optional process pool (results do not depend on num_proc)."""
    from tqdm.auto import tqdm

    if num_proc <= 1 or len(jobs) < 64:
        return [fn(j) for j in tqdm(jobs, desc=desc, leave=False, disable=len(jobs) < 500)]
    import multiprocessing as mp

    from .scenes import warm_sprites

    warm_sprites()  # workers inherit the sprite cache instead of each building it
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(num_proc) as pool:
        return list(tqdm(pool.imap(fn, jobs, chunksize=32), total=len(jobs), desc=desc, leave=False,
                         disable=len(jobs) < 500))


def _to_dataset(rows: list[dict[str, Any]]):
    from datasets import Dataset

    return Dataset.from_dict({c: [r[c] for r in rows] for c in COLUMNS}, features=features())


# ----------------------------------------------------------------------------- ClevrPolicy
def _split_sizes(cfg: DataConfig, split: str) -> list[int]:
    if split == "train":
        return [cfg.n_train_per_policy] * cfg.n_policies
    total = cfg.n_test if split == "test" else (cfg.n_override if cfg.n_override is not None else cfg.n_test)
    base, rem = divmod(total, cfg.n_policies)
    return [base + (1 if i < rem else 0) for i in range(cfg.n_policies)]


def clevr_split_records(cfg: DataConfig, split: str, depth: int, variant: str | None = None) -> list[dict[str, Any]]:
    """Unrendered ClevrPolicy items for one depth: each policy with its own scenes."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    variant = variant or cfg.variant
    override = split == "override"
    policies = clevr_policies(depth, cfg.n_policies, cfg.seed, variant, cfg.condition_kinds, override=override,
                              image_fraction=cfg.m_image_fraction, max_images=cfg.m_max_images)
    pool = None
    if cfg.clevr_scenes_json:
        pool = load_clevr_scenes(cfg.clevr_scenes_json, cfg.clevr_image_dir)
    records = []
    for policy, n in zip(policies, _split_sizes(cfg, split)):
        # the override split is evaluated on test-like scenes, drawn from their own stream
        records += clevr_records([policy], n, split=split, seed=cfg.seed, image_size=cfg.image_size,
                                 balanced=cfg.balanced, override=override, scene_pool=pool,
                                 n_objects=tuple(cfg.n_objects))
    return records


def build_clevr_policy(cfg: DataConfig, split: str = "train", depth: int | None = None, variant: str | None = None):
    """A ClevrPolicy split as a `datasets.Dataset` (all `cfg.depths`, or one `depth`)."""
    depths = cfg.depths if depth is None else (depth,)
    for d in depths:
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"depth (tree layers N) must be an integer >= 1, got {d!r}")
    records = [r for d in depths for r in clevr_split_records(cfg, split, d, variant)]
    scene_png = _map(_render_clevr, [(r["scene"], cfg.image_size) for r in records], cfg.num_proc, "render scenes")
    crops: dict[str, list[bytes]] = {}
    rows = []
    for r, png in zip(records, scene_png):
        key = (r["id"].rsplit("-", 1)[0])
        if key not in crops:
            crops[key] = [png_bytes(render_object(o, cfg.crop_size)) for o in r["policy"].policy_images()]
        row = {c: r[c] for c in COLUMNS if c in r}
        row["images"] = [{"bytes": png, "path": None}]
        row["policy_images"] = [{"bytes": b, "path": None} for b in crops[key]]
        rows.append(row)
    return _to_dataset(rows)


# ----------------------------------------------------------------------------- GTAPolicy
def build_gta_policy(cfg: DataConfig, split: str = "train"):
    """A GTAPolicy split as a `datasets.Dataset` (images rendered at cfg.image_size)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = {"train": cfg.n_gta_train, "test": cfg.n_gta_test,
         "override": cfg.n_override if cfg.n_override is not None else cfg.n_gta_test}[split]
    records = gta_records(n, split=split, seed=cfg.seed, image_size=cfg.image_size, override=split == "override")
    jobs = [(spec, cfg.image_size) for r in records for spec in r["specs"]]
    pngs = iter(_map(_render_gta, jobs, cfg.num_proc, "render GTA images"))
    rows = []
    for r in records:
        row = {c: r[c] for c in COLUMNS if c in r}
        row["images"] = [{"bytes": next(pngs), "path": None} for _ in r["specs"]]
        row["policy_images"] = []
        rows.append(row)
    return _to_dataset(rows)


def build_split(cfg: DataConfig, dataset: str, split: str = "train", **kw: Any):
    if dataset == "clevr":
        return build_clevr_policy(cfg, split, **kw)
    if dataset == "gta":
        return build_gta_policy(cfg, split)
    raise ValueError(f"dataset must be 'clevr' or 'gta', got {dataset!r}")


# ----------------------------------------------------------------------------- disk
def save_dataset(ds, path: str | os.PathLike) -> Path:
    """Write with `save_to_disk` into a temp dir next to `path`, then rename it into place."""
    from mpi.atomic import atomic_directory

    with atomic_directory(path) as tmp:
        ds.save_to_disk(str(tmp))
        (Path(tmp) / "mpi_fingerprint.txt").write_text(dataset_fingerprint(ds) + "\n")
    return Path(path)


def load_dataset_dir(path: str | os.PathLike):
    from datasets import load_from_disk

    path = Path(path)
    if not (path / "dataset_info.json").is_file():
        raise FileNotFoundError(f"no saved dataset at {path} (expected dataset_info.json from save_dataset)")
    return load_from_disk(str(path))


def dataset_fingerprint(ds) -> str:
    """SHA-256 over every field and every image's bytes, in row order: equal iff the data is equal."""
    h = hashlib.sha256()
    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    for name in COLUMNS:
        h.update(name.encode())
        for value in table.column(name).to_pylist():
            h.update(json.dumps(value, sort_keys=True, default=lambda b: hashlib.sha256(b).hexdigest()).encode())
    return h.hexdigest()


def chance_report(ds) -> dict[str, Any]:
    """Outcome counts per policy and the majority-class accuracy of a split (the chance line)."""
    return outcome_report(ds["policy_name"], ds["answer"])


# ----------------------------------------------------------------------------- text-only views
def tokenizer_corpus(seed: int = 0, n: int = 2000) -> list[str]:
    """Deterministic text for training the toy tokenizer: policy texts (every N, -T/-M, override,
    richer condition kinds), queries, CoT and direct responses, the GTA policy (base and override),
    profiles, histories, queries and JSON calls. No rendering: about a second for n=2000."""
    from .messages import CLEVR_INSTRUCTION, GTA_INSTRUCTION, OVERRIDE_PREFIX, format_response

    texts: list[str] = [CLEVR_INSTRUCTION, GTA_INSTRUCTION, OVERRIDE_PREFIX]
    policies_by_depth = {}
    for depth in (2, 4, 6):
        pols = clevr_policies(depth, 2, seed)
        policies_by_depth[depth] = pols
        texts += [p.render_text() for p in pols]
        texts += [p.render_text() for p in clevr_policies(depth, 1, seed, "M")]
        texts += [p.render_text() for p in clevr_policies(depth, 1, seed, override=True)]
    for depth in (2, 3):
        texts += [p.render_text() for p in clevr_policies(depth, 1, seed, kinds=("exists", "count", "and"))]
    gta_base = gta_records(1, split="corpus", seed=seed, image_size=56)
    gta_over = gta_records(1, split="corpus", seed=seed, image_size=56, override=True)
    texts += [gta_base[0]["policy_text"], gta_over[0]["policy_text"]]
    rounds = 0
    while len(texts) < n:
        for depth, pols in policies_by_depth.items():
            for r in clevr_records(pols, 4, split=f"corpus{rounds}", seed=seed, image_size=56):
                texts += [r["query"], format_response(r["cot"], r["answer"]), format_response(None, r["answer"])]
        for r in gta_records(16, split=f"corpus{rounds}", seed=seed, image_size=56, override=rounds % 2 == 1):
            extra = json.loads(r["extra"])
            hist = "\n".join(json.dumps({"name": h["name"], "arguments": h["arguments"]}) + "\n" + str(h["result"])
                             for h in extra["history"])
            prof = "User profile: " + ", ".join(f"{k} {v}" for k, v in extra["profile"].items())
            texts += [prof + "\n" + r["query"] + ("\n" + hist if hist else ""), format_response(r["cot"], r["answer"])]
        rounds += 1
    return texts[:n]


def _dummy_image() -> Image.Image:
    return Image.new("RGB", (28, 28))


def token_report(
    cfg: DataConfig | None = None,
    tokenizers: dict[str, Any] | None = None,
    depths: Iterable[int] = (2, 4, 6),
    n_items: int = 8,
) -> list[dict[str, Any]]:
    """Mean text tokens of the policy vs the policy-free prompt, per dataset, variant and N.

    The policy count is what `build_messages(..., with_policy=True)` adds over `with_policy=False`
    (text only; -M policies also carry `n_policy_images` images). This is the cost that
    internalization removes from every request.
    """
    from .messages import build_messages

    cfg = cfg or DataConfig()
    tokenizers = tokenizers if tokenizers is not None else available_tokenizers()
    groups: list[tuple[str, str, int, list[dict[str, Any]]]] = []
    for depth in depths:
        for variant in ("T", "M"):
            c = dataclasses.replace(cfg, n_policies=2, n_train_per_policy=max(1, n_items // 2), variant=variant)
            groups.append(("clevr", variant, depth, clevr_split_records(c, "train", depth, variant)))
    groups.append(("gta", "gta", 0, gta_records(n_items * 2, split="train", seed=cfg.seed, image_size=56)))

    def texts(rec: dict[str, Any], with_policy: bool) -> str:
        item = dict(rec)
        item["images"] = [_dummy_image() for _ in rec.get("specs", [None])]
        n_img = rec["policy_text"].count("<image>")
        item["policy_images"] = [_dummy_image()] * n_img
        msgs, _ = build_messages(item, with_policy=with_policy)
        return "".join(p.get("text", "") for p in msgs[0]["content"])

    rows = []
    for dataset, variant, depth, recs in groups:
        for tok_name, tok in tokenizers.items():
            def count(s: str) -> int:
                return len(tok(s, add_special_tokens=False)["input_ids"])
            full = [count(texts(r, True)) for r in recs]
            bare = [count(texts(r, False)) for r in recs]
            pol = sum(f - b for f, b in zip(full, bare)) / len(recs)
            query = sum(bare) / len(recs)
            rows.append({"dataset": dataset, "variant": variant, "N": depth, "tokenizer": tok_name,
                         "policy_tokens": round(pol, 1), "query_tokens": round(query, 1),
                         "ratio": round(pol / query, 1) if query else math.inf,
                         "saved_fraction": round(pol / (pol + query), 3) if pol + query else 0.0,
                         "n_policy_images": recs[0]["policy_text"].count("<image>")})
    return rows


def available_tokenizers(max_real: int = 2) -> dict[str, Any]:
    """The toy tokenizer (if `mpi.toy` provides it) and up to `max_real` real ones already in the
    local Hugging Face cache. Never downloads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    toks: dict[str, Any] = {}
    from mpi.toy import load_toy_tokenizer  # always available offline: a failure here is a real bug

    toks["toy"] = load_toy_tokenizer()
    candidates = ["Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2-VL-2B-Instruct",
                  "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"]
    try:
        from huggingface_hub import constants

        hub = Path(constants.HF_HUB_CACHE)
        cached = [p.name[len("models--"):].replace("--", "/") for p in hub.glob("models--*")] if hub.is_dir() else []
        candidates = [c for c in candidates if c in cached] + [c for c in cached if c not in candidates]
    except Exception:
        candidates = []
    for name in candidates:
        if sum(k != "toy" for k in toks) >= max_real:
            break
        try:
            from transformers import AutoTokenizer

            toks[name] = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception:
            continue
    return toks


# ----------------------------------------------------------------------------- scenes only
def render_examples(n: int = 8, image_size: int = 112, seed: int = 0) -> list[tuple[dict[str, Any], Image.Image]]:
    """n sampled scenes with their pictures (for notebooks)."""
    rng = make_rng(seed, "examples")
    scenes = [sample_scene(rng, image_size, index=k) for k in range(n)]
    return [(s, scene_image(s, image_size)) for s in scenes]
