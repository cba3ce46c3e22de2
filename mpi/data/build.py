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
import functools
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from .clevr import clevr_policies, clevr_records, make_rng, outcome_report, split_object_keys
from .gta import gta_records, render_spec
from .scenes import load_clevr_scenes, render_object, sample_scene, scene_image
from .sprites import render_sprite_object

# val: model selection only (the RL stage's learning rate and its best checkpoint), drawn like test (object sets
# unseen in training) from its own random stream; never used to report a result.
SPLITS = ("train", "val", "test", "override")


@dataclass
class DataConfig:
    """Every knob of data construction. Sizes are per depth N (ClevrPolicy) or per split (GTAPolicy)."""

    name: str = "toy"
    n_policies: int = 2  # policies per depth N (paper: 10)
    n_train_per_policy: int = 16  # scenes per policy in the train split (paper: 2000)
    n_test: int = 16  # test items per depth, spread over the policies (paper: 2000)
    n_override: int | None = None  # override-split items per depth; None = n_test
    n_val: int = 8  # validation items per depth (ClevrPolicy) or in all (GTAPolicy), spread over the policies
    depths: tuple[int, ...] = (2,)  # tree layers N (paper: 2, 4, 6)
    variant: str = "T"  # "T" text policy, "M" policy with image crops
    image_size: int = 56  # square input images (toy-tiny 56, toy-small 112, paper-like 224)
    policy_image_size: int | None = None  # -M crops; None = max(28, image_size // 2)
    seed: int = 0
    balanced: bool = True  # outcome-balanced natural scenes (rejection sampling, exact); False = the natural mix
    # test/override scenes never repeat a training scene's object multiset under the same policy name
    test_unseen_objects: bool = True
    condition_kinds: tuple[str, ...] = ("exists",)  # add "count" and/or "and" for harder policies
    # objects per rendered scene (CLEVR: 3-10). The toy VLM learns to see far faster with few objects:
    # a small object is ~13 px, one of 16 image tokens at 112 px (docs/results-history.md).
    n_objects: tuple[int, int] = (3, 10)
    # How scenes are drawn: "clevr" (perspective, CLEVR-like) or "sprites" (flat sprites on a 4 x 4 grid, one object
    # per visual token at 112 px: what a toy trained on a laptop can learn to see; mpi.data.sprites).
    world: str = "clevr"
    # How a policy is written: "paper" (prose sections, forward CoT) or "compact" (one line per section and an
    # evidence-first CoT: what a toy can learn to read; Policy.render_compact, clevr.compact_cot).
    policy_format: str = "paper"
    m_image_fraction: float = 0.5  # -M: share of conditions whose value is shown as an image
    m_max_images: int = 6  # -M: at most this many images per policy (they repeat in every item)
    n_gta_train: int = 24  # paper: 451
    n_gta_test: int = 16  # paper: 106
    num_proc: int = 1  # processes that render images (output is identical for any value)
    # Real CLEVR instead of sampled scenes (see `clevr_scene_pool`): one scenes file per split,
    # {"train": ".../CLEVR_train_scenes.json", "test": ".../CLEVR_val_scenes.json"} ("override" defaults to
    # the test file), or one file for every split, divided by a hash of image_filename.
    clevr_scenes_json: str | dict[str, str] | None = None
    # ... and the images: one folder, or {"train": ".../images/train", "test": ".../images/val"}; required
    clevr_image_dir: str | dict[str, str] | None = None
    clevr_test_fraction: float = 0.2  # one scenes file for all splits: the share of its scenes that test/override get

    def __post_init__(self) -> None:
        self.depths = tuple(self.depths)
        self.n_objects = tuple(self.n_objects)
        if len(self.n_objects) != 2 or not 1 <= self.n_objects[0] <= self.n_objects[1] <= 10:
            raise ValueError(f"DataConfig.n_objects must be (min, max) with 1 <= min <= max <= 10, got {self.n_objects!r}")
        for d in self.depths:
            if not isinstance(d, int) or d < 1:
                raise ValueError(f"DataConfig.depths: every tree depth N must be an integer >= 1, got {d!r}")
        if self.world not in ("clevr", "sprites"):
            raise ValueError(f"DataConfig.world must be 'clevr' or 'sprites', got {self.world!r}")
        if self.policy_format not in ("paper", "compact"):
            raise ValueError(f"DataConfig.policy_format must be 'paper' or 'compact', got {self.policy_format!r}")
        if self.world == "sprites" and self.n_objects[1] > 16:
            raise ValueError(f"DataConfig.n_objects: the sprite world has 16 cells, got up to {self.n_objects[1]} objects")
        if self.variant not in ("T", "M"):
            raise ValueError(f"DataConfig.variant must be 'T' or 'M', got {self.variant!r}")
        for field_name in ("n_policies", "n_train_per_policy", "n_test", "n_gta_train", "n_gta_test", "image_size"):
            if getattr(self, field_name) < 0 or (field_name in ("n_policies", "image_size") and getattr(self, field_name) < 1):
                raise ValueError(f"DataConfig.{field_name} must be positive, got {getattr(self, field_name)}")
        check_real_clevr_config(self)

    @property
    def crop_size(self) -> int:
        return self.policy_image_size or max(28, self.image_size // 2)


DATA_PRESETS: dict[str, dict[str, Any]] = {
    # seconds on a laptop; CI and unit tests
    "toy": dict(n_policies=2, n_train_per_policy=16, n_test=16, depths=(2,), image_size=56,
                n_gta_train=24, n_gta_test=16, world="sprites", policy_format="compact"),
    # toy learning runs (toy-small model, 112 px)
    # the sprite world and compact policies: what a random-init toy learns to see and read (toy base v5, mpi.toy_base)
    "small": dict(n_policies=4, n_train_per_policy=250, n_test=200, n_val=32, depths=(2,), image_size=112,
                  n_objects=(1, 4), n_gta_train=451, n_gta_test=106, world="sprites", policy_format="compact"),
    # one Colab T4 (the colab-t4 run preset): 4 policies x 125 train scenes per N (500 sequences, 63 optimizer steps
    # of 1 x 8 per epoch, where the paper's 20K per N would be 2,500 steps) and 200 test items (its eval_limit).
    # CLEVR's natural 3-10 objects: a pretrained VLM sees them (the toy-sized 1-4 of "small" is for the toy).
    "colab": dict(n_policies=4, n_train_per_policy=125, n_test=200, n_val=32, depths=(2, 4, 6), image_size=224,
                  n_gta_train=451, n_gta_test=106),
    # the paper's sizes: 10 policies x 2K train per N, 2K test per N; GTAPolicy 451 / 106
    "paper": dict(n_policies=10, n_train_per_policy=2000, n_test=2000, n_val=200, depths=(2, 4, 6), image_size=224,
                  n_gta_train=451, n_gta_test=106, num_proc=max(1, min(4, os.cpu_count() or 1))),
}


def get_data_config(name: str = "toy", **overrides: Any) -> DataConfig:
    if name not in DATA_PRESETS:
        raise ValueError(f"unknown data preset {name!r}; choose one of {list(DATA_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    bad = [k for k in overrides if k not in fields]
    if bad:
        raise ValueError(f"unknown DataConfig field(s) {bad}; fields are {sorted(fields)}")
    return DataConfig(name=name, **{**DATA_PRESETS[name], **overrides})


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


def _render_clevr(job: tuple[dict[str, Any], int, str]) -> bytes:
    scene, size, world = job
    return png_bytes(scene_image(scene, size, world=world))


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


def records_to_dataset(rows: list[dict[str, Any]]):
    """Item records (dicts with every COLUMNS field) as a datasets.Dataset with this package's features."""
    from datasets import Dataset

    return Dataset.from_dict({c: [r[c] for r in rows] for c in COLUMNS}, features=features())


# ----------------------------------------------------------------------------- ClevrPolicy
def _per_policy_sizes(cfg: DataConfig, split: str) -> list[int]:
    """ClevrPolicy items of `split` per policy (per tree depth): the test and override items spread evenly."""
    if split == "train":
        return [cfg.n_train_per_policy] * cfg.n_policies
    total = {"test": cfg.n_test, "val": cfg.n_val,
             "override": cfg.n_override if cfg.n_override is not None else cfg.n_test}[split]
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
    pool = clevr_scene_pool(cfg, split) if cfg.clevr_scenes_json else None  # this split's real CLEVR scenes
    # test and override: no object set of the training split under the same policy name
    exclude = (train_object_keys(cfg, depth, clevr_scene_pool(cfg, "train") if pool is not None else None)
               if split != "train" and cfg.test_unseen_objects else None)
    records = []
    for policy, n in zip(policies, _per_policy_sizes(cfg, split)):
        # the override split is evaluated on test-like scenes, drawn from their own stream
        records += clevr_records([policy], n, split=split, seed=cfg.seed, image_size=cfg.image_size,
                                 balanced=cfg.balanced, override=override, scene_pool=pool,
                                 n_objects=tuple(cfg.n_objects), exclude_keys=exclude,
                                 policy_format=cfg.policy_format)
    if pool is not None:
        _warn_repeated_scenes(records, split, depth, len(pool))
    return records


def train_object_keys(cfg: DataConfig, depth: int, pool: list[dict[str, Any]] | None = None) -> dict[str, frozenset]:
    """Per policy name, the object sets (`clevr.object_set_key`) of the training split at `depth`
    (drawn, not rendered; cached per process for sampled scenes)."""
    if pool is not None:
        policies = clevr_policies(depth, cfg.n_policies, cfg.seed, "T", cfg.condition_kinds)
        return split_object_keys(policies, cfg.n_train_per_policy, split="train", seed=cfg.seed,
                                 balanced=cfg.balanced, n_objects=tuple(cfg.n_objects), scene_pool=pool)
    return _sampled_train_keys(cfg.seed, depth, cfg.n_policies, cfg.n_train_per_policy, tuple(cfg.condition_kinds),
                               cfg.balanced, tuple(cfg.n_objects))


@functools.lru_cache(maxsize=16)
def _sampled_train_keys(seed: int, depth: int, n_policies: int, n_train: int, kinds: tuple[str, ...],
                        balanced: bool, n_objects: tuple[int, int]) -> dict[str, frozenset]:
    policies = clevr_policies(depth, n_policies, seed, "T", kinds)  # -T and -M share the trees
    return split_object_keys(policies, n_train, split="train", seed=seed, balanced=balanced, n_objects=n_objects)


def build_clevr_policy(cfg: DataConfig, split: str = "train", depth: int | None = None, variant: str | None = None):
    """A ClevrPolicy split as a `datasets.Dataset` (all `cfg.depths`, or one `depth`)."""
    depths = cfg.depths if depth is None else (depth,)
    for d in depths:
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"depth (tree layers N) must be an integer >= 1, got {d!r}")
    records = [r for d in depths for r in clevr_split_records(cfg, split, d, variant)]
    world = "clevr" if cfg.clevr_scenes_json else cfg.world  # real CLEVR scenes come with their own pictures
    scene_png = _map(_render_clevr, [(r["scene"], cfg.image_size, world) for r in records], cfg.num_proc,
                     "render scenes")
    crops: dict[str, list[bytes]] = {}
    rows = []
    for r, png in zip(records, scene_png):
        key = (r["id"].rsplit("-", 1)[0])
        if key not in crops:
            draw = render_sprite_object if world == "sprites" else render_object
            crops[key] = [png_bytes(draw(o, cfg.crop_size)) for o in r["policy"].policy_images()]
        row = {c: r[c] for c in COLUMNS if c in r}
        row["images"] = [{"bytes": png, "path": None}]
        row["policy_images"] = [{"bytes": b, "path": None} for b in crops[key]]
        rows.append(row)
    return records_to_dataset(rows)


# ----------------------------------------------------------------------------- real CLEVR
def _per_split(value: Any, split: str) -> Any:
    """A per-split setting: the value itself, or value[split] (override falls back to test)."""
    if not isinstance(value, dict):
        return value
    return value.get(split, value.get("test") if split in ("override", "val") else None)


def check_real_clevr_config(cfg: DataConfig) -> None:
    """Raise ValueError (naming the field and the fix) for a real-CLEVR setting that cannot work."""
    scenes, images = cfg.clevr_scenes_json, cfg.clevr_image_dir
    if not scenes:
        if images:
            raise ValueError("DataConfig.clevr_image_dir is set but clevr_scenes_json is not; pass the scenes "
                             "file(s) that go with the images, or drop clevr_image_dir")
        return
    for field_name, value in (("clevr_scenes_json", scenes), ("clevr_image_dir", images)):
        if isinstance(value, dict):
            bad = [k for k in value if k not in SPLITS]
            if bad:
                raise ValueError(f"DataConfig.{field_name}: unknown split key(s) {bad}; use {list(SPLITS)}")
            if not all(isinstance(v, (str, os.PathLike)) and str(v) for v in value.values()):
                raise ValueError(f"DataConfig.{field_name}: every value must be a path, got {value!r}")
        elif value is not None and not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"DataConfig.{field_name} must be a path or a dict split -> path, got {value!r}")
    if not images:
        raise ValueError("DataConfig.clevr_scenes_json is set but clevr_image_dir is not: without the real images "
                         "every picture would be an empty floor. Pass the image folder(s), e.g. "
                         "clevr_image_dir={'train': '.../images/train', 'test': '.../images/val'}")
    if isinstance(scenes, dict):
        missing = [k for k in ("train", "test") if k not in scenes]
        if missing:
            raise ValueError(f"DataConfig.clevr_scenes_json needs a file for {missing} (one scenes file per split, "
                             f"e.g. {{'train': 'CLEVR_train_scenes.json', 'test': 'CLEVR_val_scenes.json'}}), "
                             f"or one path for all splits (divided by image_filename)")
        train = os.path.realpath(scenes["train"])
        for k in ("test", "override"):
            if k in scenes and os.path.realpath(scenes[k]) == train:
                raise ValueError(f"DataConfig.clevr_scenes_json: '{k}' and 'train' are the same file {scenes[k]}; "
                                 f"test scenes must not be training scenes. Pass a different file, or one path "
                                 f"for all splits (divided by image_filename, clevr_test_fraction)")
    elif not 0.0 < cfg.clevr_test_fraction < 1.0:
        raise ValueError(f"DataConfig.clevr_test_fraction must be in (0, 1) when one clevr_scenes_json feeds every "
                         f"split, got {cfg.clevr_test_fraction!r}")
    for split in SPLITS:
        if _per_split(images, split) is None and _per_split(scenes, split) is not None:
            raise ValueError(f"DataConfig.clevr_image_dir has no folder for split {split!r}; add the key "
                             f"{split!r} (or 'test' for override) or pass one folder for all splits")


