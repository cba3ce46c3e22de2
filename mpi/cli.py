"""`python -m mpi`: the command-line entry point.

`python -m mpi smoke` builds the toy VLM and runs one forward and one generate. `python -m mpi`
with no command runs the end-to-end pipeline on the toy preset when it is available (mpi.pipeline).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def smoke(model_name: str = "toy-tiny", seed: int = 0) -> dict:
    """Build the toy VLM offline, run one forward (loss with image tokens masked) and one generate."""
    import torch
    from PIL import Image

    from mpi.modeling import count_parameters, load_model_and_processor

    t0 = time.perf_counter()
    model, processor = load_model_and_processor(model_name, quantization=None, seed=seed, trainable=False)
    size = processor.image_processor.size["shortest_edge"] ** 0.5
    image = Image.new("RGB", (int(size), int(size)), (40, 160, 200))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], images=[image], return_tensors="pt").to(model.device)
    labels = batch["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100  # image tokens never carry loss
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss.item()
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    completion = processor.tokenizer.decode(out[0, batch["input_ids"].shape[1]:])
    _, total = count_parameters(model)
    result = {
        "model": model_name, "parameters": total, "prompt_tokens": int(batch["input_ids"].shape[1]),
        "image_tokens": int((batch["input_ids"] == model.config.image_token_id).sum()),
        "loss": loss, "generated": completion, "seconds": time.perf_counter() - t0,
    }
    print(f"built {model_name}: {total:,} parameters | prompt {result['prompt_tokens']} tokens "
          f"({result['image_tokens']} image tokens) | loss {loss:.3f} (random init: ~ln(vocab)) | "
          f"generated {completion!r} | {result['seconds']:.1f}s")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mpi", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p_smoke = sub.add_parser("smoke", help="build the toy VLM, one forward, one generate")
    p_smoke.add_argument("--model", default="toy-tiny")
    p_smoke.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from mpi import pipeline  # noqa: PLC0415 - the pipeline owns the default command once it exists
    except ImportError:
        pipeline = None
    if pipeline is not None and (not argv or argv[0] != "smoke"):
        return pipeline.main(argv)
    args = build_parser().parse_args(argv or ["smoke"])
    if args.command in (None, "smoke"):
        smoke(getattr(args, "model", "toy-tiny"), getattr(args, "seed", 0))
    return 0
