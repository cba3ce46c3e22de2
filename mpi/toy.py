"""The toy VLM: a real transformers Qwen2.5-VL at tiny size, built offline and deterministically.

Three parts, each what a real checkpoint ships:
1. a byte-level BPE tokenizer trained here on the project's own domain text, with Qwen's special
   tokens and chat template (so prompts look exactly like Qwen2.5-VL prompts);
2. a processor: Qwen2.5-VL's, minus video (the stock class insists on a video processor, which needs
   torchvision) with the PIL image processor; fixed image size so every image gives the same number
   of image tokens;
3. a `Qwen2_5_VLForConditionalGeneration` with a tiny config and random init (seeded).

`build_toy(name)` writes all three to a cache directory once (atomically); `mpi.modeling` then loads
it with the same `from_pretrained` calls a hub checkpoint goes through.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mpi.atomic import atomic_directory

TOY_VERSION = 2  # bump when the recipe changes so old caches are not reused. 2: COMPACT_TOKENS added
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
PAD_TOKEN, EOS_TOKEN, IMAGE_TOKEN = "<|endoftext|>", "<|im_end|>", "<|image_pad|>"


def _section_ids(levels: int = 7) -> list[str]:
    ids, frontier = [], ["1"]
    for _ in range(levels):
        ids += frontier
        frontier = [f"{i}.{b}" for i in frontier for b in (1, 2)]
    return ids


# Whole words of the compact policies (mpi.data.policies.Policy.render_compact): every section id ("#1.2.1", trees
# of up to 6 layers and their leaves) and every case ("Case 12", with and without its leading space) is one token,
# longest match first. A section is then found by one attention look-up on one token; split into digits and dots,
# "#1.1" and "#1.1.2" share a prefix and the look-up needs several hops (no base learned even the one-token look-up
# by itself; the shipped one has it set at init, `mpi.toy_circuit`: docs/results-history.md).
COMPACT_TOKENS = ([f"#{i}" for i in _section_ids()] + [f"Case {k}" for k in range(1, 129)]
                  + [f" Case {k}" for k in range(1, 129)])

# Qwen2-VL's chat template, without video. Images become <|vision_start|><|image_pad|><|vision_end|>
# and the processor expands <|image_pad|> to one token per merged 2x2 patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ToySpec:
    """Every size knob of a toy model. head_dim = hidden/heads; mrope_section must sum to head_dim/2."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    mrope_section: tuple[int, int, int]
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_depth: int
    vision_heads: int
    image_size: int  # images are resized to image_size x image_size
    patch_size: int = 14
    merge_size: int = 2

    @property
    def image_tokens(self) -> int:
        """Tokens one image becomes in the language model: (side/patch)^2 / merge^2."""
        return (self.image_size // self.patch_size) ** 2 // self.merge_size**2


TOY_SPECS: dict[str, ToySpec] = {
    # Unit tests: ~0.3M parameters, 56 px images -> 4 image tokens, forward in milliseconds.
    "toy-tiny": ToySpec(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3),
                        vision_hidden_size=32, vision_intermediate_size=64, vision_depth=2,
                        vision_heads=2, image_size=56),
    # Learning runs: a few M parameters, 112 px images -> 16 image tokens.
    "toy-small": ToySpec(vocab_size=2048, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=2, mrope_section=(4, 6, 6),
                         vision_hidden_size=128, vision_intermediate_size=256, vision_depth=4,
                         vision_heads=4, image_size=112),
}


def is_toy(name: str) -> bool:
    return name in TOY_SPECS


def _fallback_corpus() -> list[str]:
    """A few hand-written lines appended to mpi.data's corpus (kept: the corpus keys the toy cache)."""
    shapes, colors = ["cube", "sphere", "cylinder"], ["gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow"]
    lines = []
    for i, color in enumerate(colors):
        for shape in shapes:
            lines.append(
                f"# Condition 1.{i} If there is a {color} {shape} in the image, go to Condition 1.{i}.1; "
                f"otherwise the response is Case {i}. According to the Policy: L2-Surinu, what should be "
                f"the response for the given image? <think>Condition 1: I see a small metal {color} {shape}."
                f"</think>\n\\boxed{{Case {i + 1}}}"
            )
    lines.append('{"name": "OCR_v1", "arguments": {"image": "image/image_203.jpg"}} credits account_type age')
    return lines


