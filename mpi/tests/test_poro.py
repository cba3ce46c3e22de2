"""The PolicyRollout loop on the tiny toy VLM: what is fed to the model, exactness, resume, sampling."""

import math

import pytest
import torch

from mpi import engine
from mpi import sampling
from mpi import poro
from mpi.grpo import completion_mask
from mpi.tests.rl_helpers import POLICY_MARK, letter_share_reward, rl_items, start_rl_from, toy_with_lora
from mpi.poro import collect_rollout, get_grpo_config, policy_free_batch, rollout, train_on_rollout, train_poro
from mpi.logprobs import build_scoring_batch, encode_images_once, forward_log_probs
from mpi.sampling import encode_prompts, prompt_texts, stop_token_ids

@pytest.fixture(scope="module")
def toy():
    return toy_with_lora(r=8)


@pytest.fixture
def fresh(toy):
    """The module's model with its LoRA weights reset to their initial values."""
    model, processor, build_messages, init = toy
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in init:
                p.copy_(init[n])
    return model, processor, build_messages


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_presets_and_validation():
    g = get_grpo_config("poro-grpo")
    assert (g.policy_rollout, g.epsilon, g.epsilon_high, g.beta, g.loss_type) == (True, 0.2, 0.3, 0.01, "grpo")
    d = get_grpo_config("poro-dapo")
    assert (d.epsilon, d.epsilon_high, d.beta, d.loss_type, d.dynamic_sampling, d.max_resample_tries) == \
        (0.2, 0.28, 0.0, "dapo", True, 20)
    assert not get_grpo_config("grpo").policy_rollout and not get_grpo_config("dapo").policy_rollout
    assert get_grpo_config("poro-grpo", num_generations=3).group_size == 6
    with pytest.raises(ValueError, match="unknown GRPO preset"):
        get_grpo_config("ppo")
    with pytest.raises(ValueError, match="num_generation"):
        get_grpo_config("grpo", num_generation=4)
    with pytest.raises(ValueError, match="loss_type"):
        get_grpo_config("grpo", loss_type="mean")


