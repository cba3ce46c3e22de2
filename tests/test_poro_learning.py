"""Integration: PolicyRollout GRPO (and plain GRPO) learn a target the model can reach.

Seeded end to end on the toy-tiny VLM. A short supervised warm start (full fine-tuning on direct
`\\boxed{Case k}` answers for all four outcomes) makes the model write boxed answers with k spread over
the outcomes. RL then rewards ONE answer, "Case 1", on every prompt: a prompt-independent target, so the
tiny model can reach it, and its LoRA also covers lm_head (with the output head frozen, attention/MLP
LoRA on toy-tiny plateaus near p = 0.68 on a one-token target; here it reaches 0.29 in 15 steps
where lm_head LoRA reaches 0.96). Measured on the same fixed prompts with
the same sampling seed: the sampled accuracy (128 answers) and the exact probability of the one token
"Case 1" after "\\boxed{". With the update switched off (learning_rate=0) both stay exactly where they started,
so the margins below fail. Tens of seconds on a CPU, so it lives in tests/, not mpi/tests/.
"""

import copy

import pytest
import torch

from mpi.poro import get_grpo_config, mean_reward, train_poro
from mpi.tests.rl_helpers import start_rl_from
from mpi.logprobs import build_scoring_batch, forward_log_probs
from mpi.sampling import prompt_texts


@pytest.fixture(scope="module")
def warm_started():
    return warm_start()


def warm_start():
    """(model, processor, fixed items whose answer is "Case 1") after the supervised warm start."""
    from mpi.collate import SupervisedCollator
    from mpi.data import build_clevr_policy, get_data_config
    from mpi.modeling import load_model_and_processor

    torch.set_num_threads(1)
    ds = build_clevr_policy(get_data_config("toy"), split="train")
    answers = list(ds["answer"])
    outcomes = sorted(set(answers))
    warm_rows = [i for k in outcomes for i in [j for j, a in enumerate(answers) if a == k][:2]]
    assert len(outcomes) >= 3 and len(warm_rows) == 2 * len(outcomes), "the toy split should hold every outcome twice"
    warm = [ds[i] for i in warm_rows]  # two items per outcome: the warm start spreads over all of them
    rest = [i for i in range(len(ds)) if i not in warm_rows]
    fixed = [dict(ds[i], answer="Case 1") for i in rest[:8]]  # the target, whatever the policy says
    model, processor = load_model_and_processor("toy-tiny", quantization=None, lora=None, seed=0, device="cpu")
    batch = SupervisedCollator(processor, mode="direct-sft")(warm)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, processor, fixed


def prob_of_case_1(model, processor, items, build_messages) -> float:
    """Mean over items of pi("Case 1" | policy-free prompt, "\\boxed{"), teacher-forced (no sampling)."""
    tok = processor.tokenizer
    prefix = tok("\\boxed{", add_special_tokens=False)["input_ids"]
    one = tok("Case 1", add_special_tokens=False)["input_ids"]
    assert len(one) == 1, "the toy tokenizer makes every case one token (mpi.toy.COMPACT_TOKENS)"
    ids = torch.tensor([prefix + one] * len(items))
    texts, images = prompt_texts(processor, items, False, build_messages)
    batch = build_scoring_batch(processor, texts, images, ids, torch.ones_like(ids), torch.arange(len(items)))
    model.eval()
    with torch.no_grad():
        logp, _ = forward_log_probs(model, batch, torch.arange(len(items)), 1.0)
    return float(logp[:, -1].exp().mean())


def rl_run(warm, preset: str, num_generations: int, steps: int, learning_rate: float, out_dir, **schedule):
    """(before, after): sampled accuracy and prob_of_case_1 around one seeded RL run from the warm start."""
    from mpi.data.messages import build_messages
    from mpi.modeling import LANGUAGE_MODEL_LORA_TARGETS, LoraSettings

    base, processor, fixed = warm
    torch.manual_seed(0)  # the LoRA init
    lora = LoraSettings(r=16, alpha=32, target_modules=f"(?:{LANGUAGE_MODEL_LORA_TARGETS})|(?:lm_head)")
    model = start_rl_from(copy.deepcopy(base), lora)
    cfg = get_grpo_config(preset, steps=steps, num_generations=num_generations, prompts_per_step=2,
                          max_completion_length=8, learning_rate=learning_rate, progress=False, log_every=0,
                          sample_every=0, seed=0, **schedule)

    def measure():
        acc = mean_reward(model, processor, fixed, cfg, samples=16, build_messages=build_messages)["accuracy"]
        return {"accuracy": acc, "p_case_1": prob_of_case_1(model, processor, fixed, build_messages)}

    before = measure()
    train_poro(model, processor, fixed, cfg, out_dir, build_messages=build_messages, save_adapter=False)
    return before, measure()


# (preset, G per origin, bf16): plain GRPO gets 2G own samples, so both train on groups of 8; the third run is
# PoRo with its scoring passes in bfloat16 (GRPOConfig.bf16_scoring), which must learn as well.
@pytest.mark.parametrize("preset, num_generations, bf16", [("poro-grpo", 4, False), ("grpo", 8, False),
                                                           ("poro-grpo", 4, True)])
def test_rl_learns_a_reachable_target(warm_started, preset, num_generations, bf16, tmp_path):
    before, after = rl_run(warm_started, preset, num_generations, steps=20, learning_rate=3e-3, out_dir=tmp_path,
                           bf16_scoring=bf16)
    # measured: accuracy 0.078 -> 0.73 (poro-grpo) / 0.79 (grpo) / 0.66 (poro-grpo, bf16), p_case_1 0.211 ->
    # 0.964 / 0.982 / 0.953 (bf16 with a bfloat16 output head too: 0.32 / 0.52, which fails here); with
    # learning_rate=0 both stay at the start exactly (the same weights, the same sampling seed). The CPU's float
    # kernels change the seeded trajectory: at 5e-3 for 15 steps one machine read 0.047 -> 0.82 and another
    # collapsed at step 15 (reward 0.51 -> 0.0), so the rate is one that is stable on both.
    assert before["accuracy"] < 0.35 and before["p_case_1"] < 0.5, (before, after)
    assert after["accuracy"] > before["accuracy"] + 0.4, (before, after)
    assert after["p_case_1"] > 0.8, (before, after)  # the target is reached, not just approached