@functools.lru_cache(maxsize=1)
def _domain_corpus() -> tuple[str, ...]:
    from mpi.data import tokenizer_corpus  # here, not at the top: importing mpi.toy stays light

    return tuple(tokenizer_corpus(seed=0)) + tuple(_fallback_corpus())


def domain_corpus() -> list[str]:
    """The text the toy tokenizer is trained on: the project's own prompts, policies and answers."""
    return list(_domain_corpus())


def train_tokenizer(corpus: list[str], vocab_size: int):
    """Train a byte-level BPE (Qwen's tokenizer family) and wrap it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        additional_special_tokens=SPECIAL_TOKENS[1:], padding_side="left",
    )
    tokenizer.add_tokens(COMPACT_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def toy_processor_class():
    """Qwen2.5-VL's processor class minus video (the stock one needs torchvision for its video processor)."""
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

    class ToyQwenVLProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL's processor without the video processor (which needs torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ToyQwenVLProcessor


def pil_image_processor(image_size: int, patch_size: int = 14, merge_size: int = 2):
    """Qwen2-VL's PIL image processor pinned to one resolution (min_pixels == max_pixels)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = image_size * image_size
    return Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=patch_size,
                                    merge_size=merge_size, temporal_patch_size=2)


def build_processor(tokenizer, image_processor):
    return toy_processor_class()(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def model_config(spec: ToySpec, tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = spec.hidden_size // spec.num_attention_heads
    if sum(spec.mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {spec.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": list(spec.mrope_section), "rope_theta": 10000.0},
            bos_token_id=None, eos_token_id=ids[EOS_TOKEN], pad_token_id=ids[PAD_TOKEN],
        ),
        vision_config=dict(
            depth=spec.vision_depth, hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_intermediate_size, num_heads=spec.vision_heads,
            out_hidden_size=spec.hidden_size,  # the merger must emit text-width vectors
            patch_size=spec.patch_size, spatial_merge_size=spec.merge_size, temporal_patch_size=2,
            window_size=spec.image_size, fullatt_block_indexes=[spec.vision_depth - 1], in_channels=3,
        ),
        image_token_id=ids[IMAGE_TOKEN], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=None, eos_token_id=ids[EOS_TOKEN], pad_token_id=ids[PAD_TOKEN], tie_word_embeddings=False,
    )


def cache_root() -> Path:
    return Path(os.environ.get("MPI_CACHE", Path.home() / ".cache" / "mpi"))


def toy_path(name: str, seed: int = 0) -> Path:
    """Where the toy lives: keyed by its spec, the tokenizer corpus and the seed (stale caches miss)."""
    spec = TOY_SPECS[name]
    corpus = domain_corpus()
    key = hashlib.sha256(
        json.dumps([TOY_VERSION, asdict(spec), seed, corpus], sort_keys=True).encode()
    ).hexdigest()[:12]
    return cache_root() / "toy" / f"{name}-s{seed}-{key}"


def build_toy(name: str = "toy-tiny", seed: int = 0, path: str | os.PathLike | None = None,
              overwrite: bool = False) -> Path:
    """Build the toy model, tokenizer and processor into a directory (once) and return the path."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    if name not in TOY_SPECS:
        raise ValueError(f"unknown toy model {name!r}; choose one of {sorted(TOY_SPECS)}")
    spec = TOY_SPECS[name]
    path = Path(path) if path is not None else toy_path(name, seed)
    if (path / "config.json").exists() and not overwrite:
        return path
    tokenizer = train_tokenizer(domain_corpus(), spec.vocab_size)
    processor = build_processor(tokenizer, pil_image_processor(spec.image_size, spec.patch_size, spec.merge_size))
    config = model_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=False, max_new_tokens=64,
    )
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "toy_spec.json").write_text(json.dumps({"name": name, "seed": seed, **asdict(spec)}, indent=2))
    return path


def load_toy_tokenizer(name: str = "toy-tiny", seed: int = 0):
    """The toy tokenizer (builds the toy model once if it is not cached)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(build_toy(name, seed))


def load_toy_processor(path: str | os.PathLike):
    """The processor of a toy directory, rebuilt from its saved parts without torchvision."""
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((Path(path) / "toy_spec.json").read_text())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    return build_processor(tokenizer, pil_image_processor(spec["image_size"], spec["patch_size"], spec["merge_size"]))
