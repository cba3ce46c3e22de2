"""RL as a stage that can be trusted with a budget: the learning-rate schedule and the best validation checkpoint.

learning_rate_at is checked against values computed by hand; keep_best against the checkpoints the run wrote
(the model must end with exactly the weights of the step whose smoothed validation accuracy was highest).
"""

import math

import pytest
import torch

from mpi import poro
from mpi.poro import get_grpo_config
from mpi.engine import learning_rate_at
from mpi.tests.rl_helpers import letter_share_reward, rl_items, toy_with_lora


def test_learning_rate_schedule_by_hand():
    cfg = get_grpo_config("poro-grpo", steps=10, learning_rate=1e-3, warmup_steps=2, lr_scheduler_type="cosine",
                          min_lr_ratio=0.1)
    assert learning_rate_at(1, cfg.learning_rate, cfg.steps, cfg.warmup_steps, cfg.lr_scheduler_type, cfg.min_lr_ratio) == pytest.approx(5e-4)  # warm-up: 1/2 of the peak
    assert learning_rate_at(2, cfg.learning_rate, cfg.steps, cfg.warmup_steps, cfg.lr_scheduler_type, cfg.min_lr_ratio) == pytest.approx(1e-3)  # the peak at the end of warm-up
    # cosine over the 8 steps after warm-up: step 6 is half way, lr = floor + (peak - floor) / 2
    assert learning_rate_at(6, cfg.learning_rate, cfg.steps, cfg.warmup_steps, cfg.lr_scheduler_type, cfg.min_lr_ratio) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert learning_rate_at(4, cfg.learning_rate, cfg.steps, cfg.warmup_steps, cfg.lr_scheduler_type, cfg.min_lr_ratio) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert learning_rate_at(10, cfg.learning_rate, cfg.steps, cfg.warmup_steps, cfg.lr_scheduler_type, cfg.min_lr_ratio) == pytest.approx(1e-4)  # the floor at the last step
    const = get_grpo_config("poro-grpo", steps=10, learning_rate=1e-3)
    assert [learning_rate_at(s, const.learning_rate, const.steps, const.warmup_steps, const.lr_scheduler_type, const.min_lr_ratio) for s in (1, 5, 10)] == [1e-3] * 3  # no warm-up, constant: today's default
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        get_grpo_config("poro-grpo", lr_scheduler_type="linear-ish")


def test_optimizer_follows_the_schedule(tmp_path):
    model, processor, build_messages, _ = toy_with_lora(r=4)
    cfg = get_grpo_config("poro-grpo", steps=3, warmup_steps=2, lr_scheduler_type="cosine", learning_rate=1e-3,
                          num_generations=2, max_completion_length=4, progress=False, log_every=0, sample_every=0)
    res = poro.train_poro(model, processor, rl_items(2), cfg, tmp_path, build_messages=build_messages,
                          reward_fn=letter_share_reward, save_adapter=False)
    assert [r["lr"] for r in res.rows] == pytest.approx([learning_rate_at(s, cfg.learning_rate, cfg.steps, cfg.warmup_steps, cfg.lr_scheduler_type, cfg.min_lr_ratio) for s in (1, 2, 3)])


def test_keep_best_ends_with_the_best_smoothed_step(tmp_path, monkeypatch):
    model, processor, build_messages, _ = toy_with_lora(r=4)
    # scripted validation accuracy per evaluation (steps 0, 1, 2, 3, 4): smoothed with weight 0.5 it reads
    # 0.2, 0.5, 0.45, 0.625, 0.3125 -> best at step 3, although the raw maximum (0.8) is at step 1
    script = iter([0.2, 0.8, 0.4, 0.8, 0.0])
    monkeypatch.setattr(poro, "validation_metrics", lambda *a, **k: {"val/sampled_accuracy": next(script)})
    cfg = get_grpo_config("poro-grpo", steps=4, eval_every=1, keep_best=True, best_smoothing=0.5, save_every=1,
                          keep_checkpoints=10, learning_rate=1e-2, num_generations=2, max_completion_length=4,
                          progress=False, log_every=0, sample_every=0)
    res = poro.train_poro(model, processor, rl_items(2), cfg, tmp_path, build_messages=build_messages,
                          reward_fn=letter_share_reward, save_adapter=False, eval_items=rl_items(1))
    assert res.best_step == 3
    assert [r["val/smoothed"] for r in res.rows] == pytest.approx([0.2, 0.5, 0.45, 0.625, 0.3125])
    at3 = torch.load(tmp_path / "checkpoints" / "step_000003" / "trainable.pt")
    at4 = torch.load(tmp_path / "checkpoints" / "step_000004" / "trainable.pt")
    now = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(now[n], at3[n]) for n in at3)  # the model holds step 3's weights ...
    assert any(not torch.equal(at3[n], at4[n]) for n in at3)  # ... which differ from the last step's


