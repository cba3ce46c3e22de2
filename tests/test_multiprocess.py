"""Data parallel on 2 CPU processes (gloo, `accelerate launch`) equals one process on the same global batch.

The parent (pytest) builds a PolicyRollout rollout of 3 prompts, saves it, and runs the single-process
update on all of it. Two processes launched with configs/accelerate/ddp_cpu_2proc.yaml each take
their share of whole groups (2 groups and 1: uneven on purpose, so the global token normaliser
matters), run the same `train_on_rollout`, and must end with the single-process weights and metrics.
The same launch runs two steps of the whole `train_poro` loop (prompts sharded, one log) and, when
`mpi.supervised` is present, the SFT stage under the transformers Trainer against its 1-process run.

Run by hand:  ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/ddp_cpu_2proc.yaml \
                  tests/test_multiprocess.py --task all --work DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "accelerate" / "ddp_cpu_2proc.yaml"
WORLD = 2
NUM_PROMPTS = 3  # 2 groups on process 0, 1 on process 1


# --------------------------------------------------------------------------- shared by parent and workers


def make_items(n: int):
    from PIL import Image

    colors = [(200, 20, 20), (20, 200, 20), (20, 20, 200), (200, 200, 20), (120, 40, 160), (10, 160, 160)]
    return [dict(id=f"mp{i}", dataset="clevr", variant="T", depth=2, policy_name="L2-Test",
                 policy_text="# Condition 1: if there is a red object, go to 1.1; otherwise the response is Case 2.",
                 policy_images=[], images=[Image.new("RGB", (56, 56), colors[i % len(colors)])],
                 query="According to the Policy: L2-Test, what should be the response for the given image?",
                 # CoTs of different lengths: processes then hold different token counts, so a per-process
                 # mean would differ from the global token mean
                 cot="Condition 1 holds." + " The object is red." * (3 * i), answer=f"Case {i % 2 + 1}",
                 gold_path=["1"], override=False, extra="{}")
            for i in range(n)]


def varied_reward(items, texts):
    """A reward with spread on a random model's output: the share of letters among the characters."""
    r = [sum(c.isalpha() for c in t) / max(len(t), 1) for t in texts]
    return {"reward": r, "accuracy": [float(x > 0.5) for x in r]}


def update_config():
    from mpi.poro import get_grpo_config

    # token-mean loss (needs the global token count), KL (reference pass), TIS weights (behaviour pass),
    # two iterations per batch and micro-batches that cut across groups.
    return get_grpo_config("poro-dapo", dynamic_sampling=False, beta=0.04, offpolicy_rule="tis",
                           num_iterations=2, micro_batch_size=5, num_generations=2, max_completion_length=8,
                           learning_rate=0.5, prompts_per_step=NUM_PROMPTS, progress=False, log_every=0,
                           sample_every=0)


