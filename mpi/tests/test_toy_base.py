"""The toy base's examples are right by construction, its labels cover only answers, its cache key is honest."""

import random
import re

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
            evaluation = {p.render_compact() for p in clevr_policies(depth, 10, seed=seed)}
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


def test_batches_are_a_function_of_the_step_and_hold_one_kind():
    from mpi.toy_base import BATCH_KINDS, batch_at

    mix = dict(task_weights=ToyBaseConfig().task_weights)  # a mix whose first 13 steps draw a policy and a look-up
    cfg = toy_base_config("tiny", copy_steps=4, perception_steps=3, batch_size=4, policy_batch_size=2, **mix)
    batches = [batch_at(cfg, s) for s in range(20)]
    assert all(len({BATCH_KINDS[e["task"]] for e in b}) == 1 for b in batches)
    assert {e["task"] for b in batches[:4] for e in b} == {"repeat", "lookup"}  # copying first, text only
    assert all(e["images"] == [] for b in batches[:4] for e in b)
    assert {e["task"] for b in batches[4:7] for e in b} <= {"describe", "exists"}  # then perception
    assert any(b[0]["task"] == "policy" and len(b) == 2 for b in batches[7:])
    assert any(b[0]["task"] == "lookup" and len(b) == 2 for b in batches[7:])
    assert all(1 <= len(e["scene"]["objects"]) <= cfg.max_objects for b in batches for e in b if "scene" in e)
    # a resumed run draws exactly the batches an uninterrupted one would: a step alone equals it in sequence
    step = next(s for s in range(7, 20) if batches[s][0]["images"])
    again = batch_at(cfg, step)
    assert [e["answer"] for e in again] == [e["answer"] for e in batches[step]]
    assert [e["images"][0].tobytes() for e in again] == [e["images"][0].tobytes() for e in batches[step]]
    assert [e["answer"] for e in batch_at(toy_base_config("tiny", seed=1, **mix), step)] != [e["answer"] for e in again]


def test_a_lookup_drill_answers_what_each_asked_section_says():
    from mpi.toy_base import lookup_example

    rng = random.Random(4)
    for depth in (1, 2, 4):
        ex = lookup_example(rng, depth)
        policy_text, question = ex["question"].rsplit("\n", 1)
        asked = question[len("What do sections "):-len(" say?")].replace(" and ", ", ").split(", ")
        sections = {line.split(" ")[0]: line for line in policy_text.splitlines()[1:]}  # '#1.2 small'
        assert ex["answer"].splitlines() == [sections[i] for i in asked] and 2 <= len(asked) <= 6
        assert ex["images"] == []  # text only: the drill needs no picture


def test_a_repeat_drill_asks_for_its_own_words_and_draws_them_without_repeats():
    from mpi.toy_base import BATCH_KINDS, batch_at, repeat_example

    ex = repeat_example(random.Random(2))
    words = re.findall(r"Case \d+|\S+", ex["answer"])  # a case is one word (and one token: mpi.toy.COMPACT_TOKENS)
    assert ex["question"] == "Repeat: " + ex["answer"] and ex["images"] == []
    assert 6 <= len(words) <= 24 and len(set(words)) == len(words)  # each next word is unambiguous
    cfg = toy_base_config("tiny", copy_steps=0, perception_steps=0, task_weights={"repeat": 1.0, "describe": 1.0})
    tasks = {b[0]["task"] for b in (batch_at(cfg, s) for s in range(12))}
    assert tasks == {"repeat", "describe"} and BATCH_KINDS["repeat"] == "lookup"


