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
