"""Where events and frames go: a JSONL file, an annotated video, a live window or a Python callback."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import unicodedata
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

FOURCC_BY_SUFFIX = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}
# MJPEG in AVI or Matroska stays playable up to the last whole frame when the writer is killed; an MP4
# written through OpenCV keeps its index (moov) at the end and cannot be opened at all after a SIGKILL.
KILL_SAFE_SUFFIXES = (".mkv", ".avi")
# cv2.VideoWriter.write reports no errors, so failed writes (full disk, I/O error) are seen from the file:
# an MJPEG file must grow within every GROWTH_CHECK_FRAMES frames (FFmpeg buffers 32 KiB; an MJPEG frame is well over
# 650 bytes), and once closed hold at least MIN_FRAME_BYTES per frame written.
GROWTH_CHECK_FRAMES = 50
MIN_FRAME_BYTES = 600


class WriteError(RuntimeError):
    """An output could not be written (full disk, I/O error); the message says what was kept."""
PALETTE = [(80, 200, 255), (120, 220, 80), (255, 160, 60), (200, 110, 255), (60, 120, 255),
           (255, 220, 90), (160, 160, 255), (90, 255, 200)]
FONT = cv2.FONT_HERSHEY_SIMPLEX
# Hershey fonts only draw ASCII and show anything else as '?'.
ASCII_FALLBACK = {"·": "-", "–": "-", "—": "-", "‘": "'", "’": "'", "“": '"', "”": '"', "…": "...",
                  "×": "x", "°": " deg"}


def json_default(value: Any) -> Any:
    """numpy scalars and arrays (boxes, scores) are written as plain JSON numbers and lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"event field of type {type(value).__name__} is not JSON serialisable; "
                    f"convert it to str, number, list or dict first")


class JsonlSink:
    """One JSON object per line. Each line goes to the OS in one unbuffered write, so a process killed
    mid-run leaves only whole lines behind."""

    def __init__(self, path: str | os.PathLike, append: bool = False, fsync: bool = False):
        self.path = Path(path)
        self.fsync = fsync
        self.lines_written = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab" if append else "wb", buffering=0)  # noqa: SIM115
        self.good_bytes = self._file.seek(0, os.SEEK_END) if self.path.is_file() else 0  # ends in a whole line

    def write(self, event: dict[str, Any]) -> None:
        if self._file.closed:
            raise ValueError(f"JsonlSink for {self.path} is closed")
        line = json.dumps(event, ensure_ascii=False, default=json_default) + "\n"
        data = memoryview(line.encode("utf-8"))
        try:
            while data:  # one call per line; a raw write may still be short (full disk, signal)
                written = self._file.write(data)
                data = data[written:]
            if self.fsync:
                os.fsync(self._file.fileno())
        except OSError as e:
            self._drop_partial_line()
            raise WriteError(f"writing {self.path} failed ({e.strerror or e}); it keeps the {self.lines_written} "
                             f"whole lines ({self.good_bytes} bytes) written before") from None
        self.good_bytes += len(line.encode("utf-8"))
        self.lines_written += 1

    def _drop_partial_line(self) -> None:
        """Cut the file back to its last whole line (nothing to do for /dev/full and other devices)."""
        try:
            if self.path.is_file():
                os.ftruncate(self._file.fileno(), self.good_bytes)
        except OSError:
            pass

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CallbackSink:
    """Hands each event to a Python function, for embedding focalrt in another program."""

    def __init__(self, fn: Callable[[dict[str, Any]], Any]):
        if not callable(fn):
            raise TypeError(f"CallbackSink needs a callable, got {type(fn).__name__}")
        self.fn = fn

    def write(self, event: dict[str, Any]) -> None:
        self.fn(event)

    def close(self) -> None:
        pass

    def __enter__(self) -> CallbackSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VideoSink:
    """Annotated frames into a video file via cv2.VideoWriter."""

    def __init__(self, path: str | os.PathLike, fps: float, size: tuple[int, int]):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in FOURCC_BY_SUFFIX:
            raise ValueError(f"unsupported video extension {suffix or '(none)'!r} for {self.path}; "
                             f"use one of {', '.join(FOURCC_BY_SUFFIX)}")
        if not fps or fps <= 0:
            raise ValueError(f"video fps must be > 0, got {fps!r}")
        self.size = (int(size[0]), int(size[1]))
        if self.size[0] <= 0 or self.size[1] <= 0:
            raise ValueError(f"video size must be (width, height) > 0, got {size!r}")
        self.codec = FOURCC_BY_SUFFIX[suffix]
        self.frames_written = 0
        self._size_at_check = (0, 0)  # (frames_written, file bytes) at the last growth check
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*self.codec), float(fps),
                                       self.size)
        if not self._writer.isOpened():
            raise RuntimeError(f"could not open video writer for {self.path} with codec {self.codec} at "
                               f"{self.size[0]}x{self.size[1]}; this OpenCV build may lack the encoder. "
                               f"Try a .avi path (MJPG) or check the directory is writable")

    def write(self, frame_bgr: np.ndarray, annotations: Sequence[dict[str, Any]] = ()) -> None:
        if self._writer is None:
            raise ValueError(f"VideoSink for {self.path} is closed")
        height, width = frame_bgr.shape[:2]
        if (width, height) != self.size:  # VideoWriter would silently drop the frame
            raise ValueError(f"frame is {width}x{height} but {self.path} was opened for "
                             f"{self.size[0]}x{self.size[1]}; open the VideoSink with the source size")
        self._writer.write(annotate(frame_bgr, annotations))
        self.frames_written += 1
        if self.codec == "MJPG" and self.frames_written - self._size_at_check[0] >= GROWTH_CHECK_FRAMES:
            self._check_growing()

    def _check_growing(self) -> None:
        """cv2.VideoWriter.write reports no errors: a regular file that stopped growing means they happen."""
        size = self.path.stat().st_size if self.path.is_file() else None
        if size is not None and size <= self._size_at_check[1]:
            kept = self._size_at_check[0]
            self.close(check=False)
            raise WriteError(f"writing video {self.path} failed: it stopped growing at {size} bytes (disk full or "
                             f"I/O error); about {kept} of {self.frames_written} frames were written")
        self._size_at_check = (self.frames_written, size or 0)

    def close(self, check: bool = True) -> None:
        """Finalise the file; with check, read its header back and raise WriteError if it is not playable."""
        if self._writer is None:
            return
        self._writer.release()
        self._writer = None
        if check and self.frames_written and self.path.is_file():
            cap = cv2.VideoCapture(str(self.path))
            opened = cap.isOpened()
            count = cap.get(cv2.CAP_PROP_FRAME_COUNT) if opened else 0
            cap.release()
            too_small = self.codec == "MJPG" and self.path.stat().st_size < self.frames_written * MIN_FRAME_BYTES
            if too_small or not opened or 0 <= count < self.frames_written * 0.99 - 1:
                raise WriteError(f"video {self.path} is not playable after writing {self.frames_written} frames "
                                 f"(disk full or I/O error; it holds {self.path.stat().st_size} bytes)")

    def __enter__(self) -> VideoSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(check=exc[0] is None)  # also on KeyboardInterrupt, so the mp4 gets its index


