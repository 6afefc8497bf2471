"""Image preprocessing in numpy/cv2, equal to the Qwen2.5-VL image processor at a fixed size."""

from __future__ import annotations

import cv2
import numpy as np

from focalrt.runtime.frames import check_frame


def to_model_image(image_bgr: np.ndarray, size: int) -> np.ndarray:
    """BGR frame -> RGB size x size uint8: what the vision encoder sees. Square input is not resampled."""
    check_frame(image_bgr)
    h, w = image_bgr.shape[:2]
    if (h, w) != (size, size):
        shrink = h > size or w > size
        image_bgr = cv2.resize(image_bgr, (size, size),
                               interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    return cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)


def patchify(image_rgb: np.ndarray, mean: list[float], std: list[float], rescale: float, patch_size: int,
             merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """RGB uint8 -> [grid_h*grid_w, C*T*P*P] float32 patches in the merge-window order of Qwen2-VL."""
    h, w, c = image_rgb.shape
    gh, gw = h // patch_size, w // patch_size
    if gh * patch_size != h or gw * patch_size != w or gh % merge_size or gw % merge_size:
        raise ValueError(f"image {h}x{w} is not a multiple of patch {patch_size} x merge {merge_size}")
    x = image_rgb.astype(np.float32) * np.float32(rescale)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    x = x.transpose(2, 0, 1)  # C, H, W
    # A still image is repeated along time to fill the temporal patch.
    x = np.broadcast_to(x[None], (temporal_patch_size, c, h, w))
    x = x.reshape(temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                  gw // merge_size, merge_size, patch_size)
    x = x.transpose(2, 5, 3, 6, 1, 0, 4, 7)
    return np.ascontiguousarray(x.reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size))
