"""The loss masks of VM-CPT and SFT, checked against the processor's own image-token count and the target text."""

import json

import pytest
import torch
from PIL import Image

from mpi.collate import IGNORE_INDEX, SupervisedCollator, describe_labels, render_loss_mask, visual_token_ids

POLICY_LINE = "# Condition 1.1 zebra marker rule"  # appears only in the policy text




def image(color, size=56):
    return Image.new("RGB", (size, size), color)


def clevr_item(n_policy_images=0, cot="Condition 1 holds, go to 1.1. So Case 3.", answer="Case 3", id="c0"):
    policy = "Policy: L2-Test\n" + POLICY_LINE + "\n" + "".join(f"value <image> here.\n" for _ in range(n_policy_images))
    return {"id": id, "dataset": "clevr", "variant": "M" if n_policy_images else "T", "depth": 2,
            "policy_name": "L2-Test", "policy_text": policy,
            "policy_images": [image((10 * k, 200, 30), 28) for k in range(n_policy_images)],
            "images": [image((200, 30, 30))], "query": "According to the Policy: L2-Test, what should be the response?",
            "cot": cot, "answer": answer, "gold_path": ["1", "1.1"], "override": False, "extra": "{}"}


def gta_item(n_images=2, id="g0"):
    extra = {"profile": {"account_type": "A", "credits": 300, "age": 30},
             "image_paths": [f"image/image_{k}.jpg" for k in range(n_images)]}
    return {"id": id, "dataset": "gta", "variant": "gta", "depth": 0, "policy_name": "tools",
            "policy_text": "Tools:\n" + POLICY_LINE + "\nOCR_v1 reads text.", "policy_images": [],
            "images": [image((30, 30 * k, 200)) for k in range(n_images)], "query": "Read the sign.",
            "cot": "The user has 300 credits, so OCR_v4.", "answer": json.dumps({"name": "OCR_v4", "arguments": {"image": "image/image_0.jpg"}}),
            "gold_path": [], "override": False, "extra": json.dumps(extra)}


@pytest.fixture(scope="module")
def processor(toy_model_and_processor):
    return toy_model_and_processor[1]


def image_pads_inserted(processor, batch):
    """Image-pad tokens the processor inserted: one per merged patch of each image's grid."""
    merge = processor.image_processor.merge_size
    return int(batch["image_grid_thw"].prod(dim=-1).sum()) // merge**2