@functools.lru_cache(maxsize=8)
def _load_scene_file(path: str, image_dir: str, mtime_ns: int, size: int) -> tuple[dict[str, Any], ...]:
    # cached per process: every depth and split of a build reads each file once (mtime/size invalidate)
    return tuple(load_clevr_scenes(path, image_dir, require_images=True))


def _scene_file(path: Any, image_dir: Any) -> list[dict[str, Any]]:
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError:
        return load_clevr_scenes(path, image_dir, require_images=True)  # raises the SceneError that names it
    return list(_load_scene_file(path, os.fspath(image_dir), st.st_mtime_ns, st.st_size))


def hash_split(image_filename: str, test_fraction: float) -> str:
    """'test' or 'train' for one scene of a shared scenes file: a fixed hash of its image_filename,
    so the division does not depend on the file's order, the seed or the other scenes."""
    digest = hashlib.sha256(image_filename.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2.0**64 < test_fraction else "train"


def _scene_identity(scene: dict[str, Any]) -> tuple:
    objects = tuple((o["shape"], o["color"], o["size"], o["material"], tuple(o.get("clevr_pixel_coords", ())))
                    for o in scene["objects"])
    return scene.get("image_filename"), objects


def clevr_scene_pool(cfg: DataConfig, split: str) -> list[dict[str, Any]]:
    """The real CLEVR scenes of one split, with their images (see `load_clevr_scenes`).

    One file per split (`clevr_scenes_json={"train": ..., "test": ...}`; override uses test's unless
    given): the file of this split, checked to share no scene (same image file, or same filename and
    objects) with the train file. One file for all splits: its scenes are divided by `hash_split` of
    image_filename, `clevr_test_fraction` going to test and override. Either way no scene is in both
    train and test; a scene listed twice in one file is kept once (with a warning).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    scenes_json, image_dir = _per_split(cfg.clevr_scenes_json, split), _per_split(cfg.clevr_image_dir, split)
    if scenes_json is None or image_dir is None:
        raise ValueError(f"DataConfig.clevr_scenes_json / clevr_image_dir give nothing for split {split!r}")
    scenes = _scene_file(scenes_json, image_dir)
    if not isinstance(cfg.clevr_scenes_json, dict):
        side = "train" if split == "train" else "test"
        scenes = [s for s in scenes if hash_split(s["image_filename"], cfg.clevr_test_fraction) == side]
        if not scenes:
            raise ValueError(f"{scenes_json}: none of its scenes falls in the {side} share (clevr_test_fraction="
                             f"{cfg.clevr_test_fraction}); use a larger file or one scenes file per split")
    elif split != "train":
        train = _scene_file(cfg.clevr_scenes_json["train"], _per_split(cfg.clevr_image_dir, "train"))
        train_paths = {os.path.realpath(s["image_path"]) for s in train}
        train_ids = {_scene_identity(s) for s in train}
        shared = [s for s in scenes if os.path.realpath(s["image_path"]) in train_paths or _scene_identity(s) in train_ids]
        if shared:
            raise ValueError(
                f"{scenes_json} ({split}) shares {len(shared)} of {len(scenes)} scenes with the train file "
                f"{cfg.clevr_scenes_json['train']} (first: {shared[0]['image_filename']!r}); pass disjoint files "
                f"(CLEVR_train_scenes.json for train, CLEVR_val_scenes.json for test) or one path for all splits")
    return scenes


def _warn_repeated_scenes(records: list[dict[str, Any]], split: str, depth: int, pool_size: int) -> None:
    """Warn when one policy's items of a split reuse a real CLEVR scene (the pool is drawn with replacement)."""
    import warnings

    seen: dict[str, set[str]] = {}
    repeats = 0
    for r in records:
        names = seen.setdefault(r["policy_name"], set())
        name = r["scene"].get("image_filename", "")
        repeats += name in names
        names.add(name)
    if repeats:
        warnings.warn(f"ClevrPolicy {split} N={depth}: {repeats} of {len(records)} items reuse a scene that the "
                      f"same policy already has (the pool holds {pool_size} scenes; an outcome that few scenes "
                      f"reach repeats). A larger clevr_scenes_json, or fewer items per policy, avoids it",
                      stacklevel=3)


# ----------------------------------------------------------------------------- GTAPolicy
def _gta_items(cfg: DataConfig, split: str) -> int:
    return {"train": cfg.n_gta_train, "test": cfg.n_gta_test, "val": cfg.n_val,
            "override": cfg.n_override if cfg.n_override is not None else cfg.n_gta_test}[split]


def split_item_counts(cfg: DataConfig, dataset: str = "clevr") -> dict[str, int]:
    """Items per split (train, test, override) that `build_split(cfg, dataset, split)` makes, without building
    anything (the dry run prints them); for ClevrPolicy per tree depth in cfg.depths."""
    if dataset == "gta":
        return {split: _gta_items(cfg, split) for split in SPLITS}
    return {split: sum(_per_policy_sizes(cfg, split)) for split in SPLITS}


def build_gta_policy(cfg: DataConfig, split: str = "train"):
    """A GTAPolicy split as a `datasets.Dataset` (images rendered at cfg.image_size)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = _gta_items(cfg, split)
    records = gta_records(n, split=split, seed=cfg.seed, image_size=cfg.image_size, override=split == "override")
    jobs = [(spec, cfg.image_size) for r in records for spec in r["specs"]]
    pngs = iter(_map(_render_gta, jobs, cfg.num_proc, "render GTA images"))
    rows = []
    for r in records:
        row = {c: r[c] for c in COLUMNS if c in r}
        row["images"] = [{"bytes": next(pngs), "path": None} for _ in r["specs"]]
        row["policy_images"] = []
        rows.append(row)
    return records_to_dataset(rows)


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
    for depth in (2, 4):  # the toy presets' compact policies and evidence-first CoT (policy_format="compact")
        for r in clevr_records(policies_by_depth[depth], 2, split="corpus-compact", seed=seed, image_size=56,
                               n_objects=(1, 4), policy_format="compact"):
            texts += [r["policy_text"], format_response(r["cot"], r["answer"])]
    gta_base = gta_records(1, split="corpus", seed=seed, image_size=56)
    gta_over = gta_records(1, split="corpus", seed=seed, image_size=56, override=True)
    texts += [gta_base[0]["policy_text"], gta_over[0]["policy_text"]]
    rounds = 0
    while len(texts) < n:
        for depth, pols in policies_by_depth.items():
            # legacy scenes: this text keys the toy model's cache (mpi.toy.toy_path), so it must not change
            for r in clevr_records(pols, 4, split=f"corpus{rounds}", seed=seed, image_size=56, legacy_scenes=True):
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

    tokenizers: name -> tokenizer to count with, e.g. `mpi.modeling.available_tokenizers()` (the toy one and
    the real ones in the local cache). Passed in because the toy tokenizer is itself trained on this package's
    text (mpi.toy imports mpi.data), so mpi.data must not import the toy.

    The policy count is what `build_messages(..., with_policy=True)` adds over `with_policy=False`
    (text only; -M policies also carry `n_policy_images` images). This is the cost that
    internalization removes from every request.
    """
    from .messages import build_messages

    cfg = cfg or DataConfig()
    if not tokenizers:
        raise ValueError("token_report needs tokenizers={name: tokenizer}: pass "
                         "tokenizers=mpi.modeling.available_tokenizers() (the toy's and the locally cached ones)")
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


# ----------------------------------------------------------------------------- scenes only
def render_examples(n: int = 8, image_size: int = 112, seed: int = 0, world: str = "clevr",
                    n_objects: tuple[int, int] = (3, 10)) -> list[tuple[dict[str, Any], Image.Image]]:
    """n sampled scenes with their pictures (for notebooks), drawn in `world` ("clevr" or "sprites")."""
    rng = make_rng(seed, "examples")
    scenes = [sample_scene(rng, image_size, n_objects=n_objects, index=k) for k in range(n)]
    return [(s, scene_image(s, image_size, world=world)) for s in scenes]
