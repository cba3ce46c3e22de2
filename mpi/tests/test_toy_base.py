"""The toy base's examples are right by construction, its labels cover only answers, its cache key is honest."""

import random

import pytest

from mpi.toy_base import (
    ToyBaseConfig,
    describe_target,
    encode_examples,
    policy_example,
    render,
    skill_example,
    toy_base_config,
    toy_base_key,
    training_pool,
)


def test_describe_target_hand_written():
    objects = [
        {"shape": "sphere", "color": "blue", "size": "small", "material": "metal"},
        {"shape": "cube", "color": "red", "size": "small", "material": "rubber"},
        {"shape": "cube", "color": "red", "size": "large", "material": "rubber"},
    ]
    # ontology order (colors: gray red blue ...; shapes: cube sphere cylinder), no repeats
    assert describe_target(objects) == ("colors: red, blue. shapes: cube, sphere. sizes: small, large. "
                                        "materials: rubber, metal.")


@pytest.mark.parametrize("attribute", [None, "color", "shape"])
@pytest.mark.parametrize("task", ["exists", "count"])
def test_skill_answers_match_the_scene(task, attribute):
    rng = random.Random(0)
    answers = []
    for k in range(60):
        ex = skill_example(rng, task, 56, max_objects=10, min_objects=1, index=k, attribute=attribute)
        q, objects = ex["question"], ex["scene"]["objects"]
        # recover (attr, value) from the question independently of the generator
        from mpi.data.scenes import ATTRIBUTES

        hits = [(a, v) for a, vals in ATTRIBUTES.items() for v in vals if f" {v} " in f" {q} " or f" {v}s " in q
                or (v == "sphere" and "spheres" in q) or (v == "cube" and "cubes" in q)]
        assert len(hits) == 1, q
        attr, value = hits[0]
        assert attribute in (None, attr), (attribute, q)
        n = sum(o[attr] == value for o in objects)
        if task == "exists":
            assert ex["answer"] == ("yes" if n > 0 else "no")
        else:
            assert ex["answer"] == str(n)
        answers.append(ex["answer"])
    if task == "exists":  # balanced: a blind model cannot beat 50% by much
        assert 20 <= answers.count("yes") <= 40
    with pytest.raises(ValueError, match="unknown attribute 'colour'"):
        skill_example(rng, task, 56, 4, attribute="colour")


def test_policy_examples_are_not_the_evaluation_policies():
    from mpi.data import clevr_policies

    rng = random.Random("toy_base/0/train")
    mine = {policy_example(rng, d, 56, cot=True)["policy_text"] for d in (1, 2) for _ in range(10)}
    for depth in (1, 2):
        for seed in (0, 1):
            evaluation = {p.render_text() for p in clevr_policies(depth, 10, seed=seed)}
            assert not (mine & evaluation)


def test_policy_example_answer_follows_its_tree():
    rng = random.Random(3)
    ex = policy_example(rng, 2, 56, cot=True)
    assert ex["answer"] in ex["cot"] and ex["gold_path"][0] == "1"
    assert f"Policy: {ex['policy_name']}" in ex["policy_text"]


def test_labels_cover_exactly_the_answer(toy_model_and_processor):
    model, processor = toy_model_and_processor
    rng = random.Random(1)
    examples = [render(skill_example(rng, "exists", 56, 4, index=0), 56),
                render(skill_example(rng, "describe", 56, 3, index=1), 56),
                render(policy_example(rng, 1, 56, cot=False), 56)]
    batch = encode_examples(processor, examples, model.config.image_token_id)
    tok = processor.tokenizer
    for row, ex in enumerate(examples):
        ids = batch["input_ids"][row][batch["labels"][row] != -100]
        expected = ex["answer"] if ex["task"] != "policy" else "\\boxed{" + ex["answer"] + "}"
        assert tok.decode(ids) == expected + "<|im_end|>\n"