def check_cpt_mask(processor, batch, n_images):
    ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
    tok = processor.tokenizer
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    markers = {tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|vision_end|>")}
    masked = labels == IGNORE_INDEX
    # exactly the visual tokens and the padding are masked ...
    expected = (ids == pad_id) | torch.isin(ids, torch.tensor(sorted(markers))) | (attn == 0)
    assert torch.equal(masked, expected)
    # ... counted against what the processor inserted: every image-pad token, two markers per image
    real = attn == 1
    assert int((masked & real & (ids == pad_id)).sum()) == image_pads_inserted(processor, batch)
    assert int((masked & real).sum()) == image_pads_inserted(processor, batch) + 2 * n_images
    # and everything else carries its own token as label
    assert torch.equal(labels[~masked], ids[~masked])


def test_cpt_mask_one_image(processor):
    batch = SupervisedCollator(processor, "cpt")([clevr_item()])
    assert image_pads_inserted(processor, batch) == 4  # toy-tiny: 56 px -> 4 tokens
    check_cpt_mask(processor, batch, n_images=1)


def test_cpt_mask_policy_images_and_several_input_images_with_padding(processor):
    items = [clevr_item(n_policy_images=2, id="m"), gta_item(n_images=3, id="g"), clevr_item(id="t")]
    batch = SupervisedCollator(processor, "cpt")(items)
    assert batch["image_grid_thw"].shape[0] == 3 + 3 + 1  # policy images are in the sequence too
    assert (batch["attention_mask"] == 0).any()  # rows of different length: padding is exercised
    check_cpt_mask(processor, batch, n_images=7)
    for row, item in enumerate(items):  # each row's own images
        n_img = len(item["images"]) + len(item["policy_images"])
        pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert int((batch["input_ids"][row] == pad_id).sum()) == 4 * n_img


def test_vision_markers_can_be_supervised(processor):
    batch = SupervisedCollator(processor, "cpt", mask_vision_markers=False)([clevr_item(n_policy_images=1)])
    start = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert (batch["labels"] == start).sum() == 2  # two images, markers now targets
    assert set(visual_token_ids(processor, False)) < set(visual_token_ids(processor, True))


@pytest.mark.parametrize("mode", ["cot-sft", "direct-sft"])
def test_sft_mask_covers_exactly_the_target(processor, mode):
    items = [clevr_item(id="a"), clevr_item(cot="Short.", answer="Case 1", id="b"), gta_item(n_images=2)]
    batch = SupervisedCollator(processor, mode)(items)
    tok = processor.tokenizer
    for row, item in enumerate(items):
        labels = batch["labels"][row]
        positions = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
        assert torch.equal(positions, torch.arange(int(positions[0]), int(positions[-1]) + 1))  # one contiguous span
        cot = item["cot"] if mode == "cot-sft" else None
        target = (f"<think>{cot}</think>\n" if cot else "") + "\\boxed{" + item["answer"] + "}" + tok.eos_token
        assert tok.decode(labels[positions]) == target
        assert labels[positions].tolist() == tok(target, add_special_tokens=False)["input_ids"]
        assert torch.equal(labels[positions], batch["input_ids"][row, positions])
        # what follows the target is only the template's newline, then padding
        assert tok.decode(batch["input_ids"][row, int(positions[-1]) + 1:][batch["attention_mask"][row, int(positions[-1]) + 1:] == 1]) == "\n"


def test_policy_in_every_cpt_sequence_and_in_no_sft_sequence(processor):
    items = [clevr_item(), clevr_item(n_policy_images=2), gta_item()]
    decoded = {mode: processor.tokenizer.batch_decode(SupervisedCollator(processor, mode)(items)["input_ids"])
               for mode in ("cpt", "cot-sft", "direct-sft")}
    assert all(POLICY_LINE in text for text in decoded["cpt"])
    assert not any(POLICY_LINE in text for mode in ("cot-sft", "direct-sft") for text in decoded[mode])
    # the input image is present without the policy, the policy images are not
    pad = "<|image_pad|>"
    assert [t.count(pad) for t in decoded["cot-sft"]] == [4, 4, 8]
    assert [t.count(pad) for t in decoded["cpt"]] == [4, 12, 8]


def test_policy_in_context_frac_shows_the_policy_in_a_fixed_share_of_batches_with_the_same_target(processor):
    batches = [[{"id": f"i{k}"}, {"id": f"j{k}"}] for k in range(400)]
    def shown(frac, seed):
        collate = SupervisedCollator(processor, "cot-sft", policy_in_context_frac=frac, seed=seed)
        return [collate.shows_policy(b) for b in batches]
    assert not any(shown(0.0, 0)) and all(shown(1.0, 0))
    quarter = shown(0.25, 0)
    # binomial(400, 0.25): mean 100, std 8.7; 70..130 is beyond 3 std either way
    assert 70 <= sum(quarter) <= 130
    assert shown(0.25, 0) == quarter  # a resumed run replays the same batches and picks the same ones
    assert shown(0.25, 1) != quarter  # another seed, another share
    # a larger fraction adds batches and drops none (one uniform draw per batch)
    half = shown(0.5, 0)
    assert all(h for q, h in zip(quarter, half) if q) and sum(half) > sum(quarter)

    items = [clevr_item(id="a"), gta_item(n_images=2)]
    plain = SupervisedCollator(processor, "cot-sft")(items)
    with_policy = SupervisedCollator(processor, "cot-sft", policy_in_context_frac=1.0)(items)
    tok = processor.tokenizer
    for row in range(len(items)):  # the whole batch shows it
        assert POLICY_LINE in tok.decode(with_policy["input_ids"][row])
        assert POLICY_LINE not in tok.decode(plain["input_ids"][row])
        # the prompt grew by the policy; the loss is still on the response only, the same tokens
        targets = [b["labels"][row][b["labels"][row] != IGNORE_INDEX].tolist() for b in (plain, with_policy)]
        assert targets[0] == targets[1]
        assert with_policy["attention_mask"][row].sum() > plain["attention_mask"][row].sum()


def test_collator_errors_name_the_problem(processor):
    with pytest.raises(ValueError, match="max_length=50"):
        SupervisedCollator(processor, "cpt", max_length=50)([clevr_item(id="long-one")])
    with pytest.raises(ValueError, match="'cot' field is empty"):
        SupervisedCollator(processor, "cot-sft")([clevr_item(cot="")])
    with pytest.raises(ValueError, match="mode must be one of"):
        SupervisedCollator(processor, "pretrain")
    with pytest.raises(ValueError, match="policy_in_context_frac must be in"):
        SupervisedCollator(processor, "cot-sft", policy_in_context_frac=1.5)
    with pytest.raises(ValueError, match="always has the policy"):
        SupervisedCollator(processor, "cpt", policy_in_context_frac=0.5)
    # direct SFT does not need a CoT
    assert SupervisedCollator(processor, "direct-sft")([clevr_item(cot="")])["labels"].ne(IGNORE_INDEX).any()


def test_loss_mask_rendering_marks_masked_tokens(processor):
    batch = SupervisedCollator(processor, "cpt")([clevr_item()])
    pairs = describe_labels(processor, batch)
    assert len(pairs) == int(batch["attention_mask"].sum())
    html = render_loss_mask(pairs)
    assert html.count("line-through") == sum(not s for _, s in pairs)
    assert html.count("#c8f7c5") == sum(s for _, s in pairs)
