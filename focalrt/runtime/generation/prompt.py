"""Prompt rendering from the manifest's profile, and box coordinates in the model image's pixels."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from tokenizers import Tokenizer

from focalrt.runtime.faces import regions

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Prompt:
    token_ids: np.ndarray  # [S] int64, image pad tokens expanded
    text: str
    prefix_len: int  # tokens up to and including the image: shared by every region of one image


def fit_box(box: Box, width: int, height: int) -> Box:
    """`regions.clip_box`, warning when the box had to be clipped: for boxes a user gave."""
    clipped, was_clipped = regions.clip_box(box, width, height)
    if was_clipped:
        warnings.warn(f"box {tuple(box)} extends outside the {width}x{height} image; clipped to {clipped}",
                      stacklevel=3)
    return clipped


def box_to_model(box: Box, image_wh: tuple[int, int], model_size: int) -> Box:
    """Frame pixels -> pixels of the size x size image the encoder sees (Qwen2.5-VL grounds absolutely)."""
    w, h = image_wh
    sx, sy = model_size / w, model_size / h
    x1, y1, x2, y2 = box
    return (int(round(x1 * sx)), int(round(y1 * sy)), int(round(x2 * sx)), int(round(y2 * sy)))


def render(profile: dict[str, Any], image_tokens: int, instruction: str | None,
           model_box: Box | None, frames: int = 1, frame_separator: str = " ") -> tuple[str, str]:
    """The prompt text, split into the image prefix and the per-region suffix. A video window has `frames`
    placeholders of `image_tokens` each, joined by `frame_separator` (Face-LLaVA's "<image> <image> ...").

    A text-only profile (no {image} in its template) splits before the instruction instead, so the
    system turn is the prefix that requests share.
    """
    instruction = instruction or profile["default_instruction"]
    if "{image}" not in profile["template"]:
        head, tail = profile["template"].split("{instruction}", 1)
        system = profile.get("system", "")
        return (head.format(system=system, instruction=instruction),
                ("{instruction}" + tail).format(system=system, instruction=instruction))
    region = ""
    if model_box is not None:  # draw/crop profiles word the region without coordinates
        x1, y1, x2, y2 = model_box
        region = profile["region_template"].format(x1=x1, y1=y1, x2=x2, y2=y2)
    image = frame_separator.join([profile["image_token"] * image_tokens] * frames)
    text = profile["template"].format(system=profile.get("system", ""), image=image, region=region,
                                      instruction=instruction)
    cut = text.index(image) + len(image)
    return text[:cut], text[cut:]


def encode(tokenizer: Tokenizer, profile: dict[str, Any], image_tokens: int, instruction: str | None,
           model_box: Box | None, frames: int = 1, frame_separator: str = " ") -> Prompt:
    prefix, suffix = render(profile, image_tokens, instruction, model_box, frames, frame_separator)
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=False).ids
    suffix_ids = tokenizer.encode(suffix, add_special_tokens=False).ids
    ids = np.asarray(prefix_ids + suffix_ids, np.int64)
    # Never an empty shared prefix: the batched path prefills it on its own.
    return Prompt(ids, prefix + suffix, max(1, len(prefix_ids)))


def draw_box(image: np.ndarray, box: Box, color: tuple[int, int, int] = (0, 0, 255)) -> np.ndarray:
    """A copy of `image` with `box` outlined (red in BGR): the `draw` region mode."""
    out = image.copy()
    thickness = max(2, round(max(image.shape[:2]) / 200))
    cv2.rectangle(out, box[:2], box[2:], color, thickness)
    return out


def landmarks_in_view(landmarks68: np.ndarray, image_box: Box, view_box: Box) -> np.ndarray:
    """Landmark pixels of the frame -> pixels of a crop in which the frame's `image_box` is `view_box`."""
    points = np.asarray(landmarks68, np.float32).copy()
    ix1, iy1, ix2, iy2 = image_box
    vx1, vy1, vx2, vy2 = view_box
    sx = (vx2 - vx1) / max(ix2 - ix1, 1)
    sy = (vy2 - vy1) / max(iy2 - iy1, 1)
    if points.ndim == 2 and points.shape[1] >= 2:
        points[:, 0] = (points[:, 0] - ix1) * sx + vx1
        points[:, 1] = (points[:, 1] - iy1) * sy + vy1
    return points


def crop_face_square(image: np.ndarray, box: Box, out_size: int = 256) -> tuple[np.ndarray, Box]:
    """The `face_crop` region mode: Face-LLaVA's crop tool (tools/crop_face.py, no margin), and the box in
    crop pixels.

    Their crop starts at the box's top-left corner and spans (w + h) / 2 both ways, clipped to the frame
    (at width - 1 / height - 1, as theirs is), then is resized to 256 x 256 with OpenCV's default
    (bilinear). Landmarks normalised by the crop's size are the same before and after that resize. The box
    returned may reach past the crop (the square is shorter than a tall box): it also maps points into it."""
    x1, y1, x2, y2 = box
    h, w = image.shape[:2]
    side = ((x2 - x1) + (y2 - y1)) / 2
    sx, sy = int(max(0, x1)), int(max(0, y1))
    ex, ey = int(min(x1 + side, w - 1)), int(min(y1 + side, h - 1))
    if ex - sx < 2 or ey - sy < 2:
        raise ValueError(f"face box {box} leaves no crop inside the {w}x{h} frame")
    crop = cv2.resize(image[sy:ey, sx:ex], (out_size, out_size))
    fx, fy = out_size / (ex - sx), out_size / (ey - sy)
    return crop, (round((x1 - sx) * fx), round((y1 - sy) * fy), round((x2 - sx) * fx), round((y2 - sy) * fy))


def crop_with_context(image: np.ndarray, box: Box, context: float = 1.5) -> tuple[np.ndarray, Box]:
    """A square crop around `box`, `context` times its longer side, and the box in crop pixels.

    The crop may reach past the frame; that part is black, so the region keeps its place and aspect.
    """
    x1, y1, x2, y2 = box
    side = max(2, int(round(max(x2 - x1, y2 - y1) * context)))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    ox, oy = int(round(cx - side / 2)), int(round(cy - side / 2))
    m = np.float32([[1, 0, -ox], [0, 1, -oy]])
    crop = cv2.warpAffine(image, m, (side, side), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)
    return crop, (x1 - ox, y1 - oy, x2 - ox, y2 - oy)
