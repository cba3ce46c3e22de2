"""Integration: PolicyRollout GRPO (and plain GRPO) raise the mean reward of a fixed prompt set.

Seeded end to end on the toy-tiny VLM. The model first gets a short supervised warm start (full
fine-tuning on CoT targets for all four outcomes), so it writes `<think>...</think>\\boxed{Case k}` with
k spread over the outcomes; the fixed prompt set then holds prompts whose answer is one outcome, and
RL must move probability onto it. Before/after are measured with `mean_reward` on the same prompts
and the same sampling seed. Minutes on a CPU, so it lives in tests/, not mpi/tests/.
"""

import pytest
import torch

from mpi.poro import get_grpo_config, mean_reward, start_rl_from, train_poro


@pytest.fixture(scope="module")
def warm_started():
    from mpi.collate import SupervisedCollator
    from mpi.data import build_clevr_policy, get_data_config
    from mpi.modeling import load_model_and_processor

    ds = build_clevr_policy(get_data_config("toy"), split="train")
    warm = [dict(ds[i], cot="ok") for i in range(8)]  # two items per outcome (the toy split is balanced)
    fixed = [dict(x, cot="ok") for x in ds if x["answer"] == "Case 3"][:4]
    model, processor = load_model_and_processor("toy-tiny", quantization=None, lora=None, seed=0, device="cpu")
    batch = SupervisedCollator(processor, mode="sft_cot")(warm)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(80):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return model, processor, fixed, state


@pytest.mark.parametrize("preset", ["poro-grpo", "grpo"])
def test_rl_raises_mean_reward_on_fixed_prompts(warm_started, preset, tmp_path):
    from mpi.data.messages import build_messages
    from mpi.modeling import LoraSettings

    import copy

    base, processor, fixed, state = warm_started
    base.load_state_dict(state)
    model = start_rl_from(copy.deepcopy(base), LoraSettings(r=16, alpha=32))
    cfg = get_grpo_config(preset, steps=30, num_generations=6, prompts_per_step=2, max_completion_length=16,
                          learning_rate=5e-4, progress=False, print_every=0, sample_every=0, seed=0)
    before = mean_reward(model, processor, fixed, cfg, samples=8, build_messages=build_messages)
    train_poro(model, processor, fixed, cfg, tmp_path, build_messages=build_messages, save_adapter=False)
    after = mean_reward(model, processor, fixed, cfg, samples=8, build_messages=build_messages)
    assert after["reward"] > before["reward"] + 0.15, (before, after)
