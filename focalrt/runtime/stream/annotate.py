"""What is drawn for a frame's events: each face's state and each region's description as boxes and labels,
over the frame (`annotate`: run's video, --show, MCAP) or beside it in a panel (`annotate_with_panel`: the demo).
"""

from __future__ import annotations

import textwrap
import unicodedata
import zlib
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

PALETTE = [(80, 200, 255), (120, 220, 80), (255, 160, 60), (200, 110, 255), (60, 120, 255),
           (255, 220, 90), (160, 160, 255), (90, 255, 200)]
FONT = cv2.FONT_HERSHEY_SIMPLEX
# Hershey fonts only draw ASCII and show anything else as '?'.
ASCII_FALLBACK = {"·": "-", "–": "-", "—": "-", "‘": "'", "’": "'", "“": '"', "”": '"', "…": "...",
                  "×": "x", "°": " deg"}


def description_annotation(event: dict[str, Any]) -> dict[str, Any]:
    """A region's box, "face N - region" above it, its description below it (or in the side panel). In real
    time a picture shows each region's latest description with its age (`age_s`): "face N - region (2.5 s ago)"."""
    age = f" ({event['age_s']:.1f} s ago)" if "age_s" in event else ""
    return {"box": event["box"], "label": f"face {event['face_id']} - {event['region']}{age}", "text": event["text"],
            "tag": event["region"]}


def state_annotation(event: dict[str, Any]) -> dict[str, Any]:
    """Emotion and age on the face box's label line (descriptions go below boxes), with the models' names."""
    parts = []
    if "emotion" in event:
        e = event["emotion"]
        parts.append(f"{e['label']} {e['probabilities'][e['label']]:.2f} (FER2013)")
    if "age" in event:
        parts.append(f"age ~{event['age']['expected']:.0f} (dlib-models)")
    # "face N - ..." as the description labels say, so both get the face's colour (color_for)
    return {"box": event["box"], "label": f"face {event['face_id']} - " + ", ".join(parts or ["state"]),
            "tag": f"face {event['face_id']}"}


def event_annotations(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """What one frame's events draw, in their order (a face's state first, then its regions). Every picture
    focalrt makes (`run --write-video/--show`, the MCAP/Foxglove image, the demo's side panel) comes from
    here; `annotate` and `annotate_with_panel` only differ in where they put it."""
    return [state_annotation(e) if e.get("type") == "state" else description_annotation(e) for e in events]


# Several regions share a small face: longer descriptions would hide the face (the JSONL has them whole).
MAX_TEXT_LINES = 3


def drawable(text: str) -> str:
    text = "".join(ASCII_FALLBACK.get(ch, ch) for ch in text)
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def color_for(annotation: dict[str, Any]) -> tuple[int, int, int]:
    """Stable colour per face: the same face id keeps its colour across frames."""
    key = annotation.get("face_id", annotation.get("label", ""))
    if isinstance(key, str):
        key = key.split("-")[0].split("·")[0].strip()
        return PALETTE[zlib.crc32(key.encode("utf-8")) % len(PALETTE)]
    return PALETTE[int(key) % len(PALETTE)]


def clamp_box(box: Any, width: int, height: int) -> tuple[int, int, int, int]:
    values = np.asarray(box, dtype=np.float64).reshape(-1)
    if values.size != 4 or not np.all(np.isfinite(values)):
        raise ValueError(f"annotation box must be 4 finite numbers (x1, y1, x2, y2), got {box!r}")
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"annotation box {box!r} is empty; expected x1 < x2 and y1 < y2")
    return (int(np.clip(round(x1), 0, width - 1)), int(np.clip(round(y1), 0, height - 1)),
            int(np.clip(round(x2), 0, width - 1)), int(np.clip(round(y2), 0, height - 1)))


def draw_text_block(image: np.ndarray, lines: list[str], x: int, y: int, scale: float, thickness: int,
                    color: tuple[int, int, int], background: tuple[int, int, int]) -> None:
    """Lines of text on a filled rectangle whose top-left corner is (x, y), kept inside the image."""
    if not lines:
        return
    height, width = image.shape[:2]
    sizes = [cv2.getTextSize(line, FONT, scale, thickness) for line in lines]
    text_h = max(size[0][1] for size in sizes)
    descent = max(size[1] for size in sizes)
    line_h = text_h + descent + 2
    block_w = max(size[0][0] for size in sizes) + 6
    block_h = line_h * len(lines) + 2
    x = int(np.clip(x, 0, max(0, width - block_w)))
    y = int(np.clip(y, 0, max(0, height - block_h)))
    cv2.rectangle(image, (x, y), (x + block_w, y + block_h), background, cv2.FILLED)
    for i, line in enumerate(lines):
        baseline_y = y + 2 + i * line_h + text_h
        cv2.putText(image, line, (x + 3, baseline_y), FONT, scale, color, thickness, cv2.LINE_AA)


