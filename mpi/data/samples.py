"""The committed `data_samples/`: a few dozen items of each dataset as JSONL + PNG files.

`write_samples()` regenerates them from the builders (same seed, same files); `load_samples()`
turns them back into a `datasets.Dataset` with the usual schema, so notebooks and tests can run
without building anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from .build import COLUMNS, records_to_dataset, build_clevr_policy, build_gta_policy, get_data_config
from .clevr import clevr_policies

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "data_samples"

# (label, variant, depth, split, n_policies, items per policy)
CLEVR_SAMPLE_PLAN = (
    ("T", 2, "train", 2, 6),
    ("T", 4, "train", 2, 4),
    ("T", 6, "train", 1, 4),
    ("M", 2, "train", 2, 4),
    ("M", 4, "train", 1, 4),
    ("T", 2, "override", 2, 2),
)
GTA_SAMPLE_PLAN = (("train", 24), ("override", 8))


def _export(ds, out: Path, name: str) -> None:
    """items.jsonl with image paths relative to `out`; identical images are written once."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "policy_images").mkdir(parents=True, exist_ok=True)
    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    rows = table.to_pylist()
    with open(out / "items.jsonl", "a", encoding="utf-8") as fh:
        for row in rows:
            rec = {c: row[c] for c in COLUMNS}
            rec["images"] = []
            for k, img in enumerate(row["images"]):
                rel = f"images/{row['id']}_{k}.png"
                (out / rel).write_bytes(img["bytes"])
                rec["images"].append(rel)
            rec["policy_images"] = []
            for img in row["policy_images"]:
                rel = f"policy_images/{hashlib.sha256(img['bytes']).hexdigest()[:16]}.png"
                (out / rel).write_bytes(img["bytes"])
                rec["policy_images"].append(rel)
            fh.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")


def write_samples(root: str | Path = DEFAULT_ROOT, seed: int = 0, image_size: int = 112) -> Path:
    """Rebuild data_samples/ (keeps README.md): clevr/, gta/ and policies/ (texts + trees)."""
    root = Path(root)
    for sub in ("clevr", "gta", "policies"):
        shutil.rmtree(root / sub, ignore_errors=True)
    base = get_data_config("toy", image_size=image_size, seed=seed)
    trees: list[dict[str, Any]] = []
    for variant, depth, split, n_pol, n_items in CLEVR_SAMPLE_PLAN:
        cfg = dataclasses.replace(base, variant=variant, depths=(depth,), n_policies=n_pol,
                                  n_train_per_policy=n_items, n_test=n_items * n_pol, n_override=n_items * n_pol)
        ds = build_clevr_policy(cfg, split=split)
        _export(ds, root / "clevr", "clevr")
        for policy in clevr_policies(depth, n_pol, seed, variant, override=split == "override"):
            fname = f"{policy.name}{'-M' if variant == 'M' else ''}{'-override' if split == 'override' else ''}"
            (root / "policies").mkdir(parents=True, exist_ok=True)
            (root / "policies" / f"{fname}.txt").write_text(policy.render_text(), encoding="utf-8")
            trees.append({"file": f"{fname}.txt", "split": split, **policy.to_dict()})
    (root / "policies" / "clevr_policies.json").write_text(json.dumps(trees, indent=1, sort_keys=True) + "\n")
    for split, n in GTA_SAMPLE_PLAN:
        cfg = dataclasses.replace(base, n_gta_train=n, n_override=n)
        ds = build_gta_policy(cfg, split=split)
        _export(ds, root / "gta", "gta")
        fname = f"{ds[0]['policy_name']}{'-override' if split == 'override' else ''}.txt"
        (root / "policies" / fname).write_text(ds[0]["policy_text"], encoding="utf-8")
    return root


def load_samples(dataset: str = "clevr", root: str | Path = DEFAULT_ROOT):
    """The committed sample of `dataset` ("clevr" or "gta") as a `datasets.Dataset`."""
    if dataset not in ("clevr", "gta"):
        raise ValueError(f"dataset must be 'clevr' or 'gta', got {dataset!r}")
    folder = Path(root) / dataset
    path = folder / "items.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no sample at {path}; run `python -m mpi.data.samples` to write data_samples/")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        for key in ("images", "policy_images"):
            rec[key] = [{"bytes": (folder / rel).read_bytes(), "path": None} for rel in rec[key]]
        rows.append(rec)
    return records_to_dataset(rows)


if __name__ == "__main__":
    print("wrote", write_samples())
