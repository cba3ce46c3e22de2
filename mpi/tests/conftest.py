"""Shared fixtures: the toy-tiny model is built once per session into a temporary cache."""

import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def toy_tiny_path():
    from mpi.toy import build_toy

    return build_toy("toy-tiny", seed=0)


@pytest.fixture(scope="session")
def toy_model_and_processor(toy_tiny_path):
    from mpi.modeling import load_model_and_processor

    model, processor = load_model_and_processor("toy-tiny", quantization=None, seed=0, trainable=False)
    return model, processor


def solid_image(color=(200, 30, 30), size=56):
    return Image.new("RGB", (size, size), color)


def chat_batch(processor, n_images: int = 1, text: str = "What do you see?", answer: str | None = None):
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)
    images = [solid_image((40 * i % 255, 100, 200)) for i in range(n_images)]
    return processor(text=[prompt], images=images, return_tensors="pt")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The toy models gain nothing from intra-op threads, and on a busy 2-core machine they cost up to 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def torch_seed():
    torch.manual_seed(0)
