"""Named face regions from the 468 FaceMesh landmarks, and checked pixel boxes.

Left and right are the subject's own: `left_eye` is the person's left eye, which for someone facing the
camera is on the right of the image (larger x). MediaPipe's FaceMesh names its LEFT_EYE contour (263,
362, ...) the same way, so its indices are used as they are.

A region's box is the bounding box of its landmarks, padded on every side by `padding` times the
inter-ocular distance (between the two eye-contour centres). Tying the margin to the eyes rather than to
the region's own size keeps thin regions (brows) from getting a sliver of margin and large ones (jaw)
from getting a huge one, and it scales with the face.

Boxes are (x1, y1, x2, y2) integer pixels, half-open: the region is frame[y1:y2, x1:x2].
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import numpy as np

from focalrt.runtime.faces.crops import clip_box

# FaceMesh topology (MediaPipe face_mesh connections), as index sets.
LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
LEFT_BROW = (300, 293, 334, 296, 336, 276, 283, 282, 295, 285)   # upper row, then lower row
RIGHT_BROW = (70, 63, 105, 66, 107, 46, 53, 52, 65, 55)
GLABELLA = (9, 8, 168, 193, 417)  # between the brows, down to the nasal root
LIPS_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146)
LIPS_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95)
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
             152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
FOREHEAD = (10, 338, 297, 332, 284, 109, 67, 103, 54, 151, 108, 69, 104, 68, 337, 299, 333, 298, 9,
            70, 63, 105, 66, 107, 336, 296, 334, 293, 300)
NOSE = (168, 6, 197, 195, 5, 4, 1, 19, 94, 2, 98, 97, 326, 327, 129, 358, 64, 294, 48, 278, 49, 279,
        219, 439, 102, 331, 115, 344, 220, 440, 45, 275, 122, 351, 188, 412, 114, 343, 217, 437, 198, 420,
        209, 429, 174, 399)
RIGHT_CHEEK = (116, 117, 118, 119, 100, 101, 50, 36, 205, 206, 203, 207, 187, 147, 123, 213, 192, 214,
               216, 212)
LEFT_CHEEK = (345, 346, 347, 348, 329, 330, 280, 266, 425, 426, 423, 427, 411, 376, 352, 433, 416, 434,
              436, 432)
CHIN = (18, 200, 199, 175, 152, 148, 377, 176, 400, 171, 396, 140, 369, 32, 262, 208, 428, 201, 421,
        83, 313, 182, 406, 194, 418)
JAW = (234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361, 323,
       454)

EYE_AUS = ("AU5", "AU6", "AU7", "AU43", "AU45")
BROW_AUS = ("AU1", "AU2", "AU4")
MOUTH_AUS = ("AU10", "AU12", "AU14", "AU15", "AU17", "AU20", "AU23", "AU24", "AU25", "AU26", "AU27", "AU28")


@dataclass(frozen=True)
class Region:
    indices: tuple[int, ...]       # FaceMesh landmark indices whose bounding box is the region
    action_units: tuple[str, ...]  # FACS action units visible in the region
    description: str
    padding: float                 # margin on each side, in inter-ocular distances


def _union(*groups: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(i for g in groups for i in g))


_ALL_AUS = tuple(sorted(set(EYE_AUS + BROW_AUS + MOUTH_AUS + ("AU9", "AU11")), key=lambda a: int(a[2:])))

REGIONS: dict[str, Region] = {
    "left_eye": Region(LEFT_EYE, EYE_AUS, "the subject's left eye with its lids and outer corner", 0.25),
    "right_eye": Region(RIGHT_EYE, EYE_AUS, "the subject's right eye with its lids and outer corner", 0.25),
    "eyes": Region(_union(RIGHT_EYE, LEFT_EYE), EYE_AUS, "both eyes", 0.25),
    "left_brow": Region(LEFT_BROW, BROW_AUS, "the subject's left eyebrow", 0.2),
    "right_brow": Region(RIGHT_BROW, BROW_AUS, "the subject's right eyebrow", 0.2),
    "brows": Region(_union(RIGHT_BROW, LEFT_BROW, GLABELLA), BROW_AUS,
                    "both eyebrows and the glabella between them (AU4 furrows)", 0.2),
    "forehead": Region(FOREHEAD, ("AU1", "AU2"), "the forehead above the brows (AU1/AU2 wrinkles)", 0.1),
    "nose": Region(NOSE, ("AU9",), "the nose from its root to the nostrils (AU9 wrinkles)", 0.15),
    "left_cheek": Region(LEFT_CHEEK, ("AU6", "AU9", "AU11"), "the subject's left cheek", 0.1),
    "right_cheek": Region(RIGHT_CHEEK, ("AU6", "AU9", "AU11"), "the subject's right cheek", 0.1),
    "mouth": Region(_union(LIPS_OUTER, LIPS_INNER), MOUTH_AUS, "the lips and mouth corners", 0.2),
    "chin": Region(CHIN, ("AU17",), "the chin below the lower lip (mentalis, AU17)", 0.1),
    "jaw": Region(JAW, ("AU26", "AU27"), "the lower face outline from ear to ear (jaw drop)", 0.1),
    "face": Region(tuple(range(468)), _ALL_AUS, "the whole face", 0.1),
}


def parse_regions(spec: str) -> list[str]:
    """'mouth, left_eye' -> ['mouth', 'left_eye']; order kept, duplicates dropped."""
    names = [n.strip().lower() for n in str(spec).split(",") if n.strip()]
    if not names:
        raise ValueError(f"no region named in {spec!r}; give a comma-separated list of: {', '.join(REGIONS)}")
    for name in names:
        if name not in REGIONS:
            close = difflib.get_close_matches(name, list(REGIONS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown region {name!r}{hint}; valid: {', '.join(REGIONS)}")
    return list(dict.fromkeys(names))


def inter_ocular(landmarks: np.ndarray) -> float:
    """Distance between the centres of the two eye contours, in the landmarks' units."""
    lm = np.asarray(landmarks)[:, :2]
    return float(np.linalg.norm(lm[list(LEFT_EYE)].mean(0) - lm[list(RIGHT_EYE)].mean(0)))


def region_box(name: str, landmarks: np.ndarray, frame_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """Padded bounding box of region `name` for one face's [468, 2|3] landmarks, clipped to the frame."""
    if name not in REGIONS:
        parse_regions(name)  # raises with the list of valid names
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim != 2 or lm.shape[0] != 468 or lm.shape[1] < 2:
        raise ValueError(f"landmarks must be [468, 2] or [468, 3] FaceMesh points, got shape {lm.shape}")
    region = REGIONS[name]
    pts = lm[list(region.indices), :2]
    pad = region.padding * inter_ocular(lm)
    lo, hi = pts.min(0) - pad, pts.max(0) + pad
    height, width = frame_shape[:2]
    return clip_box((lo[0], lo[1], hi[0], hi[1]), width, height)[0]


def parse_box(text: str) -> tuple[int, int, int, int]:
    """'x1,y1,x2,y2' in pixels -> ints (fractions are rounded). Clip it to a frame with clip_box."""
    example = "e.g. '120,80,260,200' (top-left x,y then bottom-right x,y, in pixels)"
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4 or not all(parts):
        raise ValueError(f"box {text!r} must be four comma-separated numbers x1,y1,x2,y2, {example}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"box {text!r} has a part that is not a number; {example}") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"box {text!r} has a non-finite coordinate; {example}")
    x1, y1, x2, y2 = (round(v) for v in values)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box {text!r} is empty or inverted: need x2 > x1 and y2 > y1; {example}")
    return x1, y1, x2, y2
