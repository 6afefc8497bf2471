"""Frame sources: image, image folder, video file, camera, RTSP/HTTP URL or GStreamer pipeline.

Live sources (cameras, URLs, pipelines) are read by a capture thread that keeps only the newest frame,
so a slow model always sees the present instead of a growing backlog. Files yield every frame (or every
N-th) because there nothing is lost by waiting.

URL sources open through OpenCV's FFmpeg backend with an open and a read timeout (a few seconds by default,
OpenCV's own is about 30 s): a server that accepts and then says nothing fails the open, and a stream that
stalls fails the read, which then follows the same reconnect rules as a camera that drops out.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jp2", ".pgm", ".ppm", ".pnm")
URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
MAX_BACKOFF_S = 30.0
DEFAULT_OPEN_TIMEOUT_S = 5.0  # a URL that accepts the connection but never answers
DEFAULT_READ_TIMEOUT_S = 5.0  # a stream that stops sending mid-way

# (target, api_preference[, params]) -> an object with isOpened/read/grab/get/release, like cv2.VideoCapture.
# `params` (OpenCV's open parameters, [property, value, ...]) is passed only when there are some (URL sources).
CaptureFactory = Callable[..., Any]


class SourceError(RuntimeError):
    """A source could not be opened or stopped delivering; the message says what was tried."""


@dataclass
class Frame:
    index: int  # frame number in the source (counts frames read, including skipped ones)
    timestamp: float  # seconds: media position for files, time.monotonic() for live sources
    image: np.ndarray  # HxWx3 uint8 BGR
    capture_ms: float  # time spent reading and decoding this frame
    captured: float = field(default_factory=time.monotonic)  # time.monotonic() when read (live: when delivered)
    source: int | None = None  # which of several sources (its place among them); None when there is one


def default_capture_factory(target: Any, api: int, params: list[int] | None = None) -> Any:
    return cv2.VideoCapture(target, api, params) if params else cv2.VideoCapture(target, api)


def stream_params(open_timeout_s: float, read_timeout_s: float) -> list[int]:
    """OpenCV open parameters bounding how long FFmpeg waits to open a URL and for each frame (ms)."""
    if open_timeout_s <= 0 or read_timeout_s <= 0:
        raise ValueError(f"open and read timeouts must be > 0 seconds, got {open_timeout_s} and {read_timeout_s}")
    if not hasattr(cv2, "CAP_PROP_OPEN_TIMEOUT_MSEC"):  # OpenCV before 4.5.2: FFmpeg's own ~30 s applies
        return []
    return [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(read_timeout_s * 1000)]


class FrameSource:
    """Iterator of Frames with the same stats, close() and context manager whatever the source kind."""

    def __init__(self, name: str, live: bool, frames: Iterator[Frame], release: Callable[[], None],
                 stats: dict[str, Any], fps: float | None = None, size: tuple[int, int] | None = None):
        self.name = name
        self.live = live
        self.fps = fps
        self.size = size  # (width, height) when known
        self._frames = frames
        self._release = release
        self._stats = stats
        self._closed = False

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self._stats)

    def __iter__(self) -> FrameSource:
        return self

    def __next__(self) -> Frame:
        if self._closed:
            raise StopIteration
        frame = next(self._frames)
        self._stats["frames_yielded"] += 1
        return frame

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FrameSource({self.name!r}, live={self.live}, fps={self.fps}, size={self.size})"


def new_stats() -> dict[str, Any]:
    return {"frames_read": 0, "frames_yielded": 0, "frames_dropped": 0, "corrupt_frames": 0,
            "reconnects": 0, "frames_missing": 0, "loops": 0}


# A video file that stops decoding before its declared length: how many reads to try past the failure before
# the rest is counted as frames_missing (failed reads followed by a good one count as corrupt frames).
MAX_CORRUPT_RUN = 8


def is_valid_image(image: Any) -> bool:
    """A decodable BGR frame; anything else is counted as corrupt rather than crashing the model."""
    return (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3 and image.shape[0] > 0 and image.shape[1] > 0)


def natural_key(name: str) -> list[Any]:
    """frame2.jpg sorts before frame10.jpg."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def redact_url(url: str) -> str:
    """Hide the password in rtsp://user:pass@host so it never lands in logs or error messages."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def has_gstreamer() -> bool:
    return bool(cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER))


def classify(spec: str | int) -> tuple[str, Any]:
    """(kind, target) with kind in image, folder, video, camera, url, gstreamer."""
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        return "camera", int(spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"source must be a path, URL, camera index or GStreamer pipeline, "
                        f"got {type(spec).__name__}")
    text = os.fspath(spec).strip()
    if text.isdigit():
        return "camera", int(text)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif URL_RE.match(text):
        return "url", text
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder", path
    if text.startswith("/dev/video") or (path.exists() and not path.is_file()):  # V4L2 device nodes
        return "camera", str(path)
    if "!" in text and not path.exists():
        return "gstreamer", text
    if path.suffix.lower() in IMAGE_EXTS:
        return "image", path
    return "video", path


def open_source(spec: str | int, every: int = 1, live: bool | None = None, reconnect_attempts: int = 5,
                backoff_s: float = 0.5, capture_factory: CaptureFactory | None = None,
                loop: bool = False, open_timeout_s: float = DEFAULT_OPEN_TIMEOUT_S,
                read_timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> FrameSource:
    """Open any supported source. live=None decides from the kind: devices and streams are live.

    live=True on a video file replays it at its own fps with newest-frame-only semantics, which is how
    to see what a slow model would miss on a real camera. live=False on a camera yields every frame.
    every=N keeps every N-th frame the source delivers (live sources then offer only those to the slot).
    capture_factory replaces cv2.VideoCapture(target, api), for tests and custom capture backends.
    loop=True starts a file source (video, image, folder) again at its end, with frame indices and timestamps
    still increasing; stats["loops"] counts the restarts.
    open_timeout_s / read_timeout_s bound a URL source's open and each of its reads (FFmpeg backend); a read
    that times out is a dropped stream: it is reopened as reconnect_attempts and backoff_s say.
    """
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an integer >= 1 (1 = every frame), got {every!r}")
    if reconnect_attempts < 0 or backoff_s < 0:
        raise ValueError(f"reconnect_attempts and backoff_s must be >= 0, got {reconnect_attempts}, "
                         f"{backoff_s}")
    factory = capture_factory or default_capture_factory
    kind, target = classify(spec)
    if loop and kind not in ("video", "image", "folder"):
        raise ValueError(f"--loop needs a video file, image or image folder; {spec} is a {kind} source")
    if kind in ("image", "folder"):
        if live:
            raise ValueError(f"live=True needs a camera, URL, GStreamer pipeline or video file; "
                             f"{target} is an image {'folder' if kind == 'folder' else 'file'}")
        return open_images(target, every, kind == "folder", loop)
    is_live = kind != "video" if live is None else bool(live)
    params = stream_params(open_timeout_s, read_timeout_s) if kind == "url" else []
    device = CaptureDevice(kind, target, factory, reconnect_attempts, backoff_s, new_stats(), params)
    fps = device.fps()
    size = device.size()
    frames = read_capture(device, every, media_time=kind == "video", loop=loop)
    if not is_live:
        return FrameSource(device.name, False, frames, device.close, device.stats, fps, size)
    reader = NewestFrameReader(frames, device, pace_fps=fps if kind == "video" else None)
    return FrameSource(device.name, True, reader.frames(), reader.close, device.stats, fps, size)


def image_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    return sorted(files, key=lambda p: natural_key(p.name))


# How many unreadable image files the summary names (it counts them all).
NAMED_UNREADABLE = 5


def open_images(path: Path, every: int, is_folder: bool, loop: bool = False) -> FrameSource:
    stats = new_stats()
    unreadable: set[str] = set()
    if is_folder:  # the summary names the files it could not decode: a count alone leaves the user searching
        stats.update(unreadable_files=0, unreadable_named=[])
    if is_folder:
        files = image_files(path)
        if not files:
            raise SourceError(f"image folder {path} has no images (looked for {', '.join(IMAGE_EXTS)}); "
                              f"point at a folder of images, a video file or a camera index")
    else:
        if not path.is_file():
            raise SourceError(f"no such file: image {path}")
        files = [path]
    first = None if is_folder else cv2.imread(str(path), cv2.IMREAD_COLOR)
    if not is_folder and not is_valid_image(first):
        raise SourceError(f"could not decode image {path} with OpenCV; is the file a valid "
                          f"{path.suffix.lstrip('.') or 'image'}?")
    size = (first.shape[1], first.shape[0]) if first is not None else None
    start = time.monotonic()

    def frames() -> Iterator[Frame]:
        for cycle in itertools.count():
            for index in range(0, len(files), every):
                t0 = time.perf_counter()
                image = first if first is not None else cv2.imread(str(files[index]), cv2.IMREAD_COLOR)
                stats["frames_read"] += 1
                if not is_valid_image(image):
                    stats["corrupt_frames"] += 1
                    if is_folder and files[index].name not in unreadable:
                        unreadable.add(files[index].name)
                        stats["unreadable_files"] = len(unreadable)
                        if len(stats["unreadable_named"]) < NAMED_UNREADABLE:
                            stats["unreadable_named"] = [*stats["unreadable_named"], files[index].name]
                    continue
                # Still images have no media time; wall time since opening keeps timestamps increasing.
                yield Frame(cycle * len(files) + index, time.monotonic() - start, image,
                            (time.perf_counter() - t0) * 1000)
            if not loop or stats["frames_read"] == stats["corrupt_frames"]:
                return
            stats["loops"] += 1

    name = f"image folder {path}" if is_folder else f"image {path}"
    return FrameSource(name, False, frames(), lambda: None, stats, None, size)


def describe_target(kind: str, target: Any) -> str:
    if kind == "camera":
        return f"camera {target}"
    if kind == "url":
        return f"stream {redact_url(target)}"
    if kind == "gstreamer":
        return f"GStreamer pipeline '{target}'"
    return f"video file {target}"


class CaptureDevice:
    """One cv2.VideoCapture plus the policy for reopening it when a device or stream drops out."""

    def __init__(self, kind: str, target: Any, factory: CaptureFactory, reconnect_attempts: int,
                 backoff_s: float, stats: dict[str, int], params: list[int] | None = None):
        self.kind = kind
        self.target = target
        self.name = describe_target(kind, target)
        self.factory = factory
        self.params = list(params or [])  # OpenCV open parameters (URL timeouts), at every (re)open
        self.api = (cv2.CAP_GSTREAMER if kind == "gstreamer" else cv2.CAP_FFMPEG if self.params
                    else cv2.CAP_ANY)
        self.reconnectable = kind in ("camera", "url", "gstreamer")
        self.reconnect_attempts = reconnect_attempts
        self.backoff_s = backoff_s
        self.stats = stats
        self.failures = 0  # reconnect attempts since the last good read
        self.stopped = threading.Event()
        if kind == "video" and not Path(target).is_file():
            raise SourceError(f"no such file: video {target}")
        self.cap = self.open()
        if not self.cap.isOpened():
            self.cap.release()
            raise SourceError(self.open_failure_message())

    def open(self) -> Any:
        """A new capture of the target: the factory, with the open parameters when there are some."""
        return self.factory(self.target, self.api, self.params) if self.params else self.factory(self.target,
                                                                                                   self.api)

    def timeouts(self) -> str:
        """The open timeout, worded for an error message (" within 5 s (--open-timeout)"); "" without one."""
        params = dict(zip(self.params[::2], self.params[1::2], strict=True))
        ms = params.get(getattr(cv2, "CAP_PROP_OPEN_TIMEOUT_MSEC", None))
        return f" within {ms / 1000:g} s (--open-timeout)" if ms else ""

    def open_failure_message(self) -> str:
        if self.kind == "video":
            backend = "FFMPEG" if cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG) else "no FFMPEG backend"
            return (f"could not open video file {self.target} with OpenCV (backend {backend}); "
                    f"is the file a video? Images need an image extension ({', '.join(IMAGE_EXTS)})")
        if self.kind == "camera":
            found = list_cameras(capture_factory=self.factory)
            return (f"camera {self.target} could not be opened; available cameras: "
                    f"{found if found else 'none found'}. Check the index, permissions (video group) "
                    f"and that no other program holds the camera")
        if self.kind == "gstreamer":
            if not has_gstreamer():
                return (f"could not open {self.name}: this OpenCV build has no GStreamer support "
                        f"(the pip opencv wheels lack it; use an OpenCV built with -DWITH_GSTREAMER=ON, "
                        f"e.g. the system python3-opencv on Jetson)")
            return (f"could not open {self.name}; check each element with gst-launch-1.0 and make sure "
                    f"the pipeline ends in 'appsink'")
        return (f"could not open {self.name}{self.timeouts()} with OpenCV (backend FFMPEG); check the URL, "
                f"credentials and that the stream is reachable (try ffprobe on the same URL)")

    def fps(self) -> float | None:
        value = float(self.cap.get(cv2.CAP_PROP_FPS) or 0.0)
        return value if 0.0 < value < 1000.0 else None

    def size(self) -> tuple[int, int] | None:
        width = int(self.cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        height = int(self.cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
        return (width, height) if width > 0 and height > 0 else None

    def read(self, decode: bool) -> tuple[bool, np.ndarray | None]:
        if decode:
            ok, image = self.cap.read()
        else:  # grab without decoding: skipping a frame costs almost nothing
            ok, image = self.cap.grab(), None
        if ok:
            self.failures = 0
        return bool(ok), image

    def media_seconds(self, index: int, fps: float | None) -> float:
        msec = float(self.cap.get(cv2.CAP_PROP_POS_MSEC) or 0.0)
        if msec > 0.0 or index == 0:
            return msec / 1000.0
        return index / fps if fps else 0.0

    def declared_frames(self) -> int:
        """The frame count a video file's header declares (0 when unknown, or for live sources)."""
        if self.kind != "video":
            return 0
        value = float(self.cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0.0)
        return int(value) if 0 < value < 1e9 else 0

    def rewind(self) -> bool:
        """Reopen a video file at its first frame (for --loop)."""
        self.cap.release()
        self.cap = self.open()
        return bool(self.cap.isOpened())

    def reconnect(self) -> bool:
        """Reopen with exponential backoff. False: the stream ended (files) or the source was closed."""
        if not self.reconnectable or self.stopped.is_set():
            return False
        self.cap.release()
        while self.failures < self.reconnect_attempts:
            delay = backoff_delay(self.backoff_s, self.failures)
            self.failures += 1
            if self.stopped.wait(delay):
                return False
            cap = self.open()
            if cap.isOpened():
                self.cap = cap
                self.stats["reconnects"] += 1
                return True
            cap.release()
        raise SourceError(f"{self.name} stopped delivering frames after {self.reconnect_attempts} "
                          f"reconnect attempts; check the cable, power or network")

    def close(self) -> None:
        """Only call from the thread that reads, or once it has stopped: release during read can crash."""
        self.stopped.set()
        self.cap.release()


