"""PolicyRollout's controls and validation metrics: which prompts each sampling pass really used.

wrong_policy: the guided half sees ANOTHER policy's text (is the gain internalization or just context?).
adaptive_guidance: guided samples only for groups whose own samples are all wrong; the others get G more own.
validation_metrics: sampled accuracy, pass@k and greedy accuracy on fixed items, without disturbing training.
"""

import pytest
import torch
from PIL import Image

from mpi import engine
from mpi import metrics
from mpi import sampling
from mpi import poro
from mpi.poro import get_grpo_config
from mpi.tests.rl_helpers import toy_with_lora

MARKS = {"L2-Alpha": "# Rulebook ALPHA: if red, Case 1.", "L2-Beta": "# Rulebook BETA: if blue, Case 2."}


def _items():
    colors = [(200, 20, 20), (20, 200, 20), (20, 20, 200)]
    names = ["L2-Beta", "L2-Alpha", "L2-Beta"]
    return [dict(id=f"t{i}", dataset="clevr", variant="T", depth=2, policy_name=name, policy_text=MARKS[name],
                 policy_images=[], images=[Image.new("RGB", (56, 56), colors[i])],
                 query=f"According to the Policy: {name}, what should be the response for the given image?",
                 cot="ok", answer=f"Case {i + 1}", gold_path=["1"], override=False, extra="{}")
            for i, name in enumerate(names)]


@pytest.fixture(scope="module")
def toy():
    return toy_with_lora(r=4)


@pytest.fixture
def spy_generate(monkeypatch):
    """Records every generate call's prompt texts and completions."""
    calls = []
    real = sampling.generate_from_prompts

    def spy(model, processor, texts, images, cfg, **kw):
        out = real(model, processor, texts, images, cfg, **kw)
        calls.append((list(texts), out["completion_ids"].clone()))
        return out

    monkeypatch.setattr(poro, "generate_from_prompts", spy)
    return calls


def _policy_in(text):
    found = [name for name, mark in MARKS.items() if mark in text]
    assert len(found) <= 1
    return found[0] if found else None


def _reset(model, init):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in init:
                p.copy_(init[n])


def test_wrong_policy_guide_is_the_next_policy_by_name():
    items = _items()
    guide = poro.wrong_policy_guide(items)
    for item in items:
        g = guide(item)
        other = "L2-Beta" if item["policy_name"] == "L2-Alpha" else "L2-Alpha"
        assert g["policy_name"] == other and g["policy_text"] == MARKS[other]
        assert {k: g[k] for k in ("id", "images", "query", "answer")} == {k: item[k] for k in ("id", "images", "query", "answer")}
    with pytest.raises(ValueError, match="at least two policies"):
        poro.wrong_policy_guide([items[0], items[2]])


def test_wrong_policy_run_samples_with_the_other_policy_and_rewards_the_real_item(toy, spy_generate, tmp_path):
    model, processor, build_messages, init = toy
    _reset(model, init)
    built, rewarded = [], []

    def recording_build(item, *, with_policy=False, **kw):
        built.append((item["id"], with_policy, item["policy_text"]))
        return build_messages(item, with_policy=with_policy, **kw)

    def reward(items, texts):
        rewarded.extend((it["id"], it["answer"], it["policy_text"]) for it in items)
        return {"reward": [len(t) % 3 / 2 for t in texts], "accuracy": [0.0] * len(texts)}

    cfg = get_grpo_config("poro-grpo", guided_context="wrong_policy", steps=1, num_generations=2, prompts_per_step=3,
                          max_completion_length=4, progress=False, log_every=0, sample_every=0)
    poro.train_poro(model, processor, _items(), cfg, tmp_path, build_messages=recording_build, reward_fn=reward,
                    save_adapter=False)
    own = {it["id"]: it for it in _items()}
    (texts, _), = spy_generate  # one batched generate: [free, policy] per item
    for k, prompt in enumerate(texts):
        group = texts[k - k % 2]
        item_id = next(i for i, it in own.items() if it["query"] in group and it["query"] in prompt)
        expected = None if k % 2 == 0 else ("L2-Alpha" if own[item_id]["policy_name"] == "L2-Beta" else "L2-Beta")
        assert _policy_in(prompt) == expected, (k, prompt)
    with_policy = [(i, text) for i, wp, text in built if wp]  # the sampler's and the behaviour pass's
    assert with_policy and all(text != own[i]["policy_text"] for i, text in with_policy)
    assert all(ans == own[i]["answer"] and text == own[i]["policy_text"] for i, ans, text in rewarded)