def annotate(frame: np.ndarray, annotations: Sequence[dict[str, Any]]) -> np.ndarray:
    """A copy of the frame with each box, its label above and its description wrapped below."""
    image = frame.copy()
    height, width = image.shape[:2]
    scale = float(np.clip(height / 900.0, 0.35, 1.0))
    thickness = 1 if scale < 0.7 else 2
    char_w = cv2.getTextSize("abcdefghijklmnopqrstuvwxyz", FONT, scale, thickness)[0][0] / 26.0
    for annotation in annotations:
        if "box" not in annotation:
            raise ValueError(f"annotation needs a 'box' (x1, y1, x2, y2); got keys {sorted(annotation)}")
        x1, y1, x2, y2 = clamp_box(annotation["box"], width, height)
        color = color_for(annotation)
        cv2.rectangle(image, (x1, y1), (x2, y2), color, max(1, thickness))
        label = drawable(str(annotation.get("label", "")))
        if label:
            (_, label_h), descent = cv2.getTextSize(label, FONT, scale, thickness)
            label_h += descent + 4
            draw_text_block(image, [label], x1, y1 - label_h, scale, thickness, (0, 0, 0), color)
        text = drawable(str(annotation.get("text", "")))
        if text:
            wrap_px = min(width - 8, max(x2 - x1, width // 3))
            lines = textwrap.wrap(text, width=max(8, int(wrap_px / char_w)), max_lines=MAX_TEXT_LINES,
                                  placeholder=" ...")
            draw_text_block(image, lines, x1, y2 + 2, scale, thickness, (255, 255, 255), (20, 20, 20))
    return image


# ---- a frame with a side panel: the face stays unobstructed, the descriptions sit beside it -------------

REGION_COLORS = [(60, 200, 255), (255, 170, 40), (90, 230, 90), (230, 90, 230), (80, 80, 255), (255, 255, 80),
                 (180, 140, 255), (40, 160, 120)]  # BGR; distinct hues, each readable on black


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_label(size: tuple[int, int], box: tuple[int, int, int, int], taken: list[tuple[int, int, int, int]],
                shape: tuple[int, int], keep_clear: tuple[int, int, int, int] | None = None
                ) -> tuple[int, int, int, int]:
    """Where a label of `size` (w, h) goes for `box`: the first spot inside the frame that covers no label or
    box in `taken` (nor `keep_clear`, e.g. the union of all boxes: the face): beside the box first, then in
    the margins left and right of `keep_clear`, stepping down. Else the least crowded spot. Returns its
    rectangle."""
    w, h = size
    height, width = shape
    x1, y1, x2, y2 = box
    above = [(x1, y1 - h - 1), (x2 - w, y1 - h - 1)]
    beside = [(x2 + 2, y1), (x1 - w - 2, y1), (x1, y2 + 2), (x2 - w, y2 + 2), (x2 + 2, y2 - h), (x1 - w - 2, y2 - h)]
    margins = []
    if keep_clear is not None:  # outside every box, level with this one first, then stepping away
        for dy in range(0, height, h + 2):
            for y in (y1 + dy, y1 - dy - h - 2):
                margins += [(keep_clear[2] + 6, y), (keep_clear[0] - w - 6, y)]
    candidates = above + margins + beside
    blockers = taken + ([keep_clear] if keep_clear is not None else [])
    best, best_hits = None, None
    for x, y in candidates:
        if x < 0 or y < 0 or x + w > width or y + h > height:
            continue
        rect = (x, y, x + w, y + h)
        hits = sum(_overlaps(rect, other) for other in blockers) + _overlaps(rect, box)
        if hits == 0:
            return rect
        if best_hits is None or hits < best_hits:
            best, best_hits = rect, hits
    if best is None:  # the label is larger than the frame allows anywhere: pin it to the top-left corner
        best = (0, 0, min(w, width), min(h, height))
    return best


def layout_labels(boxes: list[tuple[int, int, int, int]], sizes: list[tuple[int, int] | None],
                  shape: tuple[int, int]) -> list[tuple[int, int, int, int] | None]:
    """A rectangle per label (None where there is no label): beside its box, over no other box or label,
    and out of the area all boxes span (the face) when there are several boxes."""
    union = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
             max(b[3] for b in boxes)) if boxes else None
    taken = list(boxes)
    rects: list[tuple[int, int, int, int] | None] = []
    for box, size in zip(boxes, sizes, strict=True):
        if size is None:
            rects.append(None)
            continue
        rect = place_label(size, box, taken[:], shape, keep_clear=union if len(boxes) > 1 else None)
        taken.append(rect)
        rects.append(rect)
    return rects


def annotate_with_panel(frame: np.ndarray, annotations: Sequence[dict[str, Any]],
                        panel_width: int | None = None, title: str = "") -> np.ndarray:
    """The frame with each region's box and a short label beside the box (never over another box or label),
    and a panel on the right with each label as a heading in the box's colour and its text below. The face
    is not covered by text. The short label beside the box is the annotation's `tag` if it has one (the
    heading is then the whole `label`, e.g. a face's emotion and age). The result is `panel_width` pixels
    wider than the frame (default: 2/3 of the frame width)."""
    image = frame.copy()
    height, width = image.shape[:2]
    panel_width = panel_width or max(240, (2 * width) // 3)
    scale = float(np.clip(height / 800.0, 0.4, 0.8))
    thickness = 1
    entries = []
    for i, annotation in enumerate(annotations):
        if "box" not in annotation:
            raise ValueError(f"annotation needs a 'box' (x1, y1, x2, y2); got keys {sorted(annotation)}")
        label = drawable(str(annotation.get("label", "")))
        text = drawable(str(annotation["text"])) if "text" in annotation else None  # None: a heading alone
        entries.append((clamp_box(annotation["box"], width, height), REGION_COLORS[i % len(REGION_COLORS)],
                        drawable(str(annotation.get("tag") or label)), label, text))
    for box, color, *_ in entries:
        cv2.rectangle(image, box[:2], box[2:], color, 2 if height >= 300 else 1)
    sizes = []
    for _, _, label, _, _ in entries:
        (tw, th), descent = cv2.getTextSize(label, FONT, scale, thickness)
        sizes.append((tw + 6, th + descent + 4) if label else None)
    rects = layout_labels([box for box, *_ in entries], sizes, (height, width))
    for (box, color, label, _, _), rect in zip(entries, rects, strict=True):
        if rect is None:
            continue
        if not _overlaps(rect, (box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3)):  # away from its box: a leader
            cx, cy = (rect[0] + rect[2]) // 2, (rect[1] + rect[3]) // 2
            tx, ty = int(np.clip(cx, box[0], box[2])), int(np.clip(cy, box[1], box[3]))
            ax = rect[0] if tx < rect[0] else rect[2] if tx > rect[2] else cx
            ay = rect[1] if ty < rect[1] else rect[3] if ty > rect[3] else cy
            cv2.line(image, (ax, ay), (tx, ty), color, 1, cv2.LINE_AA)
        cv2.rectangle(image, rect[:2], rect[2:], color, cv2.FILLED)
        th = cv2.getTextSize(label, FONT, scale, thickness)[0][1]
        cv2.putText(image, label, (rect[0] + 3, rect[1] + 2 + th), FONT, scale, (0, 0, 0), thickness, cv2.LINE_AA)

    panel = np.full((height, panel_width, 3), 24, np.uint8)
    (_, line_h), descent = cv2.getTextSize("Ag", FONT, scale, thickness)
    line_h += descent + 4
    char_w = cv2.getTextSize("abcdefghijklmnopqrstuvwxyz", FONT, scale, thickness)[0][0] / 26.0
    chars = max(8, int((panel_width - 16) / char_w))
    y = 6
    for line in textwrap.wrap(drawable(title), chars):
        cv2.putText(panel, line, (8, y + line_h - descent - 2), FONT, scale, (200, 200, 200), thickness,
                    cv2.LINE_AA)
        y += line_h
    if title:
        y += line_h // 2
    # Every region gets its heading and an equal share of the lines left (the JSONL has the whole text).
    lines_each = max(1, (height - y) // line_h // max(1, len(entries)) - 2)
    for _box, color, _tag, heading, text in entries:
        if y + line_h > height:
            break
        cv2.rectangle(panel, (8, y + 3), (8 + line_h - 6, y + line_h - 3), color, cv2.FILLED)
        for line in textwrap.wrap(heading or "region", max(8, chars - 3), max_lines=2, placeholder=" ..."):
            if y + line_h > height:
                break
            cv2.putText(panel, line, (8 + line_h, y + line_h - descent - 2), FONT, scale, color, thickness,
                        cv2.LINE_AA)
            y += line_h
        wrapped = [] if text is None else textwrap.wrap(" ".join(text.split()), chars - 2, max_lines=lines_each,
                                                        placeholder=" ...") or ["(no text)"]
        for line in wrapped:
            if y + line_h > height:
                break
            cv2.putText(panel, line, (16, y + line_h - descent - 2), FONT, scale, (235, 235, 235), thickness,
                        cv2.LINE_AA)
            y += line_h
        y += line_h // 2
    return np.concatenate([image, panel], axis=1)
