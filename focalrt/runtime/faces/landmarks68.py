"""The 68-point iBUG/dlib layout taken from the 468 FaceMesh points (one FaceMesh index per point).

Face-LLaVA's landmark pathway was trained on 68-point landmarks in the iBUG order, so its region
projections expect exactly that order. The iBUG layout names sides as the image shows them for a face
looking at the camera: point 0 and points 17-21, 36-41, 48 are on the image's left, which is the
subject's RIGHT side; FaceMesh indices are subject-side, hence the right-side FaceMesh points below go to
the image-left iBUG points.

Correspondence (chosen for position along each contour, left-right symmetric in FaceMesh):
- 0-16 jaw: face-oval points from the subject's right temple at eye level (127) down to the chin
  (152 = point 8) and up to the left temple (356).
- 17-21 right brow, outer to inner, and 22-26 left brow, inner to outer: FaceMesh's upper brow rows.
- 27-30 nose bridge from the nasal root to the tip (168, 197, 5, 4); 31-35 nostril base, right to left,
  through the subnasale (2).
- 36-41 right eye: outer corner 33, upper lid 160 158, inner corner 133, lower lid 153 144.
- 42-47 left eye: inner corner 362, upper lid 385 387, outer corner 263, lower lid 373 380.
- 48-59 outer lips from the right corner (61) over the upper lip (cupid's bow 37, 0, 267) to the left
  corner (291) and back along the lower lip; 60-67 inner lips from 78 to 308 and back.
"""

from __future__ import annotations

import numpy as np

JAW = (127, 234, 93, 132, 58, 136, 150, 176, 152, 400, 379, 365, 288, 361, 323, 454, 356)
RIGHT_BROW = (70, 63, 105, 66, 107)
LEFT_BROW = (336, 296, 334, 293, 300)
NOSE_BRIDGE = (168, 197, 5, 4)
NOSE_BASE = (98, 97, 2, 326, 327)
RIGHT_EYE = (33, 160, 158, 133, 153, 144)
LEFT_EYE = (362, 385, 387, 263, 373, 380)
OUTER_LIPS = (61, 40, 37, 0, 267, 270, 291, 321, 405, 17, 181, 91)
INNER_LIPS = (78, 81, 13, 311, 308, 402, 14, 178)

FACEMESH_TO_68 = np.array(JAW + RIGHT_BROW + LEFT_BROW + NOSE_BRIDGE + NOSE_BASE + RIGHT_EYE + LEFT_EYE
                          + OUTER_LIPS + INNER_LIPS, dtype=np.int64)

# iBUG index ranges, for code that splits the 68 points into parts.
PARTS68 = {"jaw": range(0, 17), "right_brow": range(17, 22), "left_brow": range(22, 27),
           "nose": range(27, 36), "right_eye": range(36, 42), "left_eye": range(42, 48),
           "mouth": range(48, 68)}


def to_68(landmarks468: np.ndarray) -> np.ndarray:
    """[468, 2|3] FaceMesh points -> [68, 2] x, y in the same units, iBUG order."""
    lm = np.asarray(landmarks468)
    if lm.ndim != 2 or lm.shape[0] != 468 or lm.shape[1] < 2:
        raise ValueError(f"to_68 needs [468, 2] or [468, 3] FaceMesh landmarks, got shape {lm.shape}")
    return lm[FACEMESH_TO_68, :2].copy()
