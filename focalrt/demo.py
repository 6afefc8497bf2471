"""The built-in default: a real face photo shipped with the package, and a clip generated from it."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import cv2
import numpy as np

# NASA's portrait of astronaut Eileen Collins (public domain), as shipped by scikit-image.
PHOTO = "astronaut.jpg"


def demo_photo() -> np.ndarray:
    """The face photo as a BGR frame."""
    with resources.as_file(resources.files("focalrt.data") / PHOTO) as path:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"focalrt's demo photo {PHOTO} is missing from the package; reinstall focalrt")
    return image


def pan_zoom_transforms(image_shape: tuple[int, ...], frames: int = 24,
                        size: tuple[int, int] = (480, 360)) -> list[np.ndarray]:
    """2x3 affines (photo -> frame) that pan across the photo while zooming in."""
    h, w = image_shape[:2]
    out_w, out_h = size
    result = []
    for i in range(frames):
        t = i / max(1, frames - 1)
        zoom = 0.9 + 0.35 * t
        side_w = w / zoom
        side_h = side_w * out_h / out_w
        x0 = (w - side_w) * (0.2 + 0.6 * t)
        y0 = (h - side_h) * 0.3
        s = out_w / side_w
        result.append(np.float32([[s, 0, -x0 * s], [0, s, -y0 * s]]))
    return result


def pan_zoom_frames(image: np.ndarray, frames: int = 24, size: tuple[int, int] = (480, 360)) -> list[np.ndarray]:
    """The photo panned and zoomed: the face moves and grows across the frames, as in a real clip."""
    return [cv2.warpAffine(image, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            for m in pan_zoom_transforms(image.shape, frames, size)]


def write_clip(path: str | Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path} (no mp4v encoder in this build?)")
    try:
        for frame in frames:
            writer.write(frame)
    finally:
        writer.release()
    return path