def test_pool_batches_hold_one_kind_and_are_deterministic():
    cfg = toy_base_config("tiny", pool_size=8, batch_size=4)
    pool = training_pool(cfg)
    kinds = [{e["task"] == "policy" for e in pool[i:i + 4]} for i in range(0, 8, 4)]
    assert all(len(k) == 1 for k in kinds)
    again = training_pool(cfg)
    assert [e["answer"] for e in pool] == [e["answer"] for e in again]
    assert [e["images"][0].tobytes() for e in pool] == [e["images"][0].tobytes() for e in again]


def test_cache_key_changes_with_recipe_and_seed():
    a = toy_base_config("tiny")
    assert toy_base_key(a) == toy_base_key(toy_base_config("tiny"))
    assert toy_base_key(a) != toy_base_key(toy_base_config("tiny", seed=1))
    assert toy_base_key(a) != toy_base_key(toy_base_config("tiny", steps=13))
    assert toy_base_key(a) == toy_base_key(toy_base_config("tiny", progress=False))  # bookkeeping only


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="pool_size"):
        ToyBaseConfig(model="toy-tiny", pool_size=10, batch_size=4).validate()
    with pytest.raises(ValueError, match="toy model"):
        ToyBaseConfig(model="Qwen/Qwen2.5-VL-3B-Instruct").validate()
    with pytest.raises(ValueError, match="unknown ToyBaseConfig"):
        toy_base_config("tiny", stepz=3)


def test_perception_phase_then_object_ramp():
    from mpi.toy_base import curriculum_max_objects

    cfg = toy_base_config("tiny", perception_steps=2, curriculum_steps=2, max_objects=4, pool_size=24,
                          task_weights={"describe": 1.0, "exists": 1.0})
    # steps 0-1: one object; then 1 + frac * 3 objects, frac = 0, 0.5, 1, 1 (round-half-even: 2.5 -> 2)
    assert [curriculum_max_objects(s, cfg) for s in range(6)] == [1, 1, 1, 2, 4, 4]
    pool = training_pool(cfg)
    first, rest = pool[:2 * cfg.batch_size], pool[2 * cfg.batch_size:]
    assert all(e["task"] == "describe" and len(e["scene"]["objects"]) == 1 for e in first)
    assert all(1 <= len(e["scene"]["objects"]) <= 4 for e in rest)
    with pytest.raises(ValueError, match="max_objects"):
        toy_base_config("tiny", min_objects=3, max_objects=2)


def test_toy_base_sees_as_many_objects_as_the_toy_data():
    from mpi.config import get_config
    from mpi.data import get_data_config

    data = get_data_config(get_config("toy").data_preset)
    cfg = toy_base_config("toy")
    assert (cfg.min_objects, cfg.max_objects) == tuple(data.n_objects)


def test_zoom_curriculum_schedule_by_hand():
    from mpi.toy_base import perception_zoom_at

    cfg = toy_base_config("toy")  # zoom 3 -> 1 over 300 steps: 3 - 2 * step / 300
    assert [perception_zoom_at(s, cfg) for s in (0, 150, 225, 300, 499, 900)] == [3.0, 2.0, 1.5, 1.0, 1.0, 1.0]
    off = toy_base_config("toy", perception_zoom=1.0)
    assert {perception_zoom_at(s, off) for s in range(0, 500, 50)} == {1.0}
    with pytest.raises(ValueError, match="perception_zoom must be >= 1"):
        toy_base_config("toy", perception_zoom=0.5)
    with pytest.raises(ValueError, match="perception_zoom_steps"):
        toy_base_config("toy", perception_zoom_steps=501)


def _square_example(box, size=56):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255, 0, 0))
    return {"scene": {"objects": [{"bbox": list(box)}]}, "images": [image]}


def _red_pixels(image):
    return sum(1 for p in image.getdata() if p[0] > 200 and p[1] < 60)


