"""Every face crop, box and landmark mapping, in one place: what the encoder sees of a face or a region.

Three callers need the same geometry and once had their own copies: the frame runner (`focalrt run`), the
Triton `describe` model (`focalrt serve`) and the region benchmark. The rules, each written once here:
- a box is rounded outward to whole pixels and clipped to its image (`clip_box`); a box a user gave warns
  when clipped (`fit_box`), one the runtime derived is clipped quietly;
- the run's face crop is a square `FACE_CONTEXT` times the detector box's longer side, centred on it, at
  the encoder's size, black where it leaves the frame (`face_crop`); region boxes and landmarks follow it
  through one affine (`crop_face`);
- the profile's `region_mode` decides how a region is shown to the model (`region_view`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

Box = tuple[int, int, int, int]

FACE_CONTEXT = 1.6  # crop side as a multiple of the detector box: keeps brows, chin and jaw inside


def clip_box(box: Any, width: int, height: int) -> tuple[Box, bool]:
    """Round outward to integer pixels, clip to the image; return the box and whether clipping cut it.

    Raises ValueError for an inverted or empty box, and for one that lies wholly outside the image.
    """
    if len(box) != 4:
        raise ValueError(f"box must have 4 numbers x1,y1,x2,y2, got {len(box)}: {tuple(box)}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box {tuple(box)} has a non-finite coordinate")
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box {tuple(box)} is empty or inverted: need x2 > x1 and y2 > y1 (x1,y1 is the "
                         f"top-left corner, x2,y2 the bottom-right)")
    if width <= 0 or height <= 0:
        raise ValueError(f"frame size {width}x{height} is empty")
    ix1, iy1, ix2, iy2 = math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)
    clipped = (min(max(ix1, 0), width), min(max(iy1, 0), height),
               min(max(ix2, 0), width), min(max(iy2, 0), height))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise ValueError(f"box {tuple(box)} has zero area inside the {width}x{height} frame; it lies "
                         f"outside the image (valid x 0..{width}, y 0..{height})")
    return clipped, clipped != (ix1, iy1, ix2, iy2)


def fit_box(box: Box, width: int, height: int) -> Box:
    """`clip_box`, warning when the box had to be clipped: for boxes a user gave."""
    clipped, was_clipped = clip_box(box, width, height)
    if was_clipped:
        warnings.warn(f"box {tuple(box)} extends outside the {width}x{height} image; clipped to {clipped}",
                      stacklevel=3)
    return clipped


def box_to_model(box: Box, image_wh: tuple[int, int], model_size: int) -> Box:
    """Image pixels -> pixels of the size x size image the encoder sees (Qwen2.5-VL grounds absolutely)."""
    w, h = image_wh
    sx, sy = model_size / w, model_size / h
    x1, y1, x2, y2 = box
    return (int(round(x1 * sx)), int(round(y1 * sy)), int(round(x2 * sx)), int(round(y2 * sy)))


def face_crop_transform(face_box: Any, size: int, context: float = FACE_CONTEXT) -> np.ndarray:
    """2x3 affine taking frame pixels to a size x size crop centred on the face."""
    x1, y1, x2, y2 = (float(v) for v in face_box)
    side = max(x2 - x1, y2 - y1) * context
    scale = size / side
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return np.array([[scale, 0, size / 2 - scale * cx], [0, scale, size / 2 - scale * cy]], np.float64)


def map_box(box: Sequence[float], m: np.ndarray) -> tuple[float, float, float, float]:
    """Apply an axis-aligned (scale + shift) affine to a box."""
    x1, y1, x2, y2 = box
    return (m[0, 0] * x1 + m[0, 2], m[1, 1] * y1 + m[1, 2], m[0, 0] * x2 + m[0, 2], m[1, 1] * y2 + m[1, 2])


def map_points(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine to [N, 2+] points (extra columns, such as FaceMesh depth, are dropped)."""
    return points[:, :2] @ m[:, :2].T + m[:, 2]


def face_crop(image: np.ndarray, face_box: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The size x size crop the encoder sees of one face, and the frame -> crop affine."""
    m = face_crop_transform(face_box, size)
    crop = cv2.warpAffine(image, m[:2].astype(np.float32), (size, size), flags=cv2.INTER_AREA,
                          borderMode=cv2.BORDER_CONSTANT)
    return crop, m


@dataclass(frozen=True)
class FaceCrop:
    """One face as the encoder sees it: the crop, the frame -> crop affine, and what was mapped into it."""

    image: np.ndarray  # size x size BGR
    transform: np.ndarray  # 2x3, frame pixels -> crop pixels
    boxes: list[Box]  # the region boxes in crop pixels, clipped to the crop
    landmarks68: np.ndarray | None  # [68, 2] in crop pixels, when given


def crop_face(image: np.ndarray, face_box: Any, size: int, frame_boxes: Sequence[Sequence[float]] = (),
              landmarks68: np.ndarray | None = None) -> FaceCrop:
    """The run's face crop with each region box (frame pixels) and the landmarks mapped into it."""
    crop, m = face_crop(image, face_box, size)
    boxes = [clip_box(tuple(round(v) for v in map_box(box, m)), size, size)[0] for box in frame_boxes]
    points = map_points(np.asarray(landmarks68, np.float64), m) if landmarks68 is not None else None
    return FaceCrop(crop, m, boxes, points)


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


def draw_box(image: np.ndarray, box: Box, color: tuple[int, int, int] = (0, 0, 255)) -> np.ndarray:
    """A copy of `image` with `box` outlined (red in BGR): the `draw` region mode."""
    out = image.copy()
    thickness = max(2, round(max(image.shape[:2]) / 200))
    cv2.rectangle(out, box[:2], box[2:], color, thickness)
    return out


def region_view(image: np.ndarray, box: Box | None, mode: str) -> tuple[np.ndarray, Box | None, Box | None]:
    """(image the encoder sees, the region's box in its pixels, the box in `image` pixels), by region mode.

    `text` shows the whole image (the box goes into the prompt); `draw` outlines the box on a copy; `crop`
    cuts the box out with context around it; `face_crop` is Face-LLaVA's square crop tool. No box: the
    whole image, no region.
    """
    if box is None:
        return image, None, None
    h, w = image.shape[:2]
    box = fit_box(tuple(box), w, h)
    if mode == "text":
        return image, box, box
    if mode == "draw":
        return draw_box(image, box), box, box
    if mode == "face_crop":
        crop, crop_box = crop_face_square(image, box)
        return crop, crop_box, box
    crop, crop_box = crop_with_context(image, box)
    return crop, crop_box, box
