from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pins(name):
    lines = [ln.split("#")[0].strip() for ln in (ROOT / name).read_text().splitlines()]
    return {ln.split("==")[0]: ln for ln in lines if ln}


def test_colab_requirements_match_but_keep_colab_torch():
    full, colab = _pins("requirements.txt"), _pins("requirements-colab.txt")
    assert "torch" not in colab and "torchvision" not in colab
    for name, pin in colab.items():
        assert full.get(name) == pin, f"requirements-colab.txt pins {pin}, requirements.txt has {full.get(name)}"