def test_zoom_enlarges_the_object_about_zoom_squared_and_centres_it():
    from mpi.toy_base import zoom_to_object

    ex = _square_example((24, 20, 32, 28))  # an 8 x 8 red square, centre (28, 24), inside the 56 px image
    assert zoom_to_object(ex, 1.0, 56) is ex  # zoom 1: the full scene, untouched
    out = zoom_to_object(ex, 2.0, 56)
    assert out["images"][0].size == (56, 56) and out["zoom"] == 2.0
    assert 0.85 * 256 <= _red_pixels(out["images"][0]) <= 1.15 * 256  # 64 px -> 16 x 16 = 256
    assert out["images"][0].getpixel((28, 28))[0] > 200  # the object's centre is the image's centre
    assert ex["images"][0].getpixel((28, 28)) == (128, 128, 128)  # (it was not before) and the input is unchanged


def test_zoom_keeps_the_crop_inside_the_image_at_a_corner():
    from mpi.toy_base import zoom_to_object

    ex = _square_example((0, 0, 6, 6))  # in the top-left corner: the crop is [0, 28) x [0, 28), not centred
    out = zoom_to_object(ex, 2.0, 56)["images"][0]
    assert out.getpixel((2, 2))[0] > 200 and out.getpixel((10, 10))[0] > 200  # 6 px -> 12 px, from the corner
    assert out.getpixel((14, 14)) == (128, 128, 128)
    assert 0.8 * 144 <= _red_pixels(out) <= 1.2 * 144


def test_pool_zooms_only_the_first_perception_batches():
    from mpi.toy_base import perception_zoom_at

    cfg = toy_base_config("tiny", pool_size=24, batch_size=4)  # perception 4 steps, zoom 3 -> 1 over 2
    assert [perception_zoom_at(s, cfg) for s in range(5)] == [3.0, 2.0, 1.0, 1.0, 1.0]
    pool = training_pool(cfg)
    zooms = [e.get("zoom", 1.0) for e in pool]
    assert zooms[:8] == [3.0] * 4 + [2.0] * 4 and set(zooms[8:]) == {1.0}
    plain = training_pool(toy_base_config("tiny", pool_size=24, batch_size=4, perception_zoom=1.0))
    # same scenes, only the first two batches' images differ
    assert [e["answer"] for e in pool] == [e["answer"] for e in plain]
    same = [a["images"][0].tobytes() == b["images"][0].tobytes() for a, b in zip(pool, plain)]
    assert same == [False] * 8 + [True] * 16


def test_condition_phase_pool_is_its_own_stream_and_leaves_the_main_pool_alone():
    base = toy_base_config("tiny", pool_size=24, batch_size=4)
    cfg = toy_base_config("tiny", pool_size=24, batch_size=4, condition_steps=3,
                          condition_task_weights={"exists": 1.0})
    main_before, main_after = training_pool(base), training_pool(cfg)
    assert [e["answer"] for e in main_before] == [e["answer"] for e in main_after]  # v4's phase, draw for draw
    cond = training_pool(cfg, "conditions")
    assert len(cond) == 3 * 4
    assert {e["task"] for e in cond} == {"exists"}  # only the phase's tasks, no perception describes
    assert all(1 <= len(e["scene"]["objects"]) <= cfg.max_objects for e in cond)
    assert "zoom" not in {k for e in cond for k in e}
    # its own random stream: not a replay of the main pool's scenes
    assert [e["question"] for e in cond] != [e["question"] for e in main_after[:12]]
    assert [e["answer"] for e in cond] == [e["answer"] for e in training_pool(cfg, "conditions")]
    assert training_pool(base, "conditions") == []
    with pytest.raises(ValueError, match="phases are 'main' and 'conditions'"):
        training_pool(cfg, "warmup")
    with pytest.raises(ValueError, match="condition_task_weights"):
        toy_base_config("tiny", condition_task_weights={"exist": 1.0})