def test_a_check_drill_answers_each_word_from_the_scene_in_the_cot_s_own_line_format():
    from mpi.data.clevr import compact_cot
    from mpi.data.policies import Condition, Node, Policy
    from mpi.toy_base import BATCH_KINDS, batch_at, skill_example

    rng, answers = random.Random(5), []
    for k in range(40):
        ex = skill_example(rng, "check", 56, 4, index=k)
        objects = ex["scene"]["objects"]
        words = ex["question"][len("Check in this order: "):-1].split(", ")
        description, *lines = ex["answer"].split("\n")
        assert description == describe_target(objects) and len(lines) == len(words) and 1 <= len(words) <= 4
        node = "1"
        for word, line in zip(words, lines):
            shown = any(word in (o["color"], o["shape"], o["size"], o["material"]) for o in objects)
            assert line == f"#{node} {word}? {'yes' if shown else 'no'}"  # the CoT's rule: yes adds .1, no .2
            node += ".1" if shown else ".2"
            answers.append(shown)
    assert 0.3 < sum(answers) / len(answers) < 0.7  # about balanced: a blind model scores ~50% per line
    # the same line a policy CoT writes when it checks that word first
    scene = skill_example(random.Random(1), "check", 56, 4)["scene"]
    word = scene["objects"][0]["color"]
    policy = Policy("L1-Test", 1, Node("1", condition=Condition("color", word), yes=Node("1.1", outcome="Case 1"),
                                       no=Node("1.2", outcome="Case 2")))
    assert compact_cot(policy, scene).split("\n")[1] == f"#1 {word}? yes"
    cfg = toy_base_config("tiny", copy_steps=0, perception_steps=0, task_weights={"check": 1.0})
    assert {e["task"] for e in batch_at(cfg, 0)} == {"check"} and BATCH_KINDS["check"] == "skill"


def test_existence_with_evidence_describes_the_scene_then_checks_the_word_and_is_scored_by_its_final_word(monkeypatch):
    from mpi.toy_base import final_yes_no, general_skill_accuracy, skill_example

    for k in range(20):
        plain = skill_example(random.Random(k), "exists", 56, 4, index=k)
        ex = skill_example(random.Random(k), "exists", 56, 4, index=k, evidence=True)
        value = plain["question"][len("Is there a "):].split(" ")[0]
        assert ex["scene"] == plain["scene"] and ex["question"] == plain["question"]  # the same draw, another answer
        assert ex["answer"] == describe_target(ex["scene"]["objects"]) + f"\n{value}? {plain['answer']}"
    assert final_yes_no("colors: red.\nred? yes") == "yes" and final_yes_no("No.") == "no"
    assert final_yes_no("yes, or rather no") == "no" and final_yes_no("colors: red.") is None
    assert final_yes_no("nothing here") is None  # "no" inside a word is not an answer

    import mpi.evaluate as evaluate

    items = [{"task": "exists", "question": "q", "answer": "colors: red.\nred? yes"},
             {"task": "exists", "question": "q", "answer": "no"},
             {"task": "count", "question": "q", "answer": "2"}]
    # fixed "generations", to check the scoring alone
    monkeypatch.setattr(evaluate, "generate_texts", lambda model, processor, its, **kw: ["colors: blue.\nred? yes",
                                                                                          "no", "3"])
    r = general_skill_accuracy(None, None, items)
    # the first is right by its final word though its description is wrong; the count is wrong
    assert r["per_task"] == {"count": 0.0, "exists": 1.0}


def test_cache_key_changes_with_recipe_and_seed():
    a = toy_base_config("tiny")
    assert toy_base_key(a) == toy_base_key(toy_base_config("tiny"))
    assert toy_base_key(a) != toy_base_key(toy_base_config("tiny", seed=1))
    assert toy_base_key(a) != toy_base_key(toy_base_config("tiny", steps=13))
    assert toy_base_key(a) != toy_base_key(toy_base_config("tiny", grounding_weight=0.0))
    assert toy_base_key(a) != toy_base_key(toy_base_config("tiny", copy_steps=0))
    assert toy_base_key(a) == toy_base_key(toy_base_config("tiny", progress=False, checkpoint_every=3))  # bookkeeping


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        toy_base_config("tiny", learning_rate=-1e-3)
    with pytest.raises(ValueError, match="policy_batch_size"):
        toy_base_config("tiny", policy_batch_size=0)
    with pytest.raises(ValueError, match="toy model"):
        ToyBaseConfig(model="Qwen/Qwen2.5-VL-3B-Instruct").validate()
    with pytest.raises(ValueError, match="unknown ToyBaseConfig"):
        toy_base_config("tiny", stepz=3)
    with pytest.raises(ValueError, match="max_objects"):
        toy_base_config("tiny", min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="copy_task_weights.*'repeat' and 'lookup'"):
        toy_base_config("tiny", copy_task_weights={"policy": 1.0})
    with pytest.raises(ValueError, match="copy_steps"):
        toy_base_config("tiny", copy_steps=-1)


