"""Stable face ids across frames, and the decision of when a face region needs a fresh description.

Describing every region on every frame is what makes a VLM pipeline slow; most frames look like the one
before. The scheduler re-describes a region on a fixed cadence, or sooner when its pixels change.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import cv2
import numpy as np

SIGNATURE_SIZE = 16


def as_boxes(boxes: Sequence[Any]) -> np.ndarray:
    rows = [np.asarray(b, dtype=np.float64).reshape(-1) for b in boxes]
    if not rows:
        return np.zeros((0, 4))
    if any(row.size != 4 or not np.all(np.isfinite(row)) for row in rows):
        raise ValueError(f"boxes must be 4 finite numbers each (x1, y1, x2, y2), got {list(boxes)!r}")
    array = np.stack(rows)
    bad = np.flatnonzero((array[:, 2] <= array[:, 0]) | (array[:, 3] <= array[:, 1]))
    if bad.size:
        raise ValueError(f"box {array[bad[0]].tolist()} is empty; expected x1 < x2 and y1 < y2")
    return array


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (N, 4) against every box in b (M, 4)."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


class IoUTracker:
    """Greedy IoU matching: enough for faces, which rarely cross, and needs nothing beyond numpy."""

    def __init__(self, iou_threshold: float = 0.3, max_missed: int = 10):
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        if max_missed < 0:
            raise ValueError(f"max_missed must be >= 0, got {max_missed}")
        self.iou_threshold = iou_threshold
        self.max_missed = max_missed
        self.next_id = 1
        self.boxes: dict[int, np.ndarray] = {}  # track id -> last seen box
        self.missed: dict[int, int] = {}  # track id -> frames in a row without a match
        self.retired: list[int] = []  # ids retired by the last update, so callers can forget them

    def update(self, boxes: Sequence[Any]) -> list[int]:
        """An id for each box, in input order. A track unseen for more than max_missed frames in a row
        is retired and a face appearing there afterwards gets a new id."""
        detections = as_boxes(boxes)
        track_ids = list(self.boxes)
        ids = [0] * len(detections)
        matched_tracks: set[int] = set()
        if track_ids and len(detections):
            ious = iou_matrix(np.stack([self.boxes[t] for t in track_ids]), detections)
            for flat in np.argsort(-ious, axis=None, kind="stable"):
                t, d = np.unravel_index(flat, ious.shape)
                if ious[t, d] < self.iou_threshold:
                    break
                if track_ids[t] in matched_tracks or ids[d]:
                    continue
                ids[d] = track_ids[t]
                matched_tracks.add(track_ids[t])
        for d, track_id in enumerate(ids):
            if not track_id:
                track_id = ids[d] = self.next_id
                self.next_id += 1
            self.boxes[track_id] = detections[d]
            self.missed[track_id] = 0
        self.retired = []
        for track_id in track_ids:
            if track_id in matched_tracks:
                continue
            self.missed[track_id] += 1
            if self.missed[track_id] > self.max_missed:
                del self.boxes[track_id], self.missed[track_id]
                self.retired.append(track_id)
        return ids

    def reset(self) -> None:
        """Forget all faces, e.g. on a scene cut or a source reconnect."""
        self.retired = list(self.boxes)
        self.boxes.clear()
        self.missed.clear()


def appearance_signature(image_bgr: np.ndarray, box: Any) -> np.ndarray:
    """16x16 grey thumbnail of the region, zero-mean and unit-norm, so a global brightness change or
    sensor noise barely moves it while a mouth opening or an eye closing does."""
    height, width = image_bgr.shape[:2]
    x1, y1, x2, y2 = as_boxes([box])[0]
    x1, y1 = int(np.clip(np.floor(x1), 0, width)), int(np.clip(np.floor(y1), 0, height))
    x2, y2 = int(np.clip(np.ceil(x2), 0, width)), int(np.clip(np.ceil(y2), 0, height))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box {box!r} lies outside the {width}x{height} image")
    crop = image_bgr[y1:y2, x1:x2]
    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY) if crop.ndim == 3 else crop
    small = cv2.resize(gray, (SIGNATURE_SIZE, SIGNATURE_SIZE), interpolation=cv2.INTER_AREA)
    vector = small.astype(np.float32).reshape(-1)
    vector -= vector.mean()
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 1e-6 else np.zeros_like(vector)


def signature_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1 - cosine similarity: 0 for the same look, about 1 for unrelated, up to 2 for inverted."""
    if a.shape != b.shape:
        raise ValueError(f"signatures differ in shape: {a.shape} vs {b.shape}; "
                         f"make both with appearance_signature")
    norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if norm_a < 1e-6 or norm_b < 1e-6:  # flat crops carry no structure: equal if both flat
        return 0.0 if norm_a < 1e-6 and norm_b < 1e-6 else 1.0
    return float(1.0 - np.dot(a, b) / (norm_a * norm_b))


class RegionScheduler:
    """Per (face_id, region): due when never described, when the cadence allows, or when it changed."""

    def __init__(self, every: int = 1, min_interval_s: float = 0.0, change_threshold: float | None = None):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1 (frames between descriptions), got {every!r}")
        if min_interval_s < 0:
            raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s}")
        if change_threshold is not None and not 0.0 < change_threshold <= 2.0:
            raise ValueError(f"change_threshold is a signature distance in (0, 2] (try 0.1), "
                             f"got {change_threshold}")
        self.every = every
        self.min_interval_s = min_interval_s
        self.change_threshold = change_threshold
        self.described: dict[Hashable, tuple[int, float, np.ndarray | None]] = {}
        self.events: dict[Hashable, dict[str, Any]] = {}

    def due(self, key: Hashable, frame_index: int, t: float,
            signature: np.ndarray | None = None) -> tuple[bool, str]:
        if key not in self.described:
            return True, "first"
        last_index, last_t, last_signature = self.described[key]
        if (self.change_threshold is not None and signature is not None and last_signature is not None
                and signature_distance(signature, last_signature) > self.change_threshold):
            return True, "changed"
        if frame_index - last_index >= self.every and t - last_t >= self.min_interval_s:
            return True, "interval"
        return False, "not_due"

    def mark_described(self, key: Hashable, frame_index: int, t: float,
                       signature: np.ndarray | None = None) -> None:
        self.described[key] = (frame_index, t, signature)

    def remember(self, key: Hashable, event: dict[str, Any]) -> None:
        """Keep the latest description so frames that skip the model can re-emit it as carried over."""
        self.events[key] = event

    def last(self, key: Hashable) -> dict[str, Any] | None:
        return self.events.get(key)

    def forget_face(self, face_id: int) -> None:
        """Drop every (face_id, region) key of a retired face, so long runs do not grow without bound."""
        for store in (self.described, self.events):
            for key in [k for k in store if isinstance(k, tuple) and k and k[0] == face_id]:
                del store[key]
