"""The toy presets' world: sprite scenes a toy can see, compact policies it can read, tokens that make both cheap."""

import pytest

from mpi.data.policies import Condition, Node, Policy

RED_METAL_CUBE = {"shape": "cube", "color": "red", "size": "large", "material": "metal"}
SMALL_BLUE_BALL = {"shape": "sphere", "color": "blue", "size": "small", "material": "rubber"}


def _policy() -> Policy:
    """#1 metal? yes -> #1.1 cube? (Case 4 / Case 2); no -> #1.2 small? (Case 3 / Case 1)."""
    leaf = lambda i, k: Node(id=i, outcome=f"Case {k}")  # noqa: E731
    root = Node(id="1", condition=Condition("material", "metal"),
                yes=Node(id="1.1", condition=Condition("shape", "cube"), yes=leaf("1.1.1", 4), no=leaf("1.1.2", 2)),
                no=Node(id="1.2", condition=Condition("size", "small"), yes=leaf("1.2.1", 3), no=leaf("1.2.2", 1)))
    return Policy(name="L2-Tovasi", depth=2, root=root)


def test_compact_policy_and_evidence_first_cot_by_hand():
    from mpi.data.clevr import compact_cot
    from mpi.data.policies import COMPACT_INSTRUCTION

    policy = _policy()
    assert policy.render_compact() == (f"Policy: L2-Tovasi. {COMPACT_INSTRUCTION}\n#1 metal\n#1.1 cube\n#1.2 small\n"
                                       "#1.1.1 Case 4\n#1.1.2 Case 2\n#1.2.1 Case 3\n#1.2.2 Case 1\n")
    scene = {"objects": [RED_METAL_CUBE, SMALL_BLUE_BALL]}
    assert compact_cot(policy, scene) == ("colors: red, blue. shapes: cube, sphere. sizes: small, large. "
                                          "materials: rubber, metal.\n#1 metal? yes\n#1.1 cube? yes\n#1.1.1 Case 4")
    scene = {"objects": [SMALL_BLUE_BALL]}  # no metal, and small: Case 3
    assert compact_cot(policy, scene).endswith("\n#1 metal? no\n#1.2 small? yes\n#1.2.1 Case 3")
    assert policy.evaluate(scene)[0] == "Case 3"


def test_compact_conditions_name_the_words_the_scene_lists():
    from mpi.data.policies import compact_condition

    assert compact_condition(Condition("color", "cyan")) == "cyan"
    assert compact_condition(Condition("shape", "cube", kind="and", attr2="color", value2="red")) == "red cube"
    assert compact_condition(Condition("color", "red", kind="count", count=2)) == "at least 2 red objects"


def test_section_ids_and_cases_are_one_token_each(toy_model_and_processor):
    _, processor = toy_model_and_processor
    tok = processor.tokenizer
    for text in ("#1", "#1.2.1", "#1.2.2.1.1.2.1", "Case 1", "Case 12", " Case 64"):
        assert len(tok(text, add_special_tokens=False)["input_ids"]) == 1, text
    # longest match first: "#1.1.2" is not "#1.1" + ".2", "Case 12" is not "Case 1" + "2"
    assert tok.tokenize("#1.1.2 Case 12\n\\boxed{Case 1}") == ["#1.1.2", " Case 12", "Ċ", "\\", "boxed", "{",
                                                               "Case 1", "}"]
    assert tok.decode(tok("#1.1.2 Case 12")["input_ids"]) == "#1.1.2 Case 12"


def test_referral_reads_compact_section_ids_but_not_the_leaf():
    from mpi.data.clevr import compact_cot
    from mpi.evaluate import cited_conditions, referral_score

    policy = _policy()
    scene = {"objects": [RED_METAL_CUBE]}
    cot = compact_cot(policy, scene)
    assert cited_conditions(cot) == ["1", "1.1"] == policy.evaluate(scene)[1]
    assert referral_score(cot, ["1", "1.1"])["exact"]
    assert cited_conditions("#1 metal? no\n#1.2.1 Case 3") == ["1"]
    assert cited_conditions("# Condition 1.2: is there a cube?") == ["1.2"]  # the paper's format still reads


def test_sprite_layout_is_one_object_per_cell_and_a_function_of_the_scene():
    from mpi.data.sprites import cell_objects, sprite_layout

    objects = [dict(RED_METAL_CUBE, color=c) for c in ("red", "blue", "green", "yellow", "cyan", "gray")]
    scene = {"image_index": 7, "image_filename": "MPI_x_000007.png", "objects": objects}
    cells = sprite_layout(scene)
    assert len(set(cells)) == 6 and all(0 <= c < 16 for c in cells)
    assert sprite_layout(dict(scene)) == cells
    assert sprite_layout({**scene, "image_index": 8}) != cells  # another scene, another layout (almost surely)
    by_token = cell_objects(scene, 4)
    assert {t: o["color"] for t, o in by_token.items()} == {c: o["color"] for c, o in zip(cells, objects)}
    with pytest.raises(ValueError, match="16 cells"):
        sprite_layout({"objects": [RED_METAL_CUBE] * 17})


def test_sprites_draw_each_object_in_its_cell():
    from mpi.data.scenes import COLOR_RGB
    from mpi.data.sprites import BACKGROUND, sprite_layout, render_sprites

    rubber_cube = dict(RED_METAL_CUBE, material="rubber")
    scene = {"image_index": 1, "image_filename": "a.png", "objects": [rubber_cube, dict(SMALL_BLUE_BALL, size="large")]}
    image = render_sprites(scene, 112)
    assert image.size == (112, 112)
    for obj, cell in zip(scene["objects"], sprite_layout(scene)):
        row, col = divmod(cell, 4)
        pixel = image.getpixel((col * 28 + 14, row * 28 + 14))  # the cell's centre is the object's colour
        assert all(abs(p - q) <= 10 for p, q in zip(pixel, COLOR_RGB[obj["color"]])), (obj, pixel)
    empty = [c for c in range(16) if c not in sprite_layout(scene)][0]
    row, col = divmod(empty, 4)
    assert image.getpixel((col * 28 + 14, row * 28 + 14)) == BACKGROUND


def test_the_toy_presets_build_sprite_scenes_and_compact_policies():
    from mpi.data import build_clevr_policy, get_data_config

    cfg = get_data_config("toy", n_policies=1, n_train_per_policy=2, n_test=1)
    assert (cfg.world, cfg.policy_format) == ("sprites", "compact")
    ds = build_clevr_policy(cfg, "train")
    row = ds[0]
    assert row["policy_text"].startswith(f"Policy: {row['policy_name']}. Start at #1.")
    assert row["cot"].startswith("colors: ") and row["cot"].endswith(row["answer"])
    assert get_data_config("colab").world == "clevr" and get_data_config("colab").policy_format == "paper"
    with pytest.raises(ValueError, match="DataConfig.world"):
        get_data_config("toy", world="voxels")
