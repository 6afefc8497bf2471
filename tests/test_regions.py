"""Named regions on real landmarks, region/box parsing, and box clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from focalrt.runtime.faces.regions import (
    LIPS_OUTER,
    REGIONS,
    RIGHT_EYE,
    inter_ocular,
    parse_box,
    parse_regions,
    region_box,
)

EXPECTED = ["left_eye", "right_eye", "eyes", "left_brow", "right_brow", "brows", "forehead", "nose",
            "left_cheek", "right_cheek", "mouth", "chin", "jaw", "face"]


def inside(box, point) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def test_all_named_regions_exist_with_action_units():
    assert list(REGIONS) == EXPECTED
    aus = {n: set(r.action_units) for n, r in REGIONS.items()}
    assert {"AU1", "AU2", "AU4"} <= aus["brows"]
    assert {"AU43", "AU45"} <= aus["left_eye"] and aus["eyes"] == aus["right_eye"]
    assert "AU9" in aus["nose"] and "AU17" in aus["chin"] and {"AU26", "AU27"} <= aus["jaw"]
    assert {"AU12", "AU25", "AU26"} <= aus["mouth"]
    assert set().union(*aus.values()) == aus["face"]
    for r in REGIONS.values():
        assert all(0 <= i < 468 for i in r.indices) and len(set(r.indices)) == len(r.indices)


def test_every_region_box_holds_its_landmarks(astronaut_face, astronaut_bgr):
    lm = astronaut_face.landmarks
    for name, region in REGIONS.items():
        x1, y1, x2, y2 = box = region_box(name, lm, astronaut_bgr.shape)
        assert all(isinstance(v, int) for v in box) and 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 512
        pts = lm[list(region.indices), :2]
        assert (pts[:, 0] >= x1).all() and (pts[:, 0] <= x2).all(), name
        assert (pts[:, 1] >= y1).all() and (pts[:, 1] <= y2).all(), name


def test_region_boxes_sit_on_the_right_features(astronaut_face, astronaut_bgr):
    lm, kp, shape = astronaut_face.landmarks, astronaut_face.keypoints, astronaut_bgr.shape
    box = {n: region_box(n, lm, shape) for n in REGIONS}
    right_eye_kp, left_eye_kp, nose_kp, mouth_kp = kp[0], kp[1], kp[2], kp[3]
    assert inside(box["right_eye"], right_eye_kp) and not inside(box["right_eye"], left_eye_kp)
    assert inside(box["left_eye"], left_eye_kp) and not inside(box["left_eye"], right_eye_kp)
    assert inside(box["eyes"], left_eye_kp) and inside(box["eyes"], right_eye_kp)
    assert inside(box["nose"], nose_kp) and inside(box["mouth"], mouth_kp)
    assert not inside(box["mouth"], nose_kp) and not inside(box["nose"], left_eye_kp)
    # Subject's left is the image's right for a face looking at the camera.
    centre_x = {n: (b[0] + b[2]) / 2 for n, b in box.items()}
    for side in ("eye", "brow", "cheek"):
        assert centre_x[f"left_{side}"] > centre_x[f"right_{side}"] + 20, side
    centre_y = {n: (b[1] + b[3]) / 2 for n, b in box.items()}
    assert centre_y["forehead"] < centre_y["brows"] < centre_y["eyes"] < centre_y["nose"]
    assert centre_y["nose"] < centre_y["mouth"] < centre_y["chin"]
    assert box["chin"][3] >= lm[152, 1] and box["chin"][1] > lm[list(LIPS_OUTER), 1].mean()
    assert box["face"][0] <= min(b[0] for b in box.values()) and box["face"][3] >= box["jaw"][3]


def test_region_box_is_clipped_at_the_frame_edge(astronaut_face):
    lm = astronaut_face.landmarks.copy()
    lm[:, 0] -= lm[list(RIGHT_EYE), 0].mean()  # right eye centre now on the left border
    pts = lm[list(REGIONS["eyes"].indices), :2]
    pad = REGIONS["eyes"].padding * inter_ocular(lm)
    assert pts[:, 0].min() - pad < 0
    (_, y_lo), (x_hi, y_hi) = pts.min(0) - pad, pts.max(0) + pad
    assert region_box("eyes", lm, (480, 640, 3)) == (0, math.floor(y_lo), math.ceil(x_hi), math.ceil(y_hi))
    with pytest.raises(ValueError, match="zero area"):
        region_box("mouth", lm - [1000, 0, 0], (480, 640, 3))


def test_region_box_rejects_bad_input(astronaut_face):
    with pytest.raises(ValueError, match=r"unknown region 'mouht' \(did you mean 'mouth'\?\); valid: "):
        region_box("mouht", astronaut_face.landmarks, (512, 512, 3))
    with pytest.raises(ValueError, match=r"\[468, 2\] or \[468, 3\].*\(68, 2\)"):
        region_box("mouth", np.zeros((68, 2)), (512, 512, 3))


def test_parse_regions():
    assert parse_regions("mouth") == ["mouth"]
    assert parse_regions(" Mouth , left_eye,mouth,") == ["mouth", "left_eye"]
    with pytest.raises(ValueError) as err:
        parse_regions("mouth,eyebrows")
    assert "'eyebrows'" in str(err.value) and "valid: " + ", ".join(EXPECTED) in str(err.value)
    with pytest.raises(ValueError, match="no region named"):
        parse_regions(" , ")


def test_parse_box():
    assert parse_box("120,80,260,200") == (120, 80, 260, 200)
    assert parse_box(" 120 , 80 , 260.6 , 200 ") == (120, 80, 261, 200)
    assert parse_box("-10,-5,20,30") == (-10, -5, 20, 30)  # clip_box decides what to do with it


@pytest.mark.parametrize("text, words", [
    ("120,80,260", "four comma-separated numbers"),
    ("1,2,3,4,5", "four comma-separated numbers"),
    ("", "four comma-separated numbers"),
    ("1,,3,4", "four comma-separated numbers"),
    ("a,b,c,d", "not a number"),
    ("1,2,inf,4", "non-finite"),
    ("260,80,120,200", "need x2 > x1 and y2 > y1"),
])
def test_parse_box_errors(text, words):
    with pytest.raises(ValueError, match=words) as err:
        parse_box(text)
    assert "e.g. '120,80,260,200'" in str(err.value)