def test_toy_base_sees_and_reads_what_the_toy_data_shows():
    from mpi.config import get_config
    from mpi.data import get_data_config

    data = get_data_config(get_config("toy").data_preset)
    cfg = toy_base_config("toy")
    assert (cfg.min_objects, cfg.max_objects) == tuple(data.n_objects)
    assert (cfg.world, cfg.policy_format) == (data.world, data.policy_format) == ("sprites", "compact")


def test_learning_rate_schedule_by_hand():
    from mpi.toy_base import lr_factor

    # warm-up 1/2, 2/2; then cosine over 4 steps: 0.3 + 0.7 * (1 + cos(pi * k / 4)) / 2
    expected = [0.5, 1.0, 1.0, 0.3 + 0.35 * (1 + 2 ** -0.5), 0.65, 0.3 + 0.35 * (1 - 2 ** -0.5), 0.3, 0.3]
    assert [lr_factor(s, 2, 6, 0.3) for s in range(8)] == pytest.approx(expected)
    # the copy phase holds the peak: warm-up 1/2, 2/2, held to step 4, then cosine over the last 4 steps
    held = [0.5, 1.0, 1.0, 1.0, 1.0, 0.3 + 0.35 * (1 + 2 ** -0.5), 0.65, 0.3 + 0.35 * (1 - 2 ** -0.5), 0.3]
    assert [lr_factor(s, 2, 8, 0.3, hold_steps=4) for s in range(9)] == pytest.approx(held)


def test_grounding_targets_name_each_cells_object_by_hand():
    from mpi.data.sprites import sprite_layout
    from mpi.toy_base import grounding_targets

    red_cube = {"shape": "cube", "color": "red", "size": "large", "material": "metal"}
    blue_ball = {"shape": "sphere", "color": "blue", "size": "small", "material": "rubber"}
    scene = {"image_index": 3, "image_filename": "x.png", "objects": [red_cube, blue_ball]}
    cells = sprite_layout(scene)
    t = grounding_targets([{"scene": scene}], tokens_per_side=4)
    assert t.shape == (16, 16) and torch_sum_rows(t) == [1.0] * 16
    # classes (mpi.data.scenes.ATTRIBUTES order): cube sphere cylinder | gray red blue green brown purple cyan yellow |
    # small large | rubber metal | empty
    cube, sphere, red, blue, small, large, rubber, metal, empty = 0, 1, 4, 5, 11, 12, 13, 14, 15
    assert sorted(t[cells[0]].nonzero().flatten().tolist()) == sorted([red, cube, large, metal])
    assert sorted(t[cells[1]].nonzero().flatten().tolist()) == sorted([blue, sphere, small, rubber])
    others = [c for c in range(16) if c not in cells]
    assert all(t[c].nonzero().flatten().tolist() == [empty] for c in others)


def torch_sum_rows(t):
    return [round(float(x), 6) for x in t.sum(-1)]


def test_grounding_words_are_single_tokens_of_the_toy_tokenizer(toy_model_and_processor):
    from mpi.toy_base import grounding_words

    _, processor = toy_model_and_processor
    ids = grounding_words(processor.tokenizer)
    words = [processor.tokenizer.decode([i]) for i in ids]
    assert words[:4] == [" cube", " sphere", " cylinder", " gray"] and words[-1] == "<|vision_pad|>" and len(set(ids)) == 16


def _train(cfg, **kw):
    from mpi import toy_base
    from mpi.modeling import load_model_and_processor

    model, processor = load_model_and_processor("toy-tiny", quantization=None, seed=0, trainable=True)
    rows = toy_base.train_toy_base(model, processor, cfg, **kw)
    return model, rows


