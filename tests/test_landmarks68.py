"""The FaceMesh -> iBUG 68 correspondence, checked on the astronaut's real landmarks."""

from __future__ import annotations

import numpy as np
import pytest

from focalrt.runtime.faces.landmarks68 import FACEMESH_TO_68, PARTS68, to_68


def test_table_is_68_distinct_facemesh_indices():
    assert FACEMESH_TO_68.shape == (68,)
    assert len(set(FACEMESH_TO_68.tolist())) == 68
    assert FACEMESH_TO_68.min() >= 0 and FACEMESH_TO_68.max() < 468
    assert sorted(i for part in PARTS68.values() for i in part) == list(range(68))


@pytest.fixture(scope="module")
def p68(astronaut_face):
    return to_68(astronaut_face.landmarks)


def test_jaw_runs_from_image_left_over_the_chin_to_image_right(p68, astronaut_face):
    jaw = p68[0:17]
    # Down the right side to the chin, then up the left side; x never goes back (the upper sides are
    # near-vertical, hence the half-pixel slack) and spans the face.
    assert (np.diff(jaw[:9, 1]) > 0).all() and (np.diff(jaw[8:, 1]) < 0).all(), jaw
    assert (np.diff(jaw[:, 0]) > -0.5).all(), jaw[:, 0]
    box = astronaut_face.box
    assert jaw[16, 0] - jaw[0, 0] > 0.8 * (box[2] - box[0])
    assert np.argmax(jaw[:, 1]) in (7, 8, 9)
    np.testing.assert_allclose(jaw[8], astronaut_face.landmarks[152, :2])  # the chin's lowest point
    # Points 0 and 16 are at the sides of the face around eye height, not on the chin.
    eye_y = p68[36:48, 1].mean()
    assert abs(jaw[0, 1] - eye_y) < 25 and abs(jaw[16, 1] - eye_y) < 25


def test_eyes_brows_nose_and_mouth_sit_where_ibug_puts_them(p68, astronaut_face):
    kp = astronaut_face.keypoints  # 0 right eye, 1 left eye, 3 mouth (subject's sides)
    iod = float(np.linalg.norm(kp[1] - kp[0]))
    assert np.linalg.norm(p68[36:42].mean(0) - kp[0]) < 0.15 * iod
    assert np.linalg.norm(p68[42:48].mean(0) - kp[1]) < 0.15 * iod
    assert np.linalg.norm(p68[48:68].mean(0) - kp[3]) < 0.2 * iod
    # Corners in iBUG order: 36 outer < 39 inner (right eye), 42 inner < 45 outer, 48 < 54 mouth corners.
    assert p68[36, 0] < p68[39, 0] < p68[42, 0] < p68[45, 0]
    assert p68[48, 0] < p68[51, 0] < p68[54, 0] and p68[51, 1] < p68[57, 1]
    assert p68[62, 1] <= p68[66, 1]  # inner upper lip above inner lower lip
    # Brows above their eyes, running outer -> inner on the right and inner -> outer on the left.
    assert p68[17:22, 1].max() < p68[36:42, 1].min() and p68[22:27, 1].max() < p68[42:48, 1].min()
    assert (np.diff(p68[17:27, 0]) > 0).all()
    # The nose bridge runs down to the tip, and the nostril base lies left to right below it.
    assert (np.diff(p68[27:31, 1]) > 0).all() and (np.diff(p68[31:36, 0]) > 0).all()
    assert p68[31:36, 1].min() > p68[27, 1] and p68[33, 1] < p68[51, 1]


def test_to_68_rejects_other_shapes():
    with pytest.raises(ValueError, match=r"\[468, 2\] or \[468, 3\].*\(478, 3\)"):
        to_68(np.zeros((478, 3)))
