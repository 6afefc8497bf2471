"""Ground truth for the face tests: where the astronaut's face is, and box overlap."""

from __future__ import annotations

# Hand-checked on a 3x enlargement with a 10 px grid: hairline (y 73) to chin (y 178), skin edge of the
# left cheek in the image (x 180) to the right one (x 275), ears and hair excluded.
ASTRONAUT_FACE = (180.0, 73.0, 275.0, 178.0)


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
