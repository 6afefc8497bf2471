"""The one face-crop geometry (runtime/faces/crops.py): clipping, the run's face crop, and what follows it."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from focalrt.runtime.faces.crops import clip_box, crop_face, face_crop_transform, map_box, region_view


def test_clip_box():
    assert clip_box((10, 20, 110, 220), 640, 480) == ((10, 20, 110, 220), False)
    assert clip_box((10.2, 20.7, 109.1, 219.5), 640, 480) == ((10, 20, 110, 220), False)
    assert clip_box((-30, -5, 700, 100), 640, 480) == ((0, 0, 640, 100), True)
    assert clip_box((600, 470, 900, 999), 640, 480) == ((600, 470, 640, 480), True)


@pytest.mark.parametrize("box, words", [
    ((700, 10, 800, 50), "zero area"),          # wholly right of a 640-wide frame
    ((-50, 10, 0, 50), "zero area"),            # ends exactly on the left edge
    ((10, 50, 100, 40), "need x2 > x1 and y2 > y1"),
    ((10, 10, 10, 40), "need x2 > x1 and y2 > y1"),
    ((1, 2, 3), "4 numbers"),
    ((0, 0, float("nan"), 5), "non-finite"),
])
def test_clip_box_errors(box, words):
    with pytest.raises(ValueError, match=words):
        clip_box(box, 640, 480)


def test_face_crop_mapping_puts_a_frame_box_on_the_same_pixels():
    frame = np.zeros((360, 480, 3), np.uint8)
    box = (200, 150, 260, 190)
    frame[box[1]:box[3], box[0]:box[2]] = 255
    m = face_crop_transform(np.array([180, 100, 300, 230]), 336)
    crop = cv2.warpAffine(frame, m.astype(np.float32), (336, 336), flags=cv2.INTER_NEAREST)
    x1, y1, x2, y2 = (round(v) for v in map_box(box, m))
    ys, xs = np.nonzero(crop[..., 0])
    assert abs(xs.min() - x1) <= 1 and abs(xs.max() + 1 - x2) <= 1
    assert abs(ys.min() - y1) <= 1 and abs(ys.max() + 1 - y2) <= 1


def test_crop_face_clips_a_region_box_to_the_crop_and_moves_landmarks_with_it():
    """A region box reaching past the face crop is clipped once, by the same rule as any box; landmarks
    land on the crop pixels of the frame pixels they marked."""
    frame = np.zeros((360, 480, 3), np.uint8)
    face_box = (180, 100, 300, 230)
    inside, outside = (200, 150, 260, 190), (100, 20, 260, 190)  # the second starts far left of the crop
    points = np.array([[200.0, 150.0], [260.0, 190.0]])
    face = crop_face(frame, face_box, 336, [inside, outside], points)
    m = face_crop_transform(face_box, 336)
    assert face.image.shape == (336, 336, 3)
    assert face.boxes[0] == tuple(round(v) for v in map_box(inside, m))
    x1, y1, x2, y2 = (round(v) for v in map_box(outside, m))
    assert x1 < 0 and y1 < 0  # it does leave the crop
    assert face.boxes[1] == (0, 0, x2, y2)
    assert np.allclose(face.landmarks68, [map_box(inside, m)[:2], map_box(inside, m)[2:]])
    assert crop_face(frame, face_box, 336).landmarks68 is None


def test_a_region_wholly_outside_the_face_crop_is_refused_by_name():
    with pytest.raises(ValueError, match="zero area inside the 336x336"):
        crop_face(np.zeros((360, 480, 3), np.uint8), (180, 100, 300, 230), 336, [(0, 0, 20, 20)])


@pytest.mark.parametrize("mode", ["text", "draw", "crop", "face_crop"])
def test_region_view_gives_the_region_on_its_own_pixels(mode):
    """Whatever the region mode, the box returned in the view's pixels covers the region's pixels."""
    image = np.zeros((240, 320, 3), np.uint8)
    box = (100, 60, 180, 140)
    image[box[1]:box[3], box[0]:box[2]] = 200
    with pytest.warns(UserWarning, match="clipped"):
        region_view(image, (-10, 60, 180, 140), mode)
    view, view_box, image_box = region_view(image, box, mode)
    assert image_box == box
    x1, y1, x2, y2 = view_box
    patch = view[y1 + 3:y2 - 3, x1 + 3:x2 - 3]
    assert patch.size and patch.min() == 200  # inside the outline that draw adds
    assert region_view(image, None, mode) == (image, None, None)
