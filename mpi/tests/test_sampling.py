"""mpi.sampling on the tiny toy VLM: the hand-written sampler against HF generate, and the shared-prompt
scoring forward against the per-row forward."""

import pytest
import torch

from mpi import engine
from mpi import logprobs
from mpi import metrics
from mpi import sampling
from mpi import poro, sampling
from mpi.tests.rl_helpers import rl_items
from mpi.poro import get_grpo_config
from mpi.logprobs import build_scoring_batch, forward_log_probs
from mpi.sampling import encode_prompts, prompt_texts

@pytest.fixture(scope="module")
def toy():
    """toy-tiny with a non-zero LoRA (a fresh LoRA's B is 0: merged or not would then be trivially equal)."""
    from mpi.data.messages import build_messages
    from mpi.modeling import LoraSettings, load_model_and_processor

    model, processor = load_model_and_processor("toy-tiny", quantization=None, lora=LoraSettings(r=4), seed=0,
                                                device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    return model, processor, build_messages


def _mixed_prompts(processor, build_messages, items):
    """[free_1, policy_1, free_2, ...]: prompts of very different lengths, so left padding matters."""
    free = prompt_texts(processor, items, False, build_messages)
    pol = prompt_texts(processor, items, True, build_messages)
    texts = [t for pair in zip(free[0], pol[0]) for t in pair]
    images = [i for pair in zip(free[1], pol[1]) for i in pair]
    enc = encode_prompts(processor, texts, images)
    enc.pop("num_images")
    assert len(set(enc["attention_mask"].sum(1).tolist())) > 1  # really padded
    return texts, images, enc


def _hf_kwargs(model, processor, cfg, greedy=False):
    kw = sampling.sampling_kwargs(model, processor, cfg)
    if greedy:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def _ours(model, processor, enc, cfg, n, **kw):
    hf = sampling.sampling_kwargs(model, processor, cfg)
    return sampling.sample(model, enc, num_return_sequences=n, max_new_tokens=cfg.max_completion_length,
                           stop_ids=kw.pop("stop_ids", sampling.stop_token_ids(model, processor)),
                           pad_id=processor.tokenizer.pad_token_id, suppress_ids=hf["suppress_tokens"],
                           temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, **kw)


def test_greedy_equals_hf_generate(toy):
    model, processor, build = toy
    cfg = get_grpo_config("grpo", max_completion_length=12)
    _, _, enc = _mixed_prompts(processor, build, rl_items(2, id_prefix="s", numbered_query=True))
    hf = model.generate(**enc, **_hf_kwargs(model, processor, cfg, greedy=True))[:, enc["input_ids"].shape[1]:]
    for merge in (False, True):
        ours = _ours(model, processor, enc, cfg, 1, greedy=True, merge_lora=merge)["completion_ids"]
        assert torch.equal(ours, hf), f"merge_lora={merge}"


def test_sampled_tokens_equal_hf_generate_under_the_same_seed(toy):
    """Same logits, same filters, one multinomial per step (draw_method="multinomial") on the same RNG stream: the same draws
    (with the LoRA unmerged the logits match generate's to the last bit here; top-k and top-p active)."""
    model, processor, build = toy
    cfg = get_grpo_config("grpo", max_completion_length=10, temperature=0.8, top_p=0.9, top_k=50)
    _, _, enc = _mixed_prompts(processor, build, rl_items(2, id_prefix="s", numbered_query=True))
    torch.manual_seed(3)
    hf = model.generate(**enc, **_hf_kwargs(model, processor, cfg), num_return_sequences=3)
    torch.manual_seed(3)
    ours = _ours(model, processor, enc, cfg, 3, merge_lora=False, draw_method="multinomial")["completion_ids"]
    assert ours.shape == (enc["input_ids"].shape[0] * 3, hf.shape[1] - enc["input_ids"].shape[1])
    assert torch.equal(ours, hf[:, enc["input_ids"].shape[1]:])


def test_sampled_log_probs_equal_the_teacher_forced_log_probs(toy):
    """Independent route: the sampler's log-prob of each drawn token (merged LoRA, cached decode) equals
    forward_log_probs of the same tokens (unmerged LoRA, one full forward), at T = 0.7."""
    model, processor, build = toy
    cfg = get_grpo_config("grpo", max_completion_length=10, temperature=0.7)
    texts, images, enc = _mixed_prompts(processor, build, rl_items(2, id_prefix="s", numbered_query=True))
    torch.manual_seed(0)
    out = _ours(model, processor, enc, cfg, 2, return_log_probs=True)
    ids = out["completion_ids"]
    from mpi.grpo import completion_mask

    mask, _ = completion_mask(ids, sampling.stop_token_ids(model, processor))
    batch = build_scoring_batch(processor, texts, images, ids, mask, torch.arange(len(texts)).repeat_interleave(2))
    with torch.no_grad():
        for shared in (False, True):
            ref, _ = forward_log_probs(model, batch, torch.arange(ids.shape[0]), cfg.temperature, shared_prompt=shared)
            assert torch.allclose(out["log_probs"] * mask, ref * mask, atol=1e-4), f"shared_prompt={shared}"
    assert float(out["log_probs"][mask.bool()].min()) < -0.5  # really sampled, not near-greedy


def test_rows_stop_at_their_stop_token_and_the_loop_ends_when_all_have(toy):
    model, processor, build = toy
    cfg = get_grpo_config("grpo", max_completion_length=12)
    _, _, enc = _mixed_prompts(processor, build, rl_items(2, id_prefix="s", numbered_query=True))
    pad = processor.tokenizer.pad_token_id
    torch.manual_seed(1)
    free = _ours(model, processor, enc, cfg, 4, stop_ids=[-1])["completion_ids"]  # no stop: full length
    assert free.shape[1] == 12 and not (free == pad).any()
    # stop on the tokens the rows drew at step 3: each row ends there, pads after, and the loop stops early
    stops = sorted(set(free[:, 3].tolist()))
    torch.manual_seed(1)
    ids = _ours(model, processor, enc, cfg, 4, stop_ids=stops)["completion_ids"]
    assert ids.shape[1] <= 4
    for row in ids:
        hit = [k for k, t in enumerate(row.tolist()) if t in stops]
        assert hit, "every row reaches a stop token by step 3"
        assert (row[hit[0] + 1:] == pad).all()
    torch.manual_seed(1)
    one = _ours(model, processor, enc, cfg, 4, stop_ids=list(range(len(processor.tokenizer))))["completion_ids"]
    assert one.shape[1] == 1  # every token is a stop token: one step


def test_filter_logits_matches_hf_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    scores = torch.randn(5, 300, generator=torch.Generator().manual_seed(0)) * 3
    for t, k, p in ((0.7, 0, 1.0), (1.0, 20, 1.0), (1.3, 0, 0.8), (0.9, 40, 0.6)):
        expected = TemperatureLogitsWarper(t)(None, scores.clone())
        if k:
            expected = TopKLogitsWarper(k)(None, expected)
        if p < 1:
            expected = TopPLogitsWarper(p)(None, expected)
        assert torch.equal(sampling.filter_logits(scores.clone(), t, k, p), expected)


def test_lora_merged_gives_the_same_outputs_and_restores_weights_bit_for_bit(toy):
    model, processor, build = toy
    _, _, enc = _mixed_prompts(processor, build, rl_items(2, id_prefix="s", numbered_query=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        plain = model(**enc).logits
        with sampling.lora_merged(model) as merged:
            assert merged
            folded = model(**enc).logits
    assert torch.allclose(plain, folded, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with torch.no_grad(), sampling.lora_merged(model, budget_bytes=0) as merged:
        assert not merged  # over the budget: LoRA left as it is


def test_shared_prompt_scoring_equals_the_per_row_forward_with_gradients(toy):
    """Values and LoRA gradients of the shared-prompt forward equal the whole-sequence forward's, on rows
    of two prompts with completions of different lengths (a micro-batch that splits a group too)."""
    model, processor, build = toy
    items = rl_items(2, id_prefix="s", numbered_query=True)
    texts, images = prompt_texts(processor, items, False, build)
    g = torch.Generator().manual_seed(0)
    allowed = torch.tensor([t for t in range(5, 200) if t not in sampling.vision_token_ids(model)])
    ids = allowed[torch.randint(len(allowed), (6, 7), generator=g)]  # image placeholders would be image slots
    lengths = torch.tensor([7, 3, 5, 1, 7, 4])
    mask = (torch.arange(7)[None] < lengths[:, None]).long()
    batch = build_scoring_batch(processor, texts, images, ids, mask, torch.tensor([0, 0, 0, 1, 1, 1]))
    logprobs.encode_images_once(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    try:
        results = {}
        for shared in (False, True):
            for rows in (torch.arange(6), torch.tensor([1, 2, 3])):
                model.zero_grad(set_to_none=True)
                with engine.dropout_disabled(model):
                    lp, ent = forward_log_probs(model, batch, rows, 0.9, with_entropy=True, shared_prompt=shared)
                (lp * mask[rows]).sum().backward()
                results[shared, len(rows)] = (lp.detach() * mask[rows], ent.detach() * mask[rows],
                                              [p.grad.clone() for p in params])
    finally:
        model.eval()
    for n in (6, 3):
        (lp0, e0, g0), (lp1, e1, g1) = results[False, n], results[True, n]
        assert torch.allclose(lp0, lp1, atol=1e-5) and torch.allclose(e0, e1, atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g0, g1))
        assert any(float(a.abs().max()) > 0 for a in g0)


def test_rollout_samples_the_same_completions_with_either_sampler(toy):
    """generate_from_prompts: sampler="fast" (LoRA unmerged and multinomial draws here) draws what
    sampler="hf" (model.generate) draws from the same seed, PoRo layout included."""
    model, processor, build = toy
    texts, images, _ = _mixed_prompts(processor, build, rl_items(2, id_prefix="s", numbered_query=True))
    out = {}
    for name in ("hf", "fast"):
        cfg = get_grpo_config("poro-grpo", num_generations=2, max_completion_length=8, sampler=name)
        torch.manual_seed(5)
        if name == "fast":
            real = sampling.sample
            try:  # unmerged LoRA: the same float operations as generate, so the same draws
                sampling.sample = lambda *a, **k: real(*a, **{**k, "merge_lora": False, "draw_method": "multinomial"})
                out[name] = sampling.generate_from_prompts(model, processor, texts, images, cfg)["completion_ids"]
            finally:
                sampling.sample = real
        else:
            out[name] = sampling.generate_from_prompts(model, processor, texts, images, cfg)["completion_ids"]
    assert torch.equal(out["hf"], out["fast"])
    with pytest.raises(ValueError, match="sampler"):
        get_grpo_config("grpo", sampler="vllm")


@pytest.mark.parametrize("sampler", ["fast", "hf"])
def test_is_log_at_one_iteration_needs_no_extra_scoring_pass(toy, sampler):
    """num_iterations=1: pi_old comes from the trained pass's detached log-probs and, with the fast sampler,
    the behaviour pi_old(o|q,P) from the sampler's own log-probs, so no no-grad pass runs at all (generate
    gives no log-probs: then the one pass behind the policy prompt). The IS metrics equal the ones computed
    by hand from two no-grad scoring passes."""
    model, processor, build = toy
    cfg = get_grpo_config("poro-grpo", num_generations=2, max_completion_length=6, beta=0.0, learning_rate=0.0,
                          log_behaviour_ratio=True, progress=False, sampler=sampler)
    torch.manual_seed(0)
    ro = poro.rollout(model, processor, rl_items(2, id_prefix="s", numbered_query=True), cfg, build,
                      lambda its, txts: {"reward": [float(len(t) % 3) for t in txts], "accuracy": [0.0] * len(txts)})
    batch = poro.policy_free_batch(processor, ro, 4, build)
    logprobs.encode_images_once(model, batch)
    bb = poro.behaviour_batch(processor, ro, build)
    logprobs.encode_images_once(model, bb)
    behaviour = torch.zeros_like(ro.eos_mask, dtype=torch.float32)
    behaviour[ro.guided] = poro.score_no_grad(model, bb, cfg)
    if sampler == "fast":  # the sampler's log-probs are the scoring pass's (merged vs unmerged LoRA: rounding)
        assert torch.allclose(ro.sample_log_probs[ro.guided], behaviour[ro.guided] * ro.eos_mask[ro.guided], atol=1e-4)
    else:
        assert ro.sample_log_probs is None
    expected = metrics.behaviour_ratio_metrics(poro.score_no_grad(model, batch, cfg), behaviour, ro.eos_mask, ro.guided,
                                            cfg.tis_cap)
    calls = []
    real = poro.score_no_grad
    poro.score_no_grad = lambda m, b, c, reference=None: calls.append(b.num_rows) or real(m, b, c, reference)
    try:
        m = poro.train_on_rollout(model, engine.make_optimizer(model, cfg), processor, ro, cfg, build)
    finally:
        poro.score_no_grad = real
        model.eval()
    assert "guided/is_ratio_mean" in expected
    assert calls == ([] if sampler == "fast" else [int(ro.guided.sum())])
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_the_is_log_changes_no_sample_and_no_update(toy):
    """log_behaviour_ratio only adds metrics: the same completions and, after one update, the same weights bit
    for bit (the sampler's log-probs draw no random numbers), so turning it on cannot move a result."""
    model, processor, build = toy
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out = {}
    for log in (False, True):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in init:
                    p.copy_(init[n])
        cfg = get_grpo_config("poro-grpo", num_generations=2, max_completion_length=6, learning_rate=1e-3,
                              log_behaviour_ratio=log, progress=False)
        torch.manual_seed(0)
        ro = poro.rollout(model, processor, rl_items(2, id_prefix="s", numbered_query=True), cfg, build,
                          lambda its, txts: {"reward": [float(len(t) % 3) for t in txts], "accuracy": [0.0] * len(txts)})
        m = poro.train_on_rollout(model, engine.make_optimizer(model, cfg), processor, ro, cfg, build,
                                  poro.make_reference(model, cfg))
        model.eval()
        out[log] = (ro.completion_ids, {n: p.detach().clone() for n, p in model.named_parameters() if n in init}, m)
    assert torch.equal(out[False][0], out[True][0])
    assert any(not torch.equal(out[True][1][n], init[n]) for n in init)  # the update really moved the weights
    assert all(torch.equal(out[False][1][n], out[True][1][n]) for n in init)
    assert "guided/is_ratio_mean" in out[True][2] and "guided/is_ratio_mean" not in out[False][2]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in init:
                p.copy_(init[n])


def test_gradient_checkpointing_falls_back_to_the_per_row_forward():
    """Checkpointed layers drop the KV cache in a gradient-tracking forward, so the shared-prompt path must
    not be taken there; the log-probs and gradients stay those of the plain model."""
    from mpi.data.messages import build_messages
    from mpi.modeling import LoraSettings, load_model_and_processor

    model, processor = load_model_and_processor("toy-tiny", quantization=None, lora=LoraSettings(r=4), seed=0,
                                                device="cpu", gradient_checkpointing=True)
    texts, images = prompt_texts(processor, rl_items(1, id_prefix="s", numbered_query=True), False, build_messages)
    ids = torch.tensor([[30, 31, 32, 33], [34, 35, 36, 37]])
    batch = build_scoring_batch(processor, texts, images, ids, torch.ones_like(ids), torch.tensor([0, 0]))
    model.train()
    with engine.dropout_disabled(model):
        assert not sampling.shared_prompt_supported(model)
        with torch.no_grad():
            assert sampling.shared_prompt_supported(model)  # no gradients: the cache path is fine
            expected, _ = forward_log_probs(model, batch, torch.arange(2), 1.0, shared_prompt=False)
        lp, _ = forward_log_probs(model, batch, torch.arange(2), 1.0)
    lp.sum().backward()
    assert torch.allclose(lp.detach(), expected, atol=1e-5)
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in model.parameters() if p.requires_grad)


def test_inverse_cdf_draw_is_the_categorical_distribution():
    """200k draws from a fixed distribution with a zero and a tiny entry: frequencies within 5 sigma of the
    probabilities, the zero-probability tokens never drawn (first, middle and last index)."""
    probs = torch.tensor([0.0, 0.5, 0.2, 0.0, 0.25, 0.049, 0.001, 0.0]).repeat(20000, 1)
    torch.manual_seed(0)
    counts = torch.zeros(8)
    for _ in range(10):
        counts += torch.bincount(sampling.draw(probs), minlength=8).float()
    n = counts.sum()
    p = probs[0]
    sigma = (n * p * (1 - p)).sqrt()
    assert n == 200000 and counts[p == 0].sum() == 0
    assert ((counts - n * p).abs() <= 5 * sigma + 1e-9).all(), counts / n
    assert torch.equal(sampling.draw(torch.tensor([[0.0, 0.0, 1.0]]), "multinomial"), torch.tensor([2]))
    with pytest.raises(ValueError, match="draw method"):
        sampling.draw(probs[:1], "gumbel")


def test_length_buckets_split_short_from_long_prompts():
    assert sampling.length_buckets([83, 300, 80, 298]) == [[2, 0], [3, 1]]
    assert sampling.length_buckets([83, 84, 90]) == [[0, 1, 2]]  # plain GRPO: one bucket, one prefill
    assert sampling.length_buckets([10, 12, 13, 16, 17]) == [[0, 1], [2, 3], [4]]  # <= 1.25x the bucket's shortest


def test_bucketed_prefill_equals_one_padded_prefill(toy):
    """Policy-free and policy prompts prefilled in two length buckets, their caches left-padded into one: the
    same last hidden states and the same keys / values at every real position as one prefill of all prompts."""
    model, processor, build = toy
    _, _, enc = _mixed_prompts(processor, build, rl_items(3, id_prefix="s", numbered_query=True))
    base, inner, lm = sampling._vl_parts(model)
    lengths = enc["attention_mask"].sum(1).tolist()
    assert len(sampling.length_buckets(lengths)) == 2  # the bucketed path really runs
    positions, _ = sampling._prompt_positions(inner, enc)
    with torch.no_grad():
        cache, hidden = sampling.prefill(base, inner, lm, enc, positions)
        from transformers import DynamicCache

        joint = DynamicCache(config=lm.config)
        out = inner(**enc, position_ids=positions, cache=joint, use_cache=True)
    assert torch.allclose(hidden, out.last_hidden_state[:, -1], atol=1e-5)
    real = enc["attention_mask"].bool()
    for ours, theirs in zip(cache.layers, joint.layers):
        assert ours.keys.shape == theirs.keys.shape
        for k_ours, k_theirs in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
            a, b = k_ours.transpose(1, 2)[real], k_theirs.transpose(1, 2)[real]  # (real tokens, heads, dim)
            assert torch.allclose(a, b, atol=1e-5)
        assert (ours.keys.transpose(1, 2)[~real] == 0).all()  # padding: zeros, masked out
