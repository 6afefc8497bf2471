"""Where events and frames go: a JSONL file, an annotated video, a live window or a Python callback."""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np

from focalrt.runtime.stream.annotate import annotate

FOURCC_BY_SUFFIX = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}
# MJPEG in AVI or Matroska stays playable up to the last whole frame when the writer is killed; an MP4
# written through OpenCV keeps its index (moov) at the end and cannot be opened at all after a SIGKILL.
KILL_SAFE_SUFFIXES = (".mkv", ".avi")
# Failed writes (full disk, I/O error) are errors. OpenCV 5's VideoWriter.write returns False for them (4.x
# returns None and reports nothing), and FFmpeg buffers 32 KiB, so a failure may also cost frames written just
# before it. Hence three checks: the return value of every write where there is one; with OpenCV 4, an MJPEG
# file must grow within every GROWTH_CHECK_FRAMES frames (an MJPEG frame is well over 650 bytes); and once
# closed, the file is demuxed (no decoding: ~20 us a frame) to count the frames it really holds, which is
# what the error then says was kept.
GROWTH_CHECK_FRAMES = 50


class WriteError(RuntimeError):
    """An output could not be written (full disk, I/O error); the message says what was kept."""
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
    mid-run leaves only whole lines behind. `stream` is an already open unbuffered writer (stdout, a FIFO,
    see focalrt.outputs.open_stream) used instead of opening `path`."""

    def __init__(self, path: str | os.PathLike, append: bool = False, fsync: bool = False,
                 stream: BinaryIO | None = None):
        self.path = Path(path) if str(path) != "-" else Path("<stdout>")
        self.fsync = fsync
        self.lines_written = 0
        if stream is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            stream = open(self.path, "ab" if append else "wb", buffering=0)  # noqa: SIM115
        self._file = stream
        self._regular = stat.S_ISREG(os.fstat(stream.fileno()).st_mode)  # only a regular file is cut back
        self.good_bytes = self._file.seek(0, os.SEEK_END) if self._regular else 0  # ends in a whole line

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
            if self._regular:
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
        ok = self._writer.write(annotate(frame_bgr, annotations))
        self.frames_written += 1
        if ok is False:  # OpenCV >= 5 says so; the frames FFmpeg still buffered are lost with it
            self._fail("the video writer reported a failed write")
        if self.codec == "MJPG" and self.frames_written - self._size_at_check[0] >= GROWTH_CHECK_FRAMES:
            self._check_growing()

    def _check_growing(self) -> None:
        """With OpenCV 4 the writer reports nothing: a regular file that stopped growing means writes fail."""
        size = self.path.stat().st_size if self.path.is_file() else None
        if size is not None and size <= self._size_at_check[1]:
            self._fail(f"it stopped growing at {size} bytes")
        self._size_at_check = (self.frames_written, size or 0)

    def _fail(self, what: str) -> None:
        self._writer.release()
        self._writer = None
        raise WriteError(f"writing video {self.path} failed: {what} (disk full or I/O error); it keeps "
                         f"{count_frames(self.path)} of the {self.frames_written} frames written")

    def close(self, check: bool = True) -> None:
        """Finalise the file; with check, count the frames it holds and raise WriteError if any is missing."""
        if self._writer is None:
            return
        self._writer.release()
        self._writer = None
        if check and self.frames_written and self.path.is_file():
            kept = count_frames(self.path)
            if kept < self.frames_written:
                raise WriteError(f"writing video {self.path} failed (disk full or I/O error): it keeps {kept} of the "
                                 f"{self.frames_written} frames written ({self.path.stat().st_size} bytes)")

    def __enter__(self) -> VideoSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(check=exc[0] is None)  # also on KeyboardInterrupt, so the mp4 gets its index


def count_frames(path: str | os.PathLike) -> int:
    """How many frames a video file really holds (a cut-off last one not counted): FFmpeg demuxes it without
    decoding (CAP_PROP_FORMAT -1, raw packets), so a long recording is counted in a second or so. Without
    FFmpeg, frames are decoded and counted."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not cap.isOpened() or not cap.set(cv2.CAP_PROP_FORMAT, -1):
        cap.release()
        cap = cv2.VideoCapture(str(path))
    count = 0
    while cap.isOpened() and cap.grab():
        count += 1
    cap.release()
    return count


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
