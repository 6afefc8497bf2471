"""Face ids stay put while a face moves; regions are re-described on cadence or when they change."""

from __future__ import annotations

import numpy as np
import pytest

from focalrt.runtime.faces.tracking import IoUTracker
from focalrt.runtime.stream.scheduling import RegionScheduler, appearance_signature, signature_distance


def box(x: float, y: float, w: float = 40, h: float = 50) -> np.ndarray:
    return np.array([x, y, x + w, y + h], dtype=np.float32)


def test_moving_face_keeps_its_id():
    tracker = IoUTracker()
    ids = [tracker.update([box(10 + 4 * step, 20 + 2 * step)]) for step in range(15)]
    assert ids == [[1]] * 15


def test_new_face_gets_new_id_regardless_of_input_order():
    tracker = IoUTracker()
    assert tracker.update([box(10, 10)]) == [1]
    assert tracker.update([box(200, 10), box(12, 11)]) == [2, 1]
    assert tracker.update([box(14, 12), box(203, 12)]) == [1, 2]


def test_overlapping_faces_go_to_the_best_match():
    tracker = IoUTracker(iou_threshold=0.1)
    tracker.update([box(0, 0), box(30, 0)])
    # Both new boxes overlap both tracks; each must stay with the track it overlaps most.
    assert tracker.update([box(28, 0), box(3, 0)]) == [2, 1]


def test_lost_face_survives_max_missed_frames_then_is_retired():
    tracker = IoUTracker(max_missed=2)
    tracker.update([box(10, 10), box(200, 10)])
    tracker.update([box(200, 10)])
    tracker.update([box(200, 10)])
    assert tracker.update([box(11, 10), box(200, 10)]) == [1, 2]  # back after 2 missed frames
    for _ in range(2):
        tracker.update([box(200, 10)])
        assert tracker.retired == []
    tracker.update([box(200, 10)])
    assert tracker.retired == [1]
    assert tracker.update([box(11, 10), box(200, 10)]) == [3, 2]  # same place, but a new face now


def test_tracker_empty_frames_and_bad_boxes():
    tracker = IoUTracker(max_missed=0)
    assert tracker.update([]) == []
    assert tracker.update([box(0, 0)]) == [1]
    assert tracker.update([]) == [] and tracker.retired == [1]
    with pytest.raises(ValueError, match="is empty"):
        tracker.update([np.array([10, 10, 5, 20])])
    with pytest.raises(ValueError, match="4 finite numbers"):
        tracker.update([np.array([1, 2, 3])])


def test_scheduler_first_then_every_n_frames():
    scheduler = RegionScheduler(every=3)
    key = (1, "mouth")
    assert scheduler.due(key, 0, 0.0) == (True, "first")
    scheduler.mark_described(key, 0, 0.0)
    assert [scheduler.due(key, i, i / 30)[1] for i in (1, 2, 3)] == ["not_due", "not_due", "interval"]
    assert scheduler.due((2, "mouth"), 2, 0.1) == (True, "first")  # keys are independent


def test_scheduler_min_interval_also_has_to_pass():
    scheduler = RegionScheduler(every=1, min_interval_s=1.0)
    scheduler.mark_described("k", 0, 10.0)
    assert scheduler.due("k", 5, 10.5) == (False, "not_due")
    assert scheduler.due("k", 6, 11.0) == (True, "interval")


def texture(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.kron(small, np.ones((size // 8, size // 8, 1), np.uint8))


def test_scheduler_redescribes_a_changed_region_early():
    image = texture(0)
    region = (8, 8, 56, 56)
    scheduler = RegionScheduler(every=100, change_threshold=0.2)
    signature = appearance_signature(image, region)
    scheduler.mark_described("k", 0, 0.0, signature)
    noisy = np.clip(image + np.random.default_rng(1).normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    assert scheduler.due("k", 1, 0.03, appearance_signature(noisy, region)) == (False, "not_due")
    assert scheduler.due("k", 2, 0.06, appearance_signature(texture(5), region)) == (True, "changed")
    assert scheduler.due("k", 2, 0.06, None) == (False, "not_due")  # no signature: cadence only
    with pytest.raises(ValueError, match="change_threshold"):
        RegionScheduler(change_threshold=5.0)


def test_signature_distance_small_for_noise_and_light_large_for_other_content():
    image = texture(0)
    region = (8, 8, 56, 56)
    base = appearance_signature(image, region)
    assert base.shape == (256,) and np.linalg.norm(base) == pytest.approx(1.0, abs=1e-5)
    noisy = np.clip(image + np.random.default_rng(2).normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    brighter = np.clip(image.astype(np.int16) + 20, 0, 255).astype(np.uint8)
    assert signature_distance(base, appearance_signature(noisy, region)) < 0.05
    assert signature_distance(base, appearance_signature(brighter, region)) < 0.05
    assert signature_distance(base, appearance_signature(texture(7), region)) > 0.5
    assert signature_distance(base, appearance_signature(image, (0, 0, 32, 32))) > 0.5
    with pytest.raises(ValueError, match="outside"):
        appearance_signature(image, (100, 100, 120, 120))


def test_scheduler_keeps_last_description_and_forgets_retired_faces():
    scheduler = RegionScheduler()
    assert scheduler.last((1, "mouth")) is None
    event = {"face_id": 1, "region": "mouth", "text": "lips parted"}
    scheduler.mark_described((1, "mouth"), 0, 0.0)
    scheduler.remember((1, "mouth"), event)
    scheduler.remember((2, "mouth"), {"face_id": 2})
    assert scheduler.last((1, "mouth")) == event
    scheduler.forget_face(1)
    assert scheduler.last((1, "mouth")) is None and scheduler.last((2, "mouth")) == {"face_id": 2}
    assert scheduler.due((1, "mouth"), 5, 1.0) == (True, "first")
