"""The functions the notebooks write in view (cells tagged "mirror") behave like their `mpi` twins.

Each test runs a notebook's mirror cells alone (`tests.nbtools.mirror_definitions`) and compares the in-view
function with the package's on random inputs (the GRPO math), on real collated batches (the loss masks), or
on the toy-tiny VLM (the PolicyRollout group and one update step: the same loss and the same updated weights
as `mpi.poro.train_on_rollout` on a fixed rollout). A notebook that drifts from the package fails here.
"""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch

from tests.nbtools import NOTEBOOK_DIR, mirror_definitions

NB02 = NOTEBOOK_DIR / "02_vm_cpt_qlora.ipynb"
NB03 = NOTEBOOK_DIR / "03_sft.ipynb"
NB04 = NOTEBOOK_DIR / "04_policy_rollout_grpo.ipynb"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def nb04():
    return mirror_definitions(NB04)


@pytest.fixture(scope="module")
def processor():
    from mpi.modeling import load_processor
    from mpi.toy import build_toy

    return load_processor(str(build_toy("toy-tiny", seed=0)))


@pytest.fixture(scope="module")
def items():
    from mpi.data import build_clevr_policy, get_data_config

    cfg = get_data_config("toy", n_policies=2, n_train_per_policy=4, image_size=56, seed=3)
    ds = build_clevr_policy(cfg, split="train")
    return [ds[i] for i in range(len(ds))]


# =========================================================================== 04: the GRPO math


def test_group_advantages_match(nb04):
    from mpi.grpo import group_advantages

    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        group = random.Random(trial).choice([2, 3, 4, 8])
        groups = random.Random(trial + 1).randint(1, 5)
        rewards = torch.randint(0, 3, (groups * group,), generator=gen).float() / 2   # ties and all-equal groups
        if trial % 3 == 0:
            rewards = torch.rand(groups * group, generator=gen)
        for kw in (dict(), dict(std="population"), dict(scale_rewards=False), dict(eps=0.0, std="sample")):
            mine = nb04["group_advantages"](rewards, group, **kw)
            ref = group_advantages(rewards, group, **kw)
            assert torch.allclose(mine, ref, atol=1e-6), (trial, kw, mine, ref)
    # by hand: R = [1, 0, 0, 0] gives 1.5 (sample std) and sqrt(3) (population std) for the first response
    assert abs(nb04["group_advantages"](torch.tensor([1.0, 0, 0, 0]), 4, eps=0)[0].item() - 1.5) < 1e-6
    assert abs(nb04["group_advantages"](torch.tensor([1.0, 0, 0, 0]), 4, std="population", eps=0)[0].item() - 3 ** 0.5) < 1e-6


@pytest.mark.parametrize("eps_low, eps_high", [(0.2, None), (0.2, 0.2), (0.2, 0.28), (0.1, 0.3)])
def test_clipped_surrogate_matches(nb04, eps_low, eps_high):
    from mpi.grpo import clipped_surrogate

    gen = torch.Generator().manual_seed(1)
    logp = -torch.rand(6, 9, generator=gen) * 3
    old = logp + torch.randn(6, 9, generator=gen) * 0.4   # ratios from ~0.3 to ~3: both clips bite
    adv = torch.randn(6, generator=gen)
    for a in (adv, adv[:, None].expand(6, 9)):
        mine = nb04["clipped_surrogate"](logp, old, a, eps_low, eps_high)
        ref = clipped_surrogate(logp, old, a, eps_low, eps_high)
        for x, y in zip(mine, ref):
            assert torch.equal(x, y)
    assert ref[2].any() and ref[3].any(), "the inputs must exercise both clips"


def test_k3_and_aggregation_match(nb04):
    from mpi.grpo import aggregate_loss, k3_kl

    gen = torch.Generator().manual_seed(2)
    logp, ref = -torch.rand(5, 7, generator=gen) * 4, -torch.rand(5, 7, generator=gen) * 4
    assert torch.allclose(nb04["k3_kl"](logp, ref), k3_kl(logp, ref), atol=0, rtol=0)
    assert abs(nb04["k3_kl"](torch.tensor(0.5).log(), torch.tensor(0.25).log()).item() - 0.1931) < 1e-4  # by hand
    loss = torch.randn(5, 7, generator=gen)
    mask = (torch.rand(5, 7, generator=gen) > 0.3).long()
    mask[2] = 0  # an empty row
    for kind in ("grpo", "dapo", "dr_grpo"):
        mine = nb04["aggregate_loss"](loss, mask, kind, max_completion_length=7)
        theirs = aggregate_loss(loss, mask, kind, max_completion_length=7)
        assert torch.allclose(mine, theirs, atol=1e-6), kind
    with pytest.raises(ValueError, match="loss_type"):
        nb04["aggregate_loss"](loss, mask, "mean")


