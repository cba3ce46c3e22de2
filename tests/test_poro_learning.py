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


# (preset, G per origin, steps): plain GRPO gets 2G own samples, so both train on groups of 12.
@pytest.mark.parametrize("preset, num_generations, steps", [("poro-grpo", 6, 40), ("grpo", 12, 30)])
def test_rl_raises_mean_reward_on_fixed_prompts(warm_started, preset, num_generations, steps, tmp_path):
    import copy

    from mpi.data.messages import build_messages
    from mpi.modeling import LoraSettings

    base, processor, fixed, state = warm_started
    base.load_state_dict(state)
    torch.manual_seed(0)  # the LoRA init
    model = start_rl_from(copy.deepcopy(base), LoraSettings(r=16, alpha=32))
    cfg = get_grpo_config(preset, steps=steps, num_generations=num_generations, prompts_per_step=2,
                          max_completion_length=16, learning_rate=2e-3, progress=False, print_every=0,
                          sample_every=0, seed=0)
    before = mean_reward(model, processor, fixed, cfg, samples=16, build_messages=build_messages)
    train_poro(model, processor, fixed, cfg, tmp_path, build_messages=build_messages, save_adapter=False)
    after = mean_reward(model, processor, fixed, cfg, samples=16, build_messages=build_messages)
    # 64 sampled answers before and after, same sampling seed; measured here: about +0.1 for both
    assert after["reward"] > before["reward"] + 0.08, (before, after)
    assert after["accuracy"] > before["accuracy"], (before, after)