def sgd(model, cfg):
    """Plain SGD: the update is the gradient itself, so any error in how the shares add up shows
    (AdamW's per-coordinate normalisation would hide a wrong scale)."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)


def load_toy():
    from mpi.modeling import LoraSettings, load_model_and_processor

    return load_model_and_processor("toy-tiny", quantization=None, lora=LoraSettings(r=4), seed=0, device="cpu")


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def set_trainable(model, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])


# --------------------------------------------------------------------------- worker (runs under accelerate launch)


def worker_poro_update(work: Path) -> None:
    from mpi import distributed as dist
    from mpi.data.messages import build_messages
    from mpi.poro import train_on_rollout

    cfg = update_config()
    model, processor = load_toy()
    set_trainable(model, torch.load(work / "init.pt"))
    ro = torch.load(work / "rollout.pt", weights_only=False)
    groups = dist.shard_for_process(list(range(ro.num_groups)))
    local = ro.select_groups(groups, cfg.group_size)
    optimizer = sgd(model, cfg)
    metrics = train_on_rollout(model, optimizer, processor, local, cfg, build_messages)
    metrics["num_groups"] = local.num_groups
    row = dist.reduce_metrics(metrics)
    torch.save({"weights": trainable(model), "metrics": row, "groups": groups},
               work / f"update_rank{dist.process_index()}.pt")


def worker_poro_loop(work: Path) -> None:
    from mpi import distributed as dist
    from mpi.data.messages import build_messages
    from mpi.poro import train_poro

    cfg = dataclasses.replace(update_config(), num_iterations=1, prompts_per_step=4, steps=2, learning_rate=1e-2)
    model, processor = load_toy()
    seen: list[str] = []

    def reward(items, texts):
        seen.extend(dict.fromkeys(it["id"] for it in items))
        return varied_reward(items, texts)

    result = train_poro(model, processor, make_items(12), cfg, work / "loop", build_messages=build_messages,
                        reward_fn=reward)
    torch.save({"weights": trainable(model), "seen": seen, "rows": result.rows},
               work / f"loop_rank{dist.process_index()}.pt")


SFT_GLOBAL_BATCH = 4


def run_sft(work: Path, out_name: str, world: int):
    """Two optimizer steps of CoT SFT (transformers Trainer) on a global batch of 4, from the saved init."""
    from mpi.metrics import read_metrics
    from mpi.supervised import SupervisedConfig, train_supervised

    model, processor = load_toy()
    set_trainable(model, torch.load(work / "init.pt"))
    cfg = SupervisedConfig(mode="cot-sft", max_steps=2, batch_size=SFT_GLOBAL_BATCH // world, learning_rate=1e-2,
                           lr_scheduler_type="constant", warmup_ratio=0.0, save_every=1000, progress=False, seed=0,
                           lora_r=4)
    result = train_supervised(model, processor, make_items(8), cfg, work / out_name, resume=False)
    rows = read_metrics(work / out_name) if (work / out_name / "metrics.jsonl").exists() else []
    return result["model"], rows


def worker_sft(work: Path) -> None:
    from mpi import distributed as dist

    model, rows = run_sft(work, "sft_2proc", world=dist.num_processes())
    torch.save({"weights": trainable(model), "rows": rows}, work / f"sft_rank{dist.process_index()}.pt")


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="all")
    parser.add_argument("--work", required=True)
    args = parser.parse_args(argv)
    work = Path(args.work)
    tasks = ["poro_update", "poro_loop", "sft"] if args.task == "all" else [args.task]
    for task in tasks:
        globals()[f"worker_{task}"](work)


# --------------------------------------------------------------------------- the test (parent, one process)


def _launch(work: Path, timeout: float = 150.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port, so parallel runs do not collide on the config's default
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
           "--num_processes", str(WORLD), "--main_process_port", str(port),
           str(Path(__file__).resolve()), "--task", "all", "--work", str(work)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Rollout + single-process reference here, then one `accelerate launch` of 2 processes."""
    from mpi.data.messages import build_messages
    from mpi.poro import rollout, train_on_rollout

    work = tmp_path_factory.mktemp("multiprocess")
    cfg = update_config()
    model, processor = load_toy()
    init = trainable(model)
    torch.save(init, work / "init.pt")
    torch.manual_seed(123)
    ro = rollout(model, processor, make_items(NUM_PROMPTS), cfg, build_messages, varied_reward)
    torch.save(ro, work / "rollout.pt")
    optimizer = sgd(model, cfg)
    ref_metrics = train_on_rollout(model, optimizer, processor, ro, cfg, build_messages)
    reference = {"weights": trainable(model), "metrics": ref_metrics, "init": init, "rollout": ro}
    sft_model, sft_rows = run_sft(work, "sft_1proc", world=1)
    reference["sft"] = {"weights": trainable(sft_model), "rows": sft_rows}
    proc = _launch(work)
    if proc.returncode != 0:
        pytest.fail(f"accelerate launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return work, reference


def _load(work: Path, name: str) -> list[dict]:
    return [torch.load(work / f"{name}_rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_policy_rollout_update_matches_single_process(launched):
    work, ref = launched
    ranks = _load(work, "update")
    assert [r["groups"] for r in ranks] == [[0, 1], [2]]  # whole groups, uneven shares
    moved = max(float((ref["weights"][n] - ref["init"][n]).abs().max()) for n in ref["weights"])
    assert moved > 1e-3, "the reference update did not move the weights: the comparison would be empty"
    for name, expected in ref["weights"].items():
        torch.testing.assert_close(ranks[0]["weights"][name], ranks[1]["weights"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["weights"][name], expected, rtol=1e-4, atol=1e-6)
    # each process holds its share of the loss (summed), grad norm of the summed gradient, global reward means
    for key in ("loss", "grad_norm", "all/reward_mean", "own/reward_mean", "guided/reward_mean", "all/accuracy"):
        assert ranks[0]["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-4, abs=1e-6), key
    assert ranks[0]["metrics"] == ranks[1]["metrics"]


def test_policy_rollout_loop_shards_prompts_and_logs_once(launched):
    from mpi.metrics import read_metrics
    from mpi.engine import PromptSampler

    work, _ = launched
    ranks = _load(work, "loop")
    for name in ranks[0]["weights"]:
        torch.testing.assert_close(ranks[0]["weights"][name], ranks[1]["weights"][name], rtol=0, atol=0)
    rows = read_metrics(work / "loop")
    assert [r["step"] for r in rows] == [1, 2]  # one row per step, written by process 0 only
    assert all(r["num_groups"] == 4 for r in rows)  # summed over processes
    # prompts: disjoint between processes, together exactly what one process draws with 4 per step
    seen0, seen1 = set(ranks[0]["seen"]), set(ranks[1]["seen"])
    assert not seen0 & seen1
    single = PromptSampler(12, update_config().seed)  # 2 steps x 4 prompts = 8 of the 12
    assert seen0 | seen1 == {f"mp{i}" for i in single.next(8)}
    assert (work / "loop" / "adapter").exists()


def test_supervised_stage_matches_single_process(launched):
    work, ref = launched
    ranks = _load(work, "sft")
    single = ref["sft"]
    for name, expected in single["weights"].items():
        torch.testing.assert_close(ranks[0]["weights"][name], ranks[1]["weights"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["weights"][name], expected, rtol=1e-4, atol=1e-6)
    # AdamW hides a wrong gradient scale in the weights; the logged loss and pre-clip grad norm do not
    assert [r["step"] for r in ranks[0]["rows"]] == [r["step"] for r in single["rows"]] == [1, 2]
    assert ranks[1]["rows"] == [] or ranks[1]["rows"] == ranks[0]["rows"]
    for got, want in zip(ranks[0]["rows"], single["rows"]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    worker_main(sys.argv[1:])
