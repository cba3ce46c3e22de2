"""mpi.distributed in one process: sharding arithmetic, the strided prompt order, metric reduction rules,
and that every collective is an identity when nothing was launched (tests/test_multiprocess.py runs 2)."""

import math

import pytest
import torch

from mpi import distributed as dist


def test_shards_keep_groups_whole_and_concatenate_back():
    items = list(range(5 * 4))  # 5 groups of 4
    shares = [dist.shard_for_process(items, group_size=4, index=p, world=2) for p in range(2)]
    assert shares == [list(range(0, 12)), list(range(12, 20))]  # 3 groups + 2 groups
    assert sum(shares, []) == items
    shares3 = [dist.shard_for_process(items, group_size=4, index=p, world=3) for p in range(3)]
    assert [len(s) // 4 for s in shares3] == [2, 2, 1]
    assert sum(shares3, []) == items


def test_shard_errors_name_the_fix():
    with pytest.raises(ValueError, match="group_size=4"):
        dist.shard_for_process(list(range(6)), group_size=4, index=0, world=2)
    with pytest.raises(ValueError, match="outside"):
        dist.shard_for_process(list(range(4)), index=2, world=2)
    with pytest.raises(ValueError, match="prompts_per_step=1 .* >= the number of processes \\(2\\)"):
        dist.local_count(1, index=0, world=2)
    assert [dist.local_count(5, index=p, world=2) for p in range(2)] == [3, 2]


class _Order:
    """A stand-in PromptSampler: position k of a fixed order, drawn from `cursor`."""

    def __init__(self, order):
        self.order, self.cursor = order, 0

    def next(self, n):
        out = [self.order[(self.cursor + i) % len(self.order)] for i in range(n)]
        self.cursor += n
        return out


def test_sharded_sampler_strides_the_shared_order():
    order = [7, 3, 9, 1, 0, 4, 8, 2, 6, 5]
    s0 = dist.ShardedSampler(_Order(order), index=0, world=2)
    s1 = dist.ShardedSampler(_Order(order), index=1, world=2)
    a, b = s0.next(2), s1.next(2)
    assert (a, b) == ([7, 9], [3, 1])
    assert sorted(a + b) == sorted(_Order(order).next(4))  # one step = what one process draws with 4
    s0.next(3)  # uneven draws (DAPO refills) never make the shares overlap
    assert s0.cursor == 5 and s1.cursor == 2
    assert set(s1.next(3)).isdisjoint({7, 9, 0, 8, 6})
    single = dist.ShardedSampler(_Order(order), index=0, world=1)
    assert single.next(4) == order[:4]


def test_combine_metric_rows_rules():
    rows = [
        {"loss": 0.25, "num_groups": 3, "all/reward_mean": 0.5, "step_time": 1.0, "all/ratio_max": 1.2,
         "guided/is_ratio_min": 0.7, "gen_tokens": 10, "all/kl": math.nan, "preset": "poro-grpo"},
        {"loss": 0.5, "num_groups": 1, "all/reward_mean": 0.1, "step_time": 2.5, "all/ratio_max": 1.1,
         "guided/is_ratio_min": 0.9, "gen_tokens": 7, "skipped": 1, "preset": "poro-grpo"},
    ]
    out = dist.combine_metric_rows(rows)
    assert out["loss"] == 0.75  # shares of the global loss add up
    assert out["num_groups"] == 4 and isinstance(out["num_groups"], int)
    assert out["gen_tokens"] == 17
    assert out["all/reward_mean"] == pytest.approx((0.5 * 3 + 0.1 * 1) / 4)  # weighted by groups
    assert out["step_time"] == 2.5 and out["all/ratio_max"] == 1.2 and out["guided/is_ratio_min"] == 0.7
    assert math.isnan(out["all/kl"])  # NaN everywhere stays NaN
    assert out["skipped"] == 1  # present on one process only
    assert out["preset"] == "poro-grpo"
    assert dist.combine_metric_rows(rows, ops={"loss": "mean"}, weight_key=None)["loss"] == pytest.approx(0.375)
    with pytest.raises(ValueError, match="reduce op"):
        dist.combine_metric_rows(rows, ops={"loss": "median"})


def test_single_process_collectives_are_identities():
    assert dist.num_processes() == 1 and dist.process_index() == 0 and dist.is_main_process()
    assert dist.global_sums(3, 4.5) == (3.0, 4.5)
    assert dist.all_processes(True) and not dist.all_processes(False)
    metrics = {"loss": torch.tensor(0.5), "x": 2}
    assert dist.reduce_metrics(metrics) == {"loss": 0.5, "x": 2}
    assert dist.gather_objects({"a": 1}) == [{"a": 1}]
    layer = torch.nn.Linear(3, 2)
    layer(torch.ones(1, 3)).sum().backward()
    before = layer.weight.grad.clone()
    dist.all_reduce_gradients(layer.parameters())
    dist.sync_initial_weights(layer)
    assert torch.equal(layer.weight.grad, before)
    with pytest.raises(ValueError, match="op must be"):
        dist.all_reduce_gradients(layer.parameters(), op="max")


def test_idle_update_takes_the_same_step_as_a_zero_contribution():
    """The idle path of a process without groups = an optimizer step on zero local gradient."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for opt, model in ((opt_a, a), (opt_b, b)):  # momentum from one real step
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
    dist.idle_update(a, opt_a, num_iterations=1, max_grad_norm=1.0)
    for p in b.parameters():
        p.grad = torch.zeros_like(p)
    opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_null_logger_keeps_rows():
    log = dist.NullLogger("ignored", echo=False)
    assert log.log(3, loss=1.0) == {"step": 3, "loss": 1.0}
    assert log.rows == [{"step": 3, "loss": 1.0}]
