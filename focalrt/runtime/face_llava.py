"""Face-LLaVA's runtime adapter: CLIP preprocessing, the landmark input and 1D position ids.

Preprocessing is LanguageBind's image transform, the same as transformers' CLIPImageProcessor: resize the
shorter side to 224 (bicubic), centre crop 224x224, scale to 0..1, normalise with the CLIP mean and std.
OpenCV resamples with INTER_AREA when shrinking (PIL's bicubic is antialiased, plain cubic is not) and
INTER_CUBIC when enlarging; an image whose shorter side already is 224 is only cropped.

Landmarks: 68 iBUG points (`focalrt.runtime.landmarks68.to_68`) in pixels of the image given, divided by
its width and height. Face-LLaVA was trained on 256x256 face crops with landmarks divided by 256, which
this equals for such a crop; give the model a tight square face crop and its landmarks. Without landmarks
(None) a landmark model runs its no-landmark path, exactly what the Face-LLaVA code does when none are
given (its image inference script passes none). A model without the landmark pathway ignores them.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from focalrt.runtime.preprocess import check_frame

NUM_LANDMARKS = 68


def clip_pixels(image_bgr: np.ndarray, shortest_edge: int, crop: int, mean: list[float], std: list[float],
                rescale: float) -> np.ndarray:
    """BGR frame -> [1, 3, crop, crop] float32 pixel values, as CLIPImageProcessor makes them."""
    check_frame(image_bgr)
    h, w = image_bgr.shape[:2]
    if min(h, w) != shortest_edge:
        # transformers truncates the long side: int(size * long / short)
        if h <= w:
            new_h, new_w = shortest_edge, int(shortest_edge * w / h)
        else:
            new_h, new_w = int(shortest_edge * h / w), shortest_edge
        shrink = new_h < h
        image_bgr = cv2.resize(image_bgr, (new_w, new_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
        h, w = new_h, new_w
    if h < crop or w < crop:
        raise ValueError(f"resized image {h}x{w} is smaller than the {crop}x{crop} crop; the manifest's "
                         f"resize_shortest_edge must be >= image_size")
    top, left = (h - crop) // 2, (w - crop) // 2
    rgb = cv2.cvtColor(image_bgr[top:top + crop, left:left + crop], cv2.COLOR_BGR2RGB)
    x = rgb.astype(np.float32) * np.float32(rescale)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def normalise_landmarks(landmarks68: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """[68, 2] pixel points of an image of size (h, w) -> [1, 68, 2] float32 in 0..1 (x / w, y / h)."""
    points = np.asarray(landmarks68, dtype=np.float32)
    if points.ndim != 2 or points.shape[0] != NUM_LANDMARKS or points.shape[1] < 2:
        raise ValueError(f"landmarks68 must be [68, 2] (x, y pixels in iBUG order), got shape {points.shape}; "
                         f"convert FaceMesh points with focalrt.runtime.landmarks68.to_68")
    if not np.isfinite(points[:, :2]).all():
        raise ValueError("landmarks68 holds NaN or infinite values; pass None when no landmarks were found")
    h, w = image_hw
    return (points[:, :2] / np.array([w, h], np.float32))[None]


class FaceLlavaAdapter:
    rope_axes = 1

    def __init__(self, manifest: dict[str, Any]):
        self.pre = manifest["preprocess"]
        self.image_size = int(self.pre["image_size"])
        self.shortest_edge = int(self.pre.get("resize_shortest_edge", self.image_size))
        self.image_tokens = int(self.pre["image_tokens"])
        names = {i["name"] for i in manifest["components"]["vision"]["inputs"]}
        self.uses_landmarks = "landmarks" in names

    def vision_inputs(self, image_bgr: np.ndarray, landmarks68: np.ndarray | None = None) -> dict[str, np.ndarray]:
        p = self.pre
        feeds = {"pixel_values": clip_pixels(image_bgr, self.shortest_edge, self.image_size, p["mean"], p["std"],
                                             p["rescale"])}
        if self.uses_landmarks:
            if landmarks68 is None:
                feeds["landmarks"] = np.zeros((1, NUM_LANDMARKS, 2), np.float32)
                feeds["use_landmarks"] = np.array([False])
            else:
                feeds["landmarks"] = normalise_landmarks(landmarks68, image_bgr.shape[:2])
                feeds["use_landmarks"] = np.array([True])
        return feeds

    def positions(self, prompt_ids: np.ndarray) -> tuple[np.ndarray, int]:
        """Llama counts positions 0..S-1 along the prompt; generated tokens continue from S."""
        return np.arange(len(prompt_ids), dtype=np.int64)[None], 0