def backoff_delay(backoff_s: float, failures: int) -> float:
    """Seconds to wait before reconnect attempt number `failures + 1`: doubling from `backoff_s`, capped."""
    return min(backoff_s * 2 ** failures, MAX_BACKOFF_S)


def read_capture(device: CaptureDevice, every: int, media_time: bool, loop: bool = False) -> Iterator[Frame]:
    """Every frame the capture delivers (every N-th decoded), reconnecting devices that drop out.

    A video file that stops before its declared frame count is read on past the failure (failed reads
    followed by a good one are corrupt frames); what still cannot be read is counted in
    stats["frames_missing"] (beyond a 1% slack, since headers may estimate the count), never ignored.
    """
    fps = device.fps()
    declared = device.declared_frames()
    index = 0  # number of the next frame the capture will deliver
    pass_start, pass_read, failed_run = 0, 0, 0  # index where this pass (loop) began, frames read in it
    time_offset = 0.0
    last_timestamp = 0.0
    while not device.stopped.is_set():
        decode = index % every == 0
        t0 = time.perf_counter()
        ok, image = device.read(decode)
        capture_ms = (time.perf_counter() - t0) * 1000
        if not ok:
            if device.reconnect():
                continue
            if declared > index - pass_start and failed_run < MAX_CORRUPT_RUN:  # corrupt mid-file: read on
                failed_run += 1
                index += 1
                continue
            short = declared - (index - failed_run - pass_start) if declared else 0
            if short > max(1, declared // 100):  # header counts can be estimates (duration x fps)
                device.stats["frames_missing"] += short
            if loop and pass_read > 0 and device.rewind():
                device.stats["loops"] += 1
                time_offset = last_timestamp + (1.0 / fps if fps else 0.0)
                pass_start, pass_read, failed_run = index, 0, 0
                continue
            return
        device.stats["corrupt_frames"] += failed_run  # unreadable frames with readable ones after them
        failed_run = 0
        device.stats["frames_read"] += 1
        pass_read += 1
        index += 1
        if not decode:
            continue
        if not is_valid_image(image):
            device.stats["corrupt_frames"] += 1
            continue
        if media_time:
            last_timestamp = time_offset + device.media_seconds(index - 1 - pass_start, fps)
        else:
            last_timestamp = time.monotonic()
        yield Frame(index - 1, last_timestamp, image, capture_ms)


class NewestFrameReader:
    """A capture thread with a one-frame slot: new frames overwrite unread ones, which count as dropped."""

    def __init__(self, frames: Iterator[Frame], device: CaptureDevice, pace_fps: float | None = None):
        self.device = device
        self.pace_fps = pace_fps
        self.cond = threading.Condition()
        self.slot: Frame | None = None
        self.done = False
        self.error: BaseException | None = None
        self._source_frames = frames
        self.thread = threading.Thread(target=self.run, name=f"capture {device.name}", daemon=True)
        self.thread.start()

    def run(self) -> None:
        start = time.monotonic()
        try:
            for frame in self._source_frames:
                if self.pace_fps:  # replaying a file as if it were a camera
                    wait = start + frame.index / self.pace_fps - time.monotonic()
                    if wait > 0 and self.device.stopped.wait(wait):
                        break
                    frame.timestamp = frame.captured = time.monotonic()
                with self.cond:
                    if self.slot is not None:
                        self.device.stats["frames_dropped"] += 1
                    self.slot = frame
                    self.cond.notify()
        except BaseException as exc:  # handed to the consumer, which raises it from __next__
            self.error = exc
        finally:
            if self.device.stopped.is_set():
                self.device.close()  # close() gave up waiting for a hung read; release once it returns
            with self.cond:
                self.done = True
                self.cond.notify_all()

    def frames(self) -> Iterator[Frame]:
        while True:
            with self.cond:
                while self.slot is None and not self.done:
                    self.cond.wait()
                frame, self.slot = self.slot, None
                if frame is None:
                    if self.error is not None:
                        raise self.error
                    return
            yield frame

    def close(self) -> None:
        self.device.stopped.set()
        self.thread.join(timeout=2.0)
        if not self.thread.is_alive():
            self.device.close()


def list_cameras(max_index: int = 8, capture_factory: CaptureFactory | None = None) -> list[int]:
    """Camera indexes that open. On Linux only existing /dev/videoN nodes are probed, so it is quick."""
    factory = capture_factory or default_capture_factory
    found = []
    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # probing failures are expected
    try:
        for index in range(max_index):
            if (capture_factory is None and sys.platform.startswith("linux")
                    and not os.path.exists(f"/dev/video{index}")):
                continue
            cap = factory(index, cv2.CAP_ANY)
            try:
                if cap.isOpened():
                    found.append(index)
            finally:
                cap.release()
    finally:
        cv2.utils.logging.setLogLevel(previous)
    return found