# =========================================================================== 02 / 03: the loss masks


def test_vm_cpt_labels_match_the_collator(processor, items):
    from mpi.collate import SupervisedCollator, visual_token_ids

    nb02 = mirror_definitions(NB02)
    for markers in (True, False):
        ids = nb02["visual_ids"](processor.tokenizer, markers)
        assert ids == visual_token_ids(processor, markers)
        collate = SupervisedCollator(processor, "cpt", mask_vision_markers=markers)
        for batch_items in ([items[0]], items[1:4]):   # one row; three rows of different lengths (padding)
            batch = collate(batch_items)
            mine = nb02["vm_cpt_labels"](batch["input_ids"], batch["attention_mask"], ids)
            assert torch.equal(mine, batch["labels"])
            assert (batch["attention_mask"] == 0).any() or len(batch_items) == 1
        # random ids with visual tokens sprinkled in and random right padding
        gen = torch.Generator().manual_seed(int(markers))
        input_ids = torch.randint(0, len(processor.tokenizer), (4, 30), generator=gen)
        input_ids[torch.rand(4, 30, generator=gen) < 0.2] = ids[0]
        attention = (torch.arange(30)[None] < torch.tensor([30, 22, 9, 1])[:, None]).long()
        assert torch.equal(nb02["vm_cpt_labels"](input_ids, attention, ids), collate.labels(input_ids, attention, []))


@pytest.mark.parametrize("mode", ["cot-sft", "direct-sft"])
def test_sft_labels_match_the_collator(processor, items, mode):
    from mpi.collate import SupervisedCollator

    nb03 = mirror_definitions(NB03)
    rng = random.Random(0)
    for with_policy_frac in (0.0, 1.0):   # the toy preset keeps the policy in some batches' prompts
        collate = SupervisedCollator(processor, mode, policy_in_context_frac=with_policy_frac)
        for _ in range(3):
            batch_items = rng.sample(items, rng.randint(1, 4))
            batch = collate(batch_items)
            mine = nb03["sft_batch_labels"](processor, batch, batch_items, direct=mode == "direct-sft",
                                            with_policy=collate.shows_policy(batch_items))
            assert torch.equal(mine, batch["labels"])
            assert (mine != -100).sum() < batch["attention_mask"].sum()  # not everything carries loss


# =========================================================================== 04: the group and the step


@pytest.fixture(scope="module")
def lora_model(processor):
    from mpi.modeling import LoraSettings, load_model_and_processor

    torch.manual_seed(0)
    model, _ = load_model_and_processor("toy-tiny", quantization=None, lora=LoraSettings(r=8, alpha=16), seed=0,
                                        device="cpu", trainable=True)
    return model


def grpo_cfg(**overrides):
    from mpi.poro import get_grpo_config

    base = dict(num_generations=3, prompts_per_step=2, max_completion_length=12, progress=False, log_every=0,
                sample_every=0, learning_rate=5e-3, log_behaviour_ratio=False)
    return get_grpo_config(overrides.pop("preset", "poro-grpo"), **{**base, **overrides})


def test_sample_group_matches_rollout(nb04, lora_model, processor, items):
    from mpi.data.messages import build_messages
    from mpi.poro import rollout

    cfg = grpo_cfg(temperature=1.0)
    torch.manual_seed(5)
    theirs = rollout(lora_model, processor, items[:2], cfg, build_messages)
    torch.manual_seed(5)
    mine = nb04["sample_group"](lora_model, processor, items[:2], cfg, build_messages)
    assert mine.completion_ids.shape[0] == 2 * 2 * cfg.num_generations
    assert torch.equal(mine.completion_ids, theirs.completion_ids)
    assert torch.equal(mine.guided, theirs.guided) and mine.guided.tolist()[:6] == [False] * 3 + [True] * 3
    assert torch.equal(mine.eos_mask, theirs.eos_mask) and torch.equal(mine.truncated, theirs.truncated)
    assert mine.texts == theirs.texts
    for k in theirs.rewards:
        assert torch.equal(mine.rewards[k], theirs.rewards[k]), k


@pytest.fixture(scope="module")
def fixed_rollout(lora_model, processor, items):
    """One sampled rollout, its rewards replaced by fixed ones with spread (so every group has a signal)."""
    from mpi.data.messages import build_messages
    from mpi.poro import rollout

    torch.manual_seed(7)
    ro = rollout(lora_model, processor, items[2:4], grpo_cfg(temperature=1.0), build_messages)
    n = ro.completion_ids.shape[0]
    reward = torch.tensor([(i * 7 % 5) / 4 for i in range(n)], dtype=torch.float32)
    # an untrained toy rarely stops within 12 tokens: mark half the rows finished so that the "mask" rule keeps some
    truncated = torch.tensor([i % 2 == 0 for i in range(n)])
    return dataclasses.replace(ro, rewards={**ro.rewards, "reward": reward}, truncated=truncated)