def test_scored_log_probs_equal_the_samplers(fresh):
    """Independent route: the log-probs the loss uses equal log_softmax of generate's own scores,
    for own responses behind the policy-free prompt and guided ones behind the policy prompt."""
    model, processor, build_messages = fresh
    items = rl_items(2)
    tf, imf = prompt_texts(processor, items, False, build_messages)
    tp, imp = prompt_texts(processor, items, True, build_messages)
    enc = encode_prompts(processor, [t for p in zip(tf, tp) for t in p], [i for p in zip(imf, imp) for i in p])
    enc.pop("num_images")
    stops = stop_token_ids(model, processor)
    cfg = get_grpo_config("poro-grpo", temperature=0.7, max_completion_length=6)
    torch.manual_seed(0)
    model.eval()
    gen_cfg = model.generation_config
    saved = (gen_cfg.top_k, gen_cfg.temperature, gen_cfg.repetition_penalty)
    # a checkpoint's own sampling defaults (Qwen-Instruct-like) must not leak into the rollout
    gen_cfg.top_k, gen_cfg.temperature, gen_cfg.repetition_penalty = 2, 0.1, 1.5
    try:
        out = model.generate(**enc, **sampling.sampling_kwargs(model, processor, cfg), num_return_sequences=2,
                             output_scores=True, return_dict_in_generate=True)
    finally:
        gen_cfg.top_k, gen_cfg.temperature, gen_cfg.repetition_penalty = saved
    comp = out.sequences[:, enc["input_ids"].shape[1]:]
    sampler = torch.log_softmax(torch.stack(out.scores, 1).float(), -1).gather(-1, comp[..., None])[..., 0]
    mask, _ = completion_mask(comp, stops)
    for rows, texts, images in ((torch.tensor([0, 1, 4, 5]), tf, imf), (torch.tensor([2, 3, 6, 7]), tp, imp)):
        batch = build_scoring_batch(processor, texts, images, comp[rows], mask[rows], torch.tensor([0, 0, 1, 1]))
        encode_images_once(model, batch)
        lp, _ = forward_log_probs(model, batch, torch.arange(4), 0.7)
        assert ((lp - sampler[rows]).abs() * mask[rows]).max() < 1e-4


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_guided_responses_are_scored_without_the_policy(fresh, monkeypatch, shared_prompt):
    """Every forward of the loss (new, old, reference) sees the policy-free prompt, guided rows included.

    shared_prompt=False: each pass feeds all 2G*2 rows as prompt + completion. True: each pass runs the 2
    policy-free prompts once (the multimodal model's input) and the completions on their KV cache."""
    model, processor, build_messages = fresh
    cfg = get_grpo_config("poro-grpo", num_generations=2, max_completion_length=6, num_iterations=2,
                          log_behaviour_ratio=False, progress=False, shared_prompt_scoring=shared_prompt)
    fed, fed_inner, generating = [], [], [False]
    real_generate = poro.generate_group

    def spy_generate(*args, **kwargs):
        generating[0] = True
        try:
            return real_generate(*args, **kwargs)
        finally:
            generating[0] = False

    def record(module, args, kwargs):
        fed.append((generating[0], kwargs["input_ids"].clone()))

    def record_inner(module, args, kwargs):  # the sampler's prefill and the shared-prompt pass enter here
        fed_inner.append((generating[0], kwargs["input_ids"].clone()))

    monkeypatch.setattr(poro, "generate_group", spy_generate)
    handle = model.get_base_model().register_forward_pre_hook(record, with_kwargs=True)
    handle_inner = model.get_base_model().model.register_forward_pre_hook(record_inner, with_kwargs=True)
    try:
        items = rl_items(2)
        torch.manual_seed(0)
        ro = rollout(model, processor, items, cfg, build_messages, letter_share_reward)
        opt = engine.make_optimizer(model, cfg)
        train_on_rollout(model, opt, processor, ro, cfg, build_messages)
    finally:
        handle.remove()
        handle_inner.remove()
    decode = processor.tokenizer.decode
    assert any(POLICY_MARK in decode(row) for gen, ids in fed_inner if gen for row in ids)  # the sampler saw it
    free = encode_prompts(processor, *prompt_texts(processor, items, False, build_messages))["input_ids"]
    T = ro.completion_ids.shape[1]
    if shared_prompt:
        # old (num_iterations > 1) + reference (beta > 0) + 2 iterations of new = 4 passes, each over the 2 prompts
        loss_feeds = [ids for gen, ids in fed_inner if not gen]
        assert not [ids for gen, ids in fed if not gen]  # no whole-sequence forward
        assert len(loss_feeds) == 4 and all(torch.equal(ids, free) for ids in loss_feeds)
        assert ro.guided.tolist() == [False, False, True, True] * 2
        return
    loss_feeds = [ids for gen, ids in fed if not gen]
    # old (num_iterations > 1) + reference (beta > 0) + 2 iterations of new = 4 passes over all 2G*2 rows
    assert len(loss_feeds) == 4 and all(ids.shape[0] == 8 for ids in loss_feeds)
    for ids in loss_feeds:
        for row in range(8):
            assert POLICY_MARK not in decode(ids[row])
            assert torch.equal(ids[row, :-T], free[row // 4])  # the policy-free prompt of its group
            assert torch.equal(ids[row, -T:], ro.completion_ids[row])
    assert ro.guided.tolist() == [False, False, True, True] * 2


def test_train_writes_metrics_by_origin_and_samples(fresh, tmp_path):
    model, processor, build_messages = fresh
    before = _trainable(model)
    cfg = get_grpo_config("poro-grpo", steps=2, num_generations=2, max_completion_length=6, prompts_per_step=2,
                          sample_every=2, progress=False, log_every=0, offpolicy_rule="tis")
    result = train_poro(model, processor, rl_items(3), cfg, tmp_path, build_messages=build_messages,
                        reward_fn=letter_share_reward)
    row = result.rows[-1]
    for origin in ("own", "guided", "all"):
        for key in ("reward_mean", "reward_std", "accuracy", "zero_std_frac", "advantage_mean", "kl", "entropy",
                    "clip_low_frac", "clip_high_frac", "completion_length", "truncated_frac", "ratio_mean"):
            assert f"{origin}/{key}" in row
    for key in ("guided/is_ratio_mean", "guided/is_ratio_max", "step_time", "gen_tokens_per_s", "loss"):
        assert math.isfinite(row[key])
    assert (tmp_path / "metrics.csv").exists() and (tmp_path / "samples" / "step_000002.html").exists()
    assert "data:image/png;base64" in (tmp_path / "samples" / "step_000002.html").read_text()
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    after = _trainable(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_resume_gives_identical_weights(toy, tmp_path):
    model, processor, build_messages, init = toy

    def reset():
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in init:
                    p.copy_(init[n])

    kw = dict(num_generations=2, max_completion_length=4, prompts_per_step=1, progress=False, log_every=0,
              sample_every=0, save_every=2, learning_rate=1e-2)
    reset()
    train_poro(model, processor, rl_items(3), get_grpo_config("poro-grpo", steps=4, **kw), tmp_path / "a",
               build_messages=build_messages, reward_fn=letter_share_reward, save_adapter=False)
    straight = _trainable(model)
    reset()
    train_poro(model, processor, rl_items(3), get_grpo_config("poro-grpo", steps=2, **kw), tmp_path / "b",
               build_messages=build_messages, reward_fn=letter_share_reward, save_adapter=False)
    # The resumed run must restore weights, optimizer, RNG, prompt order and the KL reference from the
    # checkpoint: start it from other weights, from which kl_reference="start" would otherwise copy its reference.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in init:
                p.normal_(0, 0.3)
    result = train_poro(model, processor, rl_items(3), get_grpo_config("poro-grpo", steps=4, **kw), tmp_path / "b",
                        resume=True, build_messages=build_messages, reward_fn=letter_share_reward, save_adapter=False)
    resumed = _trainable(model)
    assert any(not torch.equal(straight[n], init[n]) for n in init)  # training moved the weights
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)
    assert [r["step"] for r in result.rows] == [1, 2, 3, 4]


def test_dynamic_sampling_drops_flat_groups(fresh):
    model, processor, build_messages = fresh

    def flat_for_t0(items, texts):
        r = letter_share_reward(items, texts)["reward"]
        r = [1.0 if it["id"] == "t0" else x for it, x in zip(items, r)]
        return {"reward": r, "accuracy": r}

    cfg = get_grpo_config("poro-dapo", num_generations=2, max_completion_length=4, prompts_per_step=3)
    sampler = engine.PromptSampler(3, seed=0)
    torch.manual_seed(0)
    ro, tries = collect_rollout(model, processor, rl_items(3), sampler, cfg, build_messages, flat_for_t0)
    assert "t0" not in [it["id"] for it in ro.items] and ro.num_groups == 3 and tries >= 2
    assert ro.completion_ids.shape[0] == 3 * cfg.group_size

    def always_flat(items, texts):
        return {"reward": [0.0] * len(texts), "accuracy": [0.0] * len(texts)}

    ro, tries = collect_rollout(model, processor, rl_items(3), engine.PromptSampler(3, 0),
                                get_grpo_config("dapo", num_generations=2, max_completion_length=3,
                                                max_resample_tries=3), build_messages, always_flat)
    assert ro is None and tries == 3


def test_policy_free_batch_layout(fresh):
    model, processor, build_messages = fresh
    cfg = get_grpo_config("grpo", num_generations=3, max_completion_length=4)
    torch.manual_seed(1)
    ro = rollout(model, processor, rl_items(2), cfg, build_messages, letter_share_reward)
    batch = policy_free_batch(processor, ro, 3, build_messages)
    assert batch.prompt_index.tolist() == [0, 0, 0, 1, 1, 1] and not ro.guided.any()
    encode_images_once(model, batch)
    assert len(batch.image_features) == 2  # the vision tower ran once per prompt, not once per response


def test_one_update_moves_probability_towards_the_rewarded_response(fresh):
    """Independent check of the sign of the whole loss: after one step, the response with A > 0 gains
    sequence log-prob relative to its group mates with A < 0 (policy-free prompt, own and guided)."""
    model, processor, build_messages = fresh
    cfg = get_grpo_config("poro-grpo", num_generations=2, max_completion_length=5, learning_rate=5e-3, beta=0.0,
                          log_behaviour_ratio=False)
    torch.manual_seed(3)
    ro = rollout(model, processor, rl_items(1), cfg, build_messages, letter_share_reward)
    ro.rewards["reward"] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # reward the first guided response only

    def seq_logp():
        batch = policy_free_batch(processor, ro, 4, build_messages)
        with torch.no_grad():
            lp, _ = forward_log_probs(model, batch, torch.arange(4), 1.0)
        return (lp * ro.eos_mask).sum(1)

    before = seq_logp()
    train_on_rollout(model, engine.make_optimizer(model, cfg), processor, ro, cfg, build_messages)
    gain = seq_logp() - before
    assert gain[2] > 0 and gain[2] > gain[[0, 1, 3]].max()


def test_start_reference_is_the_policy_rl_started_from(toy):
    """kl_reference="start" keeps scoring with the weights RL started from after they move; "no_adapter" is the base."""
    import copy

    from mpi.modeling import reference_model

    model, processor, build_messages, _ = toy
    sft = copy.deepcopy(model)
    with torch.no_grad():  # a "trained" SFT adapter that RL continues
        for n, p in sft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    batch = encode_prompts(processor, *prompt_texts(processor, rl_items(1), False, build_messages))
    batch.pop("num_images")
    assert poro.make_reference(sft, get_grpo_config("poro-grpo", beta=0.0)) is None  # no KL, no reference pass
    reference = poro.make_reference(sft, get_grpo_config("poro-grpo"))  # the default: "start"
    with torch.no_grad():
        sft_logits = sft(**batch).logits
        with reference_model(sft):
            base_logits = sft(**batch).logits
        for n, p in sft.named_parameters():  # RL moves the adapter
            if "lora_" in n:
                p.add_(torch.randn_like(p))
        moved = _trainable(sft)
        moved_logits = sft(**batch).logits
        with reference(sft):
            ref_logits = sft(**batch).logits
        after = sft(**batch).logits
    assert not torch.allclose(sft_logits, base_logits, atol=1e-3) and not torch.allclose(moved_logits, sft_logits, atol=1e-3)
    assert torch.equal(ref_logits, sft_logits)  # the reference is the starting policy, not the base
    assert torch.equal(after, moved_logits) and all(torch.equal(moved[n], p) for n, p in sft.named_parameters() if n in moved)
    assert poro.make_reference(sft, get_grpo_config("poro-grpo", kl_reference="no_adapter")) is reference_model
    with pytest.raises(ValueError, match="kl_reference must be one of"):
        get_grpo_config("poro-grpo", kl_reference="sft")


def test_start_rl_from_makes_the_sft_policy_the_reference(toy):
    import copy

    from mpi.modeling import LoraSettings, reference_model

    model, processor, build_messages, _ = toy
    sft = copy.deepcopy(model)
    with torch.no_grad():  # a "trained" SFT adapter: non-zero B matrices
        for n, p in sft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    batch = encode_prompts(processor, *prompt_texts(processor, rl_items(1), False, build_messages))
    batch.pop("num_images")
    with torch.no_grad():
        sft_logits = sft(**batch).logits
        with reference_model(sft):
            base_logits = sft(**batch).logits
        rl = start_rl_from(sft, LoraSettings(r=4))
        with reference_model(rl):
            ref_logits = rl(**batch).logits
    assert not torch.allclose(sft_logits, base_logits, atol=1e-3)  # the adapter mattered
    assert torch.allclose(ref_logits, sft_logits, atol=1e-4)       # the RL reference is the SFT policy
