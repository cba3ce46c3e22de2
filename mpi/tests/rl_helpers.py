"""Items and a reward shared by the RL unit tests (mpi.poro, mpi.sampling) on the tiny toy VLM."""

from PIL import Image

# A marker that only the policy text holds: a test finds it in a prompt iff the policy was in context.
POLICY_MARK = "# Condition 1 (rulebook-zeta):"
COLORS = [(200, 20, 20), (20, 200, 20), (20, 20, 200), (200, 200, 20)]


def rl_items(n: int = 3, id_prefix: str = "t", numbered_query: bool = False) -> list[dict]:
    """n ClevrPolicy-shaped items of one policy, solid-color images, answers alternating Case 1 / Case 2.
    numbered_query: each item's query names its index (prompts then differ in text, not only in the image)."""
    query = "According to the Policy: L2-Test, what should be the response for {}?"
    return [dict(id=f"{id_prefix}{i}", dataset="clevr", variant="T", depth=2, policy_name="L2-Test",
                 policy_text=f"{POLICY_MARK} if there is a red object, go to 1.1; otherwise the response is Case 2.",
                 policy_images=[], images=[Image.new("RGB", (56, 56), COLORS[i % len(COLORS)])],
                 query=query.format(f"image {i}" if numbered_query else "the given image"),
                 cot="Condition 1 holds.", answer=f"Case {i % 2 + 1}", gold_path=["1"], override=False, extra="{}")
            for i in range(n)]


def letter_share_reward(items, texts):
    """A reward with spread on a random model's gibberish: share of letters among the characters."""
    r = [sum(c.isalpha() for c in t) / max(len(t), 1) for t in texts]
    return {"reward": r, "accuracy": [float(x > 0.5) for x in r]}


def toy_with_lora(r: int = 8, dropout: float = 0.0, lora_b_std: float | None = None, seed: int = 0):
    """(model, processor, build_messages, initial trainable weights) for toy-tiny with a fresh LoRA.

    lora_b_std: draw LoRA's B from N(0, std) instead of zeros, so the adapter already changes the output
    (a continued adapter: dropout and fp16 effects are then visible)."""
    import torch

    from mpi.data.messages import build_messages
    from mpi.modeling import LoraSettings, load_model_and_processor

    model, processor = load_model_and_processor("toy-tiny", quantization=None, seed=seed, device="cpu",
                                                lora=LoraSettings(r=r, dropout=dropout))
    if lora_b_std is not None:
        torch.manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, lora_b_std)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, processor, build_messages, init


def start_rl_from(model, lora):
    """A fresh LoRA on top of the previous stage's adapter folded into the weights (what the RL learning tests
    start from): with kl_reference="no_adapter" the reference is then the folded-in policy. The pipeline
    instead continues the SFT adapter with kl_reference="start". `lora`: a mpi.modeling.LoraSettings."""
    from peft import get_peft_model

    base = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    return get_peft_model(base, lora.to_peft())
