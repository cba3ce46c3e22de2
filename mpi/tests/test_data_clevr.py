"""ClevrPolicy: gold outcomes vs an independent evaluator, tree rules, balance, determinism, errors."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from mpi.data import (
    DataConfig,
    Policy,
    PolicyError,
    SceneError,
    build_clevr_policy,
    build_messages,
    chance_report,
    dataset_fingerprint,
    format_response,
    generate_policy,
    get_data_config,
    load_clevr_scenes,
    load_dataset_dir,
    render_scene,
    sample_scene,
    save_dataset,
)
from mpi.data.clevr import clevr_policies
from mpi.data.policies import find_witness

VALUES = {
    "shape": {"cube", "sphere", "cylinder"},
    "color": {"gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow"},
    "size": {"small", "large"},
    "material": {"rubber", "metal"},
}


# --- an evaluator written from the JSON tree only, without mpi.data.policies' code paths
def _cond_holds(cond: dict, objects: list[dict]) -> bool:
    want = {cond["attr"]: cond["value"]}
    if cond.get("kind") == "and":
        want[cond["attr2"]] = cond["value2"]
    n = sum(all(o[a] == v for a, v in want.items()) for o in objects)
    return n >= (cond["count"] if cond.get("kind") == "count" else 1)


def _brute_force_outcome(tree: dict, objects: list[dict]) -> tuple[str, list[str]]:
    """Enumerate every root-to-leaf path; exactly one must have all its answers consistent."""
    paths = []

    def rec(node, acc):
        if "outcome" in node:
            paths.append((node["outcome"], acc))
            return
        rec(node["yes"], acc + [(node["id"], node["condition"], True)])
        rec(node["no"], acc + [(node["id"], node["condition"], False)])

    rec(tree["root"], [])
    hits = [(o, [i for i, _, _ in acc]) for o, acc in paths if all(_cond_holds(c, objects) == a for _, c, a in acc)]
    assert len(hits) == 1, hits
    return hits[0]


@pytest.fixture(scope="module")
def toy_cfg() -> DataConfig:
    return get_data_config("toy", n_policies=2, n_train_per_policy=12, depths=(2, 4))


@pytest.fixture(scope="module")
def toy_train(toy_cfg):
    return build_clevr_policy(toy_cfg, split="train")


def test_gold_matches_brute_force(toy_cfg, toy_train):
    trees = {p.name: p.to_dict() for d in toy_cfg.depths for p in clevr_policies(d, toy_cfg.n_policies, toy_cfg.seed)}
    assert len(toy_train) == 2 * 2 * 12
    for item in toy_train:
        scene = json.loads(item["extra"])["scene"]
        outcome, path = _brute_force_outcome(trees[item["policy_name"]], scene["objects"])
        assert item["answer"] == outcome
        assert item["gold_path"] == path
        # the CoT cites every condition id on the path, in order, and ends on the gold case
        cited = [line.split(":")[0] for line in item["cot"].splitlines()[1:]]
        assert cited == [f"# Condition {i}" for i in path]
        assert item["cot"].rstrip(".").endswith(item["answer"])


def test_override_gold_uses_new_tree(toy_cfg):
    ds = build_clevr_policy(toy_cfg, split="override", depth=2)
    new = {p.name: p.to_dict() for p in clevr_policies(2, toy_cfg.n_policies, toy_cfg.seed, override=True)}
    old = {p.name: p.to_dict() for p in clevr_policies(2, toy_cfg.n_policies, toy_cfg.seed)}
    assert set(new) == set(old)  # same names, new rules
    assert any(new[n]["root"] != old[n]["root"] for n in new)
    for item in ds:
        assert item["override"] and "updated Policy" in item["query"]
        assert item["answer"] == _brute_force_outcome(new[item["policy_name"]], json.loads(item["extra"])["scene"]["objects"])[0]
    messages, _ = build_messages(ds[0], with_policy=True)
    assert messages[0]["content"][0]["text"].startswith("Suppose we have an updated Policy:")


def _walk(node):
    yield node
    if "outcome" not in node:
        yield from _walk(node["yes"])
        yield from _walk(node["no"])


def test_true_edge_rule_and_reachability_on_many_trees():
    rng = random.Random(123)
    for k in range(80):
        depth = rng.choice((1, 2, 3, 4)) if k < 77 else 6
        kinds = ("exists",) if k % 3 or depth == 6 else ("exists", "count", "and")
        policy = generate_policy(rng, depth, f"T{k}", kinds=kinds)
        tree = policy.to_dict()
        outcomes = []
        for node in _walk(tree["root"]):
            if "outcome" in node:
                outcomes.append(node["outcome"])
                continue
            yes = node["yes"]
            if "outcome" not in yes:
                parent = {node["condition"]["attr"], node["condition"].get("attr2")} - {None}
                child = {yes["condition"]["attr"], yes["condition"].get("attr2")} - {None}
                assert not parent & child, (node["id"], parent, child)
        assert sorted(outcomes) == sorted(f"Case {i}" for i in range(1, 2**depth + 1))
        # every leaf reachable: the generator's witness really lands there (checked independently)
        for outcome, constraints in policy.leaf_constraints().items():
            objects = find_witness(constraints)
            assert objects is not None and 3 <= len(objects) <= 10
            assert _brute_force_outcome(tree, objects)[0] == outcome


def test_unreachable_leaf_is_reported():
    tree = {"name": "L2-Hand", "depth": 2, "root": {
        "id": "1", "condition": {"kind": "exists", "attr": "size", "value": "small"},
        "yes": {"id": "1.1", "condition": {"kind": "exists", "attr": "color", "value": "red"},
                "yes": {"id": "1.1.1", "outcome": "Case 1"}, "no": {"id": "1.1.2", "outcome": "Case 2"}},
        "no": {"id": "1.2", "condition": {"kind": "exists", "attr": "size", "value": "large"},
               "yes": {"id": "1.2.1", "outcome": "Case 3"}, "no": {"id": "1.2.2", "outcome": "Case 4"}}}}
    policy = Policy.from_dict(tree)
    # no small object and no large object cannot happen in a 3-10 object scene
    assert policy.unreachable_leaves() == ["Case 4"]


def test_true_edge_violation_and_missing_attribute_are_named():
    bad_edge = {"name": "L2-Bad", "depth": 2, "root": {
        "id": "1", "condition": {"attr": "color", "value": "red"},
        "yes": {"id": "1.1", "condition": {"attr": "color", "value": "blue"},
                "yes": {"id": "1.1.1", "outcome": "Case 1"}, "no": {"id": "1.1.2", "outcome": "Case 2"}},
        "no": {"id": "1.2", "outcome": "Case 3"}}}
    with pytest.raises(PolicyError, match=r"1\.1.*true edge.*color"):
        Policy.from_dict(bad_edge)
    missing = {"name": "L1-Bad", "depth": 1, "root": {
        "id": "1", "condition": {"attr": "texture", "value": "furry"},
        "yes": {"id": "1.1", "outcome": "Case 1"}, "no": {"id": "1.2", "outcome": "Case 2"}}}
    with pytest.raises(PolicyError, match="texture"):
        Policy.from_dict(missing)
    policy = generate_policy(random.Random(0), 2, "L2-Ok")
    attr = policy.root.condition.attr
    scene = {"objects": [{a: next(iter(v)) for a, v in VALUES.items() if a != attr}] * 3}
    with pytest.raises(PolicyError, match=f"'{attr}'"):
        policy.evaluate(scene)


def test_depth_below_one_is_rejected():
    with pytest.raises(ValueError, match="depths"):
        DataConfig(depths=(0,))
    with pytest.raises(PolicyError, match="depth"):
        generate_policy(random.Random(0), 0, "L0-X")
    with pytest.raises(ValueError, match="depth"):
        build_clevr_policy(get_data_config("toy"), depth=0)


def test_balanced_outcomes_and_chance_line(toy_train):
    n2 = toy_train.select([i for i, d in enumerate(toy_train["depth"]) if d == 2])
    report = chance_report(n2)
    for counts in report["per_policy"].values():
        assert sorted(counts.values()) == [3, 3, 3, 3]  # 12 items over 4 outcomes
    assert report["majority_accuracy"] == pytest.approx(0.25)
    unbalanced = build_clevr_policy(get_data_config("toy", balanced=False, n_train_per_policy=40), "train")
    counts = Counter(zip(unbalanced["policy_name"], unbalanced["answer"]))
    majority = sum(max(c for (p, _), c in counts.items() if p == name) for name in set(unbalanced["policy_name"]))
    assert chance_report(unbalanced)["majority_accuracy"] == pytest.approx(majority / len(unbalanced))


def test_same_seed_same_bytes_and_save_load(tmp_path):
    cfg = get_data_config("toy", n_train_per_policy=6, variant="M")
    a, b = build_clevr_policy(cfg, "train"), build_clevr_policy(cfg, "train")
    assert dataset_fingerprint(a) == dataset_fingerprint(b)
    c = build_clevr_policy(get_data_config("toy", n_train_per_policy=6, variant="M", seed=1), "train")
    assert dataset_fingerprint(a) != dataset_fingerprint(c)
    save_dataset(a, tmp_path / "a")
    save_dataset(b, tmp_path / "b")
    arrows_a = sorted((tmp_path / "a").glob("*.arrow"))
    assert arrows_a and [p.read_bytes() for p in arrows_a] == [p.read_bytes() for p in sorted((tmp_path / "b").glob("*.arrow"))]
    again = load_dataset_dir(tmp_path / "a")
    assert dataset_fingerprint(again) == dataset_fingerprint(a)
    assert not list(tmp_path.glob(".*tmp"))  # the temporary directory was renamed away
    with pytest.raises(FileNotFoundError, match="save_dataset"):
        load_dataset_dir(tmp_path / "nothing")


def test_m_variant_messages_put_images_in_placeholder_order():
    ds = build_clevr_policy(get_data_config("toy", n_train_per_policy=2, variant="M"), "train")
    item = ds[0]
    k = item["policy_text"].count("<image>")
    assert k == len(item["policy_images"]) >= 1
    messages, images = build_messages(item, with_policy=True, response=format_response(item["cot"], item["answer"]))
    parts = messages[0]["content"]
    assert sum(p["type"] == "image" for p in parts) == len(images) == k + 1
    assert images[0].tobytes() == item["policy_images"][0].tobytes()
    assert images[-1].tobytes() == item["images"][0].tobytes()
    assert "<image>" not in "".join(p.get("text", "") for p in parts)
    assert messages[1]["content"][0]["text"] == "<think>" + item["cot"] + "</think>\n\\boxed{" + item["answer"] + "}"
    bare, bare_images = build_messages(item, with_policy=False)
    text = "".join(p.get("text", "") for p in bare[0]["content"])
    assert "# Condition" not in text and item["query"] in text and len(bare_images) == 1 and len(bare) == 1
    assert format_response(None, "Case 2") == "\\boxed{Case 2}"


def _write_clevr(tmp_path: Path, n: int = 6, bad_color: bool = False, drop_image: bool = False):
    rng = random.Random(5)
    scenes = []
    (tmp_path / "images").mkdir()
    for i in range(n):
        scene = sample_scene(rng, 64, index=i, split="val")
        scene["image_filename"] = f"CLEVR_val_{i:06d}.png"
        if not (drop_image and i == 3):
            render_scene(scene, 64).save(tmp_path / "images" / scene["image_filename"])
        scenes.append({k: v for k, v in scene.items() if k != "image_size"})
    if bad_color:
        scenes[2]["objects"][1]["color"] = "pink"
    path = tmp_path / "CLEVR_val_scenes.json"
    path.write_text(json.dumps({"info": {}, "scenes": scenes}))
    return path


def test_real_clevr_loader_builds_items(tmp_path):
    path = _write_clevr(tmp_path, n=8)
    scenes = load_clevr_scenes(path, tmp_path / "images")
    assert len(scenes) == 8 and all(Path(s["image_path"]).is_file() for s in scenes)
    cfg = get_data_config("toy", n_train_per_policy=4, clevr_scenes_json=str(path),
                          clevr_image_dir=str(tmp_path / "images"))
    ds = build_clevr_policy(cfg, "train")
    trees = {p.name: p.to_dict() for p in clevr_policies(2, 2, 0)}
    for item in ds:
        scene = json.loads(item["extra"])["scene"]
        assert scene["image_filename"].startswith("CLEVR_val_")
        assert item["answer"] == _brute_force_outcome(trees[item["policy_name"]], scene["objects"])[0]


def test_bad_scene_file_and_image_folder_are_named(tmp_path):
    with pytest.raises(SceneError, match=r"object 1.*'color'.*'pink'"):
        load_clevr_scenes(_write_clevr(tmp_path / "a" if (tmp_path / "a").mkdir() is None else None, bad_color=True))
    with pytest.raises(SceneError, match=r"CLEVR_val_000003\.png"):
        load_clevr_scenes(_write_clevr(tmp_path / "b" if (tmp_path / "b").mkdir() is None else None, drop_image=True),
                          tmp_path / "b" / "images")