def gui_problems() -> list[str]:
    """Why cv2.imshow would not work here; empty when it should."""
    problems = []
    has_display = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if sys.platform.startswith("linux") and not has_display:
        problems.append("DISPLAY and WAYLAND_DISPLAY are unset")
    framework = cv2.currentUIFramework() if hasattr(cv2, "currentUIFramework") else None
    gui_line = next((line for line in cv2.getBuildInformation().splitlines()
                     if line.strip().startswith("GUI:")), "")
    if framework == "" or "NONE" in gui_line:
        problems.append(f"OpenCV {cv2.__version__} was built without GUI support (GUI: NONE)")
    return problems


class ShowSink:
    """A live window; write() returns False once the user presses q or Esc or closes the window."""

    def __init__(self, window_name: str = "focalrt"):
        problems = gui_problems()
        if problems:
            raise RuntimeError("--show needs a display and an OpenCV build with GUI support (opencv-python, "
                               "not -headless); none found: " + "; ".join(problems))
        self.window_name = window_name
        cv2.namedWindow(window_name, cv2.WINDOW_NORMAL)

    def write(self, frame_bgr: np.ndarray, annotations: Sequence[dict[str, Any]] = ()) -> bool:
        cv2.imshow(self.window_name, annotate(frame_bgr, annotations))
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), 27):
            return False
        return cv2.getWindowProperty(self.window_name, cv2.WND_PROP_VISIBLE) >= 1

    def close(self) -> None:
        cv2.destroyWindow(self.window_name)

    def __enter__(self) -> ShowSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the one annotation builder: what a frame's events draw (overlay, side panel, MCAP image) -----------

def description_annotation(event: dict[str, Any]) -> dict[str, Any]:
    """A region's box, "face N - region" above it, its description below it (or in the side panel)."""
    return {"box": event["box"], "label": f"face {event['face_id']} - {event['region']}", "text": event["text"],
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