def test_the_grounding_loss_falls_when_trained_and_not_when_the_update_is_off(toy_tiny_path):
    # 30 steps of describe/exists at a high rate: the visual tokens learn to name their cell's object
    common = dict(steps=30, copy_steps=0, perception_steps=30, batch_size=4, warmup_steps=1, log_every=10, progress=False,
                  min_lr_ratio=1.0)
    _, rows = _train(toy_base_config("tiny", learning_rate=3e-3, **common))
    _, frozen = _train(toy_base_config("tiny", learning_rate=1e-12, **common))
    assert frozen[-1]["grounding_loss"] == pytest.approx(frozen[0]["grounding_loss"], rel=0.02)
    assert rows[-1]["grounding_loss"] < 0.8 * rows[0]["grounding_loss"] < 0.8 * frozen[-1]["grounding_loss"] + 1e-9
    _, off = _train(toy_base_config("tiny", learning_rate=3e-3, grounding_weight=0.0, **common))
    assert "grounding_loss" not in off[-1]


def test_an_interrupted_build_resumes_to_the_same_weights(toy_tiny_path, tmp_path, monkeypatch):
    import torch

    from mpi import toy_base

    cfg = toy_base_config("tiny", steps=6, checkpoint_every=2, log_every=1, progress=False)
    straight, rows = _train(cfg)
    real = toy_base.batch_at

    def dies_at_step_5(c, step):
        if step == 4:
            raise KeyboardInterrupt("killed")
        return real(c, step)

    monkeypatch.setattr(toy_base, "batch_at", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        _train(cfg, checkpoint_dir=tmp_path)
    assert torch.load(tmp_path / "state.pt", weights_only=False)["step"] == 4
    monkeypatch.setattr(toy_base, "batch_at", real)
    resumed, rows2 = _train(cfg, checkpoint_dir=tmp_path)
    assert [r["step"] for r in rows2] == [r["step"] for r in rows]
    assert [r.get("skill_loss", r.get("policy_loss")) for r in rows2] == [r.get("skill_loss", r.get("policy_loss"))
                                                                         for r in rows]
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    # a checkpoint of another recipe is never resumed from
    _, rows3 = _train(toy_base_config("tiny", steps=6, seed=1, checkpoint_every=2, log_every=1, progress=False),
                      checkpoint_dir=tmp_path)
    assert [r["step"] for r in rows3] == [1, 2, 3, 4, 5, 6]


def test_skills_line_reads_the_gates():
    from mpi.toy_base import skills_line

    skills = {"exists_mean": 0.975, "exists_min": 0.9375, "describe": 0.92, "policy_N2": 0.75, "policy_N2_chance": 0.25,
              "policy_N4": 0.5, "policy_N4_chance": 0.0625, "sections_exact": 0.96}
    assert skills_line(skills) == ("exists 98% (min 94%), describe 92%, in-context policies N=2 75% (chance 25%), "
                                   "N=4 50% (chance 6%), sections exact 96%")


def test_shuffled_sections_keep_the_tree_and_only_training_draws_them():
    from mpi.data.policies import generate_policy
    from mpi.toy_base import batch_at, policy_items, shuffle_sections

    rng = random.Random(5)
    policy = generate_policy(rng, 3, "L3-Test")
    text = policy.render_compact()
    shuffled = shuffle_sections(random.Random(1), text)
    head, *lines = shuffled.rstrip("\n").split("\n")
    render_order = lambda line: ("Case" in line, line.split(" ")[0])  # conditions in preorder, then leaves
    assert head == text.split("\n")[0] and "\n".join([head, *sorted(lines, key=render_order)]) + "\n" == text
    assert shuffled != text  # 14 lines: a random order is not the rendered one
    cfg = toy_base_config("tiny", copy_steps=0, perception_steps=0, shuffle_sections=True,
                          task_weights={"policy": 1.0, "lookup": 1.0})
    texts = [e.get("policy_text") or e["question"] for s in range(12) for e in batch_at(cfg, s)]
    in_order = lambda t: (lambda ls: ls == sorted(ls, key=render_order))([l for l in t.split("\n")[1:] if l.startswith("#")])
    assert not all(in_order(t) for t in texts)  # training draws shuffled policies ...
    assert all(in_order(i["policy_text"]) for i in policy_items("toy-tiny", 6, depths=(2, 3)))  # evaluation never