def test_keep_best_keeps_the_start_when_training_only_hurts(tmp_path, monkeypatch):
    model, processor, build_messages, init = toy_with_lora(r=4)
    script = iter([0.9, 0.1, 0.1])
    monkeypatch.setattr(poro, "validation_metrics", lambda *a, **k: {"val/sampled_accuracy": next(script)})
    cfg = get_grpo_config("poro-grpo", steps=2, eval_every=1, keep_best=True, learning_rate=1e-2,
                          num_generations=2, max_completion_length=4, progress=False, log_every=0, sample_every=0)
    res = poro.train_poro(model, processor, rl_items(2), cfg, tmp_path, build_messages=build_messages,
                          reward_fn=letter_share_reward, save_adapter=False, eval_items=rl_items(1))
    assert res.best_step == 0
    assert all(torch.equal(p, init[n]) for n, p in model.named_parameters() if n in init)


def test_keep_best_needs_validation_items(tmp_path):
    model, processor, build_messages, _ = toy_with_lora(r=4)
    cfg = get_grpo_config("poro-grpo", steps=1, keep_best=True, progress=False)
    with pytest.raises(ValueError, match="eval_items"):
        poro.train_poro(model, processor, rl_items(2), cfg, tmp_path, build_messages=build_messages,
                        reward_fn=letter_share_reward, save_adapter=False)


def test_a_killed_run_resumes_to_the_same_schedule_and_best_checkpoint(tmp_path, monkeypatch):
    """Killed after step 2 of 4 and resumed: the same learning rates, the same best step and the same final
    weights as the uninterrupted run (the moving average of the validation metric is in the checkpoint)."""
    model, processor, build_messages, init = toy_with_lora(r=4)

    def by_weights(model, *a, **k):  # a deterministic function of the weights: equal weights, equal "accuracy"
        total = sum(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad)
        return {"val/sampled_accuracy": (total * 1e3) % 1.0}

    monkeypatch.setattr(poro, "validation_metrics", by_weights)
    cfg = get_grpo_config("poro-grpo", steps=4, eval_every=1, keep_best=True, save_every=1, warmup_steps=1,
                          lr_scheduler_type="cosine", learning_rate=1e-2, num_generations=2, max_completion_length=4,
                          progress=False, log_every=0, sample_every=0)
    kw = dict(build_messages=build_messages, reward_fn=letter_share_reward, save_adapter=False,
              eval_items=rl_items(1))

    def reset():
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in init:
                    p.copy_(init[n])

    reset()
    straight = poro.train_poro(model, processor, rl_items(3), cfg, tmp_path / "a", **kw)
    w_straight = {n: p.detach().clone() for n, p in model.named_parameters() if n in init}

    reset()
    real, calls = poro.collect_rollout, []

    def dies_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(poro, "collect_rollout", dies_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        poro.train_poro(model, processor, rl_items(3), cfg, tmp_path / "b", **kw)
    monkeypatch.setattr(poro, "collect_rollout", real)
    with torch.no_grad():  # the resumed run must take its weights from the checkpoint, not from the model
        for n, p in model.named_parameters():
            if n in init:
                p.normal_(0, 0.3)
    resumed = poro.train_poro(model, processor, rl_items(3), cfg, tmp_path / "b", resume=True, **kw)
    assert resumed.best_step == straight.best_step and resumed.best_value == pytest.approx(straight.best_value)
    assert [r["lr"] for r in resumed.rows if "lr" in r] == pytest.approx([r["lr"] for r in straight.rows if "lr" in r])
    assert all(torch.equal(p, w_straight[n]) for n, p in model.named_parameters() if n in init)