def test_adaptive_guidance_guides_only_the_all_wrong_groups(toy, spy_generate):
    model, processor, build_messages, init = toy
    _reset(model, init)

    def solved_t0(items, texts):  # t0's answers are all right, every other item's all wrong
        acc = [1.0 if it["id"] == "t0" else 0.0 for it in items]
        return {"reward": [a + len(t) % 3 / 10 for a, t in zip(acc, texts)], "accuracy": acc}

    cfg = get_grpo_config("poro-grpo", adaptive_guidance=True, num_generations=2, max_completion_length=5)
    items = _items()[:2]
    torch.manual_seed(0)
    ro = poro.rollout(model, processor, items, cfg, build_messages, solved_t0)
    (first_texts, first_ids), (second_texts, second_ids) = spy_generate
    assert [_policy_in(t) for t in first_texts] == [None, None]  # G own samples for every item first
    assert [_policy_in(t) for t in second_texts] == [None, "L2-Alpha"]  # t0 solved: own again; t1: guided
    assert ro.guided.tolist() == [False, False, False, False, False, False, True, True]
    assert ro.completion_ids.shape[0] == 2 * cfg.group_size  # every group keeps 2G rows

    def same(row, ids, k):  # rows agree up to the padding to a common width
        n = min(ids.shape[1], ro.completion_ids.shape[1])
        return torch.equal(ro.completion_ids[row, :n], ids[k, :n])

    assert all(same(r, first_ids, k) for r, k in [(0, 0), (1, 1), (4, 2), (5, 3)])
    assert all(same(r, second_ids, k) for r, k in [(2, 0), (3, 1), (6, 2), (7, 3)])
    assert ro.rewards["accuracy"].tolist() == [1.0] * 4 + [0.0] * 4
    built = []

    def recording_build(item, *, with_policy=False, **kw):
        built.append((item["id"], with_policy))
        return build_messages(item, with_policy=with_policy, **kw)

    m = poro.train_on_rollout(model, engine.make_optimizer(model, cfg), processor, ro, cfg, recording_build)
    assert m["guidance/guided_group_frac"] == 0.5 and "guided/reward_mean" in m
    # the loss sees only policy-free prompts; the IS ratio's behaviour log-probs are the sampler's (t1's guided
    # half), so no scoring pass runs behind a policy prompt
    assert sorted(set(built)) == [("t0", False), ("t1", False)]
    assert ro.sample_log_probs is not None and bool((ro.sample_log_probs[ro.guided] < 0).any())
    assert 0 < m["guided/is_ratio_mean"] < float("inf")
    assert m["guided/zero_std_frac"] in (0.0, 1.0)  # one guided group only: its pair is flat or not
    with pytest.raises(ValueError, match="adaptive_guidance needs policy_rollout"):
        get_grpo_config("grpo", adaptive_guidance=True)


def test_the_controls_are_methods_that_differ_from_trimpi_in_one_field_only():
    """`--methods trimpi-grpo-wrong` / `trimpi-grpo-adaptive` train PoRo-GRPO with exactly one knob changed."""
    from mpi.methods import METHODS

    trimpi = get_grpo_config("poro-grpo").to_dict()
    for method, field, value in (("trimpi-grpo-wrong", "guided_context", "wrong_policy"),
                                 ("trimpi-grpo-adaptive", "adaptive_guidance", True)):
        stage = METHODS[method][-1]
        assert METHODS[method][:-1] == METHODS["trimpi-grpo"][:-1]
        control = get_grpo_config(stage).to_dict()
        assert {k for k in trimpi if trimpi[k] != control[k]} == {"preset", field}
        assert control[field] == value


def test_validation_metrics_by_hand_and_training_is_unchanged(toy, tmp_path):
    model, processor, build_messages, init = toy
    _reset(model, init)
    seen = []

    def reward(items, texts):
        seen.append(list(texts))
        acc = [float(len(t) % 2 == 0) for t in texts]
        return {"reward": acc, "accuracy": acc}

    cfg = get_grpo_config("poro-grpo", num_generations=2, max_completion_length=6, eval_samples=3, temperature=0.9)
    items = _items()
    val = poro.validation_metrics(model, processor, items, cfg, build_messages=build_messages, reward_fn=reward)
    sampled, greedy = seen
    acc = torch.tensor([float(len(t) % 2 == 0) for t in sampled]).view(3, 3)
    assert val["val/sampled_accuracy"] == pytest.approx(float(acc.mean()))
    assert val["val/pass@3"] == pytest.approx(float(acc.max(1).values.mean()))
    assert val["val/greedy_accuracy"] == pytest.approx(sum(len(t) % 2 == 0 for t in greedy) / 3)
    # greedy: the first token is the argmax of the policy-free prompt's next-token logits
    enc = sampling.encode_prompts(processor, *sampling.prompt_texts(processor, items, False, build_messages))
    enc.pop("num_images")
    model.eval()
    with torch.no_grad():
        first = model(**enc).logits[:, -1].argmax(-1)
    assert [processor.tokenizer.decode([int(i)], skip_special_tokens=True) for i in first] == \
        [processor.tokenizer.decode(processor.tokenizer(t, add_special_tokens=False)["input_ids"][:1]) for t in greedy]

    run = dict(steps=2, num_generations=2, max_completion_length=4, progress=False, log_every=0, sample_every=0)

    def train(eval_items, out):
        _reset(model, init)
        res = poro.train_poro(model, processor, items, get_grpo_config("poro-grpo", eval_every=2, **run), out,
                              build_messages=build_messages, reward_fn=reward, save_adapter=False,
                              eval_items=eval_items)
        return res, {n: p.detach().clone() for n, p in model.named_parameters() if n in init}

    plain, w_plain = train(None, tmp_path / "plain")
    evald, w_eval = train(items[:2], tmp_path / "eval")
    assert [r["step"] for r in plain.rows] == [1, 2] and [r["step"] for r in evald.rows] == [0, 1, 2]
    assert "val/pass@4" in evald.rows[0] and "val/greedy_accuracy" in evald.rows[2]
    assert not any(k.startswith("val/") for k in evald.rows[1])
    assert all(torch.equal(w_plain[n], w_eval[n]) for n in init)  # the evaluation left the training RNG alone
    fig = metrics.plot_validation(tmp_path / "eval", out_png=tmp_path / "val.png")
    assert (tmp_path / "val.png").exists() and fig is not None
