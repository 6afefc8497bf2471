"""What a frame is: an HxWx3 uint8 BGR array, checked once for every model, and how files become frames."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np


class FrameTypeError(TypeError, ValueError):
    """Not an array at all: a TypeError, and a ValueError so that callers handling bad input catch it too."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as HxWx3 uint8 BGR, with an error that names the file."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"image {p} is a directory, not an image file; pass one image file "
                         f"(for a folder of images use `focalrt run --source {p}`)")
    if not p.is_file():
        raise FileNotFoundError(f"image {p} does not exist")
    image = cv2.imread(str(p), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"image {p} could not be decoded by OpenCV; is it a JPEG/PNG/BMP/WebP image?")
    return image


def read_video_evenly(path: str | os.PathLike, count: int) -> tuple[list[np.ndarray], list[int]]:
    """`count` BGR frames spread evenly over a video file, and their indices: frame floor(i * (n - 1) /
    (count - 1)) for i = 0..count-1, as Face-LLaVA's loader picks a clip's frames (np.linspace(0, n - 1, count)).
    Two passes: count the frames (grab only), then decode just the chosen ones."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"video {p} does not exist")

    def capture() -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(p))
        if not cap.isOpened():
            raise ValueError(f"video {p} could not be opened by OpenCV; is it an MP4/MKV/AVI video?")
        return cap

    cap = capture()
    n = 0
    while cap.grab():
        n += 1
    cap.release()
    if n == 0:
        raise ValueError(f"video {p} has no readable frames")
    wanted = np.linspace(0, n - 1, count).astype(int).tolist()
    frames: dict[int, np.ndarray] = {}
    cap = capture()
    for i in range(wanted[-1] + 1):
        if not cap.grab():
            break
        if i in wanted:
            ok, frame = cap.retrieve()
            if ok and frame is not None:
                frames[i] = frame
    cap.release()
    missing = [i for i in wanted if i not in frames]
    if missing:
        raise ValueError(f"video {p}: frames {missing} of {n} could not be decoded; re-encode the clip")
    return [frames[i] for i in wanted], wanted


def check_frame(image: Any, name: str = "image") -> np.ndarray:
    """Reject what no model can use (not an array, not HxWx3 uint8 BGR, under 2x2 pixels), before any
    model runs, with a message that says what arrived and how to convert it."""
    if not isinstance(image, np.ndarray):
        raise FrameTypeError(f"{name} must be a numpy array (HxWx3 uint8 BGR) or a file path, "
                        f"got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name} has dtype {image.dtype}; expected uint8 BGR (0..255). "
                         f"Convert with (img * 255).clip(0, 255).astype(np.uint8) if it is 0..1 float")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} has shape {image.shape}; expected HxWx3 (BGR). "
                         f"Convert grey images with cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"{name} of shape {image.shape} is too small to describe")
    return image