@pytest.mark.parametrize("overrides", [dict(), dict(preset="poro-dapo", dynamic_sampling=False),
                                       dict(truncated_completions="mask", loss_type="dr_grpo", beta=0.05)],
                         ids=["poro-grpo", "poro-dapo", "mask-dr_grpo"])
def test_poro_step_matches_train_on_rollout(nb04, lora_model, processor, fixed_rollout, overrides):
    from mpi.data.messages import build_messages
    from mpi.poro import make_reference, train_on_rollout
    from mpi.engine import make_optimizer

    cfg = grpo_cfg(**overrides)
    start = {n: p.detach().clone() for n, p in lora_model.named_parameters() if p.requires_grad}
    results = []
    for step in (nb04["poro_step"], None):
        model = copy.deepcopy(lora_model)
        optimizer = make_optimizer(model, cfg)
        reference = make_reference(model, cfg)
        # move the weights away from the reference (the same noise for both), so that the KL term and its
        # gradient are not zero: at RL's first step they would be, and a dropped KL term would go unnoticed
        noise = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in (p for p in model.parameters() if p.requires_grad):
                p.add_(torch.randn(p.shape, generator=noise) * 0.05)
        if step is None:
            metrics = train_on_rollout(model, optimizer, processor, fixed_rollout, cfg, build_messages, reference)
            loss = metrics["loss"]
            assert (metrics.get("all/kl", 0.0) > 1e-6) == (cfg.beta > 0), metrics.get("all/kl")
        else:
            loss = step(model, optimizer, processor, fixed_rollout, cfg, build_messages, reference)
        results.append((loss, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    (mine_loss, mine), (ref_loss, ref) = results
    assert abs(mine_loss - ref_loss) <= 1e-6 * max(1.0, abs(ref_loss)), (mine_loss, ref_loss)
    moved = max(float((ref[n] - start[n]).abs().max()) for n in ref)
    assert moved > 1e-4, "the update must change the weights, or equality proves nothing"
    for n in ref:
        assert torch.allclose(mine[n], ref[n], atol=1e-6, rtol=0), n


def test_poro_step_refuses_what_it_does_not_do(nb04, lora_model, processor, fixed_rollout):
    from mpi.data.messages import build_messages

    with pytest.raises(ValueError, match="train_on_rollout"):
        nb04["poro_step"](lora_model, None, processor, fixed_rollout, grpo_cfg(offpolicy_rule="tis"), build_messages)
    with pytest.raises(ValueError, match="make_reference"):
        nb04["poro_step"](lora_model, None, processor, fixed_rollout, grpo_cfg(), build_messages, None)


# =========================================================================== the notebooks' RL settings


def test_stage_config_is_what_train_stage_trains_with(tmp_path, monkeypatch):
    """notebook 04 shows and uses `pipeline.stage_config`: it must be the GRPOConfig train_stage passes."""
    import mpi.poro
    from mpi import pipeline
    from mpi.config import get_config
    from mpi.pipeline import stage_config

    class Captured(Exception):
        pass

    seen = {}

    def capture(model, processor, dataset, cfg, out_dir, **kw):
        seen["cfg"] = cfg
        raise Captured

    for preset in ("tiny", "toy"):
        cfg = get_config(preset, out_dir=str(tmp_path), model="toy-tiny")
        plan = pipeline.make_plan(cfg, name=f"rl-{preset}")
        # train_stage up to its train_poro call, without a model, data or memory check: only the config matters
        monkeypatch.setattr(pipeline, "load_for_stage", lambda *a, **k: (None, None))
        monkeypatch.setattr(pipeline, "load_split", lambda *a, **k: [])
        monkeypatch.setattr(pipeline, "preflight", lambda *a, **k: None, raising=False)
        monkeypatch.setattr("mpi.scale.memory.preflight", lambda *a, **k: None)
        monkeypatch.setattr(mpi.poro, "train_poro", capture)
        with pytest.raises(Captured):
            pipeline.train_stage(plan, plan.dataset_keys[0], 0, ("cot-sft", "poro-grpo"), tmp_path / preset)
        monkeypatch.undo()
        assert seen.pop("cfg") == stage_config(plan, "poro-grpo", 0), preset
    assert stage_config(plan, "poro-grpo", 0).temperature == 0.7   # the toy preset's, not GRPOConfig's 1.0
