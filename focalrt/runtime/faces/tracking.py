"""Stable face ids across frames: a greedy IoU tracker over the detector's boxes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


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
