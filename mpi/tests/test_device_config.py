import pytest
import torch

from mpi.config import PRESETS, RunConfig, get_config
from mpi.device import DeviceInfo, pick_dtype, seed_everything
from mpi.modeling import decide_quantization, processor_backend


@pytest.mark.parametrize(
    "info, expected",
    [
        (DeviceInfo("cpu"), torch.float32),
        (DeviceInfo("mps"), torch.float32),
        # Tesla T4: sm_75, torch reports no bf16 -> fp16
        (DeviceInfo("cuda", "Tesla T4", bf16_supported=False, compute_capability=(7, 5)), torch.float16),
        # Some torch builds report emulated bf16 on sm_75; still fp16, bf16 is not native there.
        (DeviceInfo("cuda", "Tesla T4", bf16_supported=True, compute_capability=(7, 5)), torch.float16),
        (DeviceInfo("cuda", "NVIDIA A100", bf16_supported=True, compute_capability=(8, 0)), torch.bfloat16),
        (DeviceInfo("cuda", "NVIDIA H100", bf16_supported=True, compute_capability=(9, 0)), torch.bfloat16),
    ],
)
def test_dtype_decision(info, expected):
    assert pick_dtype(info) == expected


@pytest.mark.parametrize(
    "requested, device, bnb, expected",
    [("auto", "cuda", True, "4bit"), ("auto", "cpu", True, None), ("auto", "cuda", False, None),
     (None, "cuda", True, None), ("4bit", "cpu", True, "4bit"), ("4bit", "cuda", True, "4bit")],
)
def test_quantization_decision(requested, device, bnb, expected):
    assert decide_quantization(requested, device, bnb) == expected


def test_quantization_errors_name_the_fix():
    with pytest.raises(RuntimeError, match="bitsandbytes"):
        decide_quantization("4bit", "mps", False)
    with pytest.raises(ValueError, match="quantization must be"):
        decide_quantization("8bit", "cpu", True)


def test_processor_backend_decision():
    assert processor_backend(torchvision_available=True, is_toy_model=False) == "stock"  # Colab
    assert processor_backend(torchvision_available=False, is_toy_model=False) == "pil"
    assert processor_backend(torchvision_available=True, is_toy_model=True) == "pil"


def test_presets_and_overrides():
    cfg = get_config("toy", seed=3, sft_epochs=2.0)
    assert isinstance(cfg, RunConfig) and cfg.seed == 3 and cfg.sft_epochs == 2.0 and cfg.model == "toy-small"
    assert get_config("colab-t4").quantization == "4bit"
    assert get_config("paper").model == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert {"tiny", "toy", "colab-t4", "paper"} <= set(PRESETS)
    with pytest.raises(ValueError, match="unknown RunConfig field.*lerning_rate"):
        get_config("toy", lerning_rate=1.0)
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("huge")


def test_preset_from_environment(monkeypatch):
    monkeypatch.setenv("MPI_PRESET", "colab-t4")
    assert get_config().preset == "colab-t4"


def test_seed_everything_repeats():
    seed_everything(7)
    a = torch.rand(3)
    seed_everything(7)
    assert torch.equal(a, torch.rand(3))