def test_learning_rate_schedules_by_hand():
    from mpi.toy_base import _lr_lambda

    main = _lr_lambda(warmup_steps=2, total_steps=6, min_lr_ratio=0.3)
    # warm-up 1/2, 2/2; then cosine over 4 steps: 0.3 + 0.7 * (1 + cos(pi * k / 4)) / 2
    expected = [0.5, 1.0, 1.0, 0.3 + 0.35 * (1 + 2 ** -0.5), 0.65, 0.3 + 0.35 * (1 - 2 ** -0.5), 0.3, 0.3]
    assert [main(s) for s in range(8)] == pytest.approx(expected)
    flat = _lr_lambda(warmup_steps=2, total_steps=6, min_lr_ratio=1.0)  # the condition phase's
    assert [flat(s) for s in range(8)] == pytest.approx([0.5] + [1.0] * 7)


def test_train_toy_base_runs_both_phases_each_with_a_fresh_optimizer(toy_tiny_path, monkeypatch):
    import torch

    from mpi import toy_base
    from mpi.modeling import load_model_and_processor

    cfg = toy_base_config("tiny", steps=2, pool_size=8, batch_size=4, perception_steps=1, perception_zoom_steps=1,
                          curriculum_steps=1, warmup_steps=1, condition_steps=2, condition_lr=5e-4, log_every=1,
                          progress=False)
    made = []
    real = toy_base.make_toy_base_optimizer
    monkeypatch.setattr(toy_base, "make_toy_base_optimizer",
                        lambda model, c, lr=None: made.append(lr) or real(model, c, lr))
    model, processor = load_model_and_processor("toy-tiny", quantization=None, seed=0, trainable=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = toy_base.train_toy_base(model, processor, cfg)
    assert [(r["phase"], r["step"]) for r in rows] == [("main", 1), ("main", 2), ("conditions", 3), ("conditions", 4)]
    assert made == [cfg.learning_rate, 5e-4]
    assert [r["lr"] for r in rows[2:]] == pytest.approx([5e-4, 5e-4])  # constant after its one warm-up step
    after_both = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(not torch.equal(before[n], after_both[n]) for n in before)
    # the condition phase alone continues a model that went through the main phase
    rows = toy_base.train_toy_base(model, processor, cfg, phases=("conditions",))
    assert [r["phase"] for r in rows] == ["conditions", "conditions"]
    assert any(not torch.equal(after_both[n], p) for n, p in model.named_parameters())


def test_a_condition_phase_that_does_not_run_is_not_part_of_the_recipe():
    from mpi.toy_base import recipe_record

    plain = toy_base_config("tiny")
    assert recipe_record(toy_base_config("tiny", condition_lr=1e-5)) == recipe_record(plain)
    assert toy_base_key(toy_base_config("tiny", condition_lr=1e-5)) == toy_base_key(plain)
    with_phase = toy_base_config("tiny", condition_steps=3)
    assert recipe_record(with_phase) != recipe_record(plain)
    assert toy_base_key(with_phase) != toy_base_key(toy_base_config("tiny", condition_steps=3, condition_lr=1e-5))


def test_training_batches_are_the_pool_batch_by_batch():
    from mpi.toy_base import training_batches

    cfg = toy_base_config("tiny", pool_size=24, batch_size=4, condition_steps=3)
    for phase in ("main", "conditions"):
        batches = list(training_batches(cfg, phase))
        assert all(len(b) == 4 for b in batches)
        flat = [e for b in batches for e in b]
        assert [e["answer"] for e in flat] == [e["answer"] for e in training_pool(cfg, phase)]
        assert all(len({e["task"] == "policy" for e in b}) == 1 for b in batches)


def test_the_report_names_a_condition_phase_only_when_there_was_one():
    from mpi.report import _condition_steps

    assert _condition_steps(toy_base_config("toy").to_dict()) == ""
    assert _condition_steps({"steps": 1300}) == ""  # a v4 toy_base.json, written before the phase existed
    assert _condition_steps(toy_base_config("toy", condition_steps=300).to_dict()) == ", then 300 condition-phase steps"
