"""When a face region needs a fresh description: on a cadence, or sooner when its pixels change.

Describing every region on every frame is what makes a VLM pipeline slow; most frames look like the one
before. The scheduler re-describes a region on a fixed cadence, or sooner when its appearance signature
moves.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import cv2
import numpy as np

from focalrt.runtime.faces.tracking import as_boxes

SIGNATURE_SIZE = 16


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
