"""Frame sources: files yield every frame in order; live sources hand over only the newest frame and
survive a camera that drops out for a while."""

from __future__ import annotations

import threading
import time
from itertools import pairwise
from pathlib import Path

import cv2
import numpy as np
import pytest

from focalrt.runtime.stream.sources import (
    MAX_BACKOFF_S,
    SourceError,
    backoff_delay,
    classify,
    has_gstreamer,
    list_cameras,
    open_source,
)

STEP = 12  # pixel value per frame number: survives mp4v compression with room to spare


def write_video(path: Path, frames: int = 20, fps: float = 10.0, size: tuple[int, int] = (64, 48)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), i * STEP, np.uint8))
    writer.release()
    return path


def frame_number(image: np.ndarray) -> int:
    return int(round(float(image.mean()) / STEP))


def test_image_file_yields_one_bgr_frame(tmp_path):
    path = tmp_path / "face.png"
    cv2.imwrite(str(path), np.full((30, 40, 3), 77, np.uint8))
    with open_source(str(path)) as source:
        frames = list(source)
    assert not source.live and source.size == (40, 30)
    assert len(frames) == 1
    assert frames[0].image.shape == (30, 40, 3) and frames[0].image.dtype == np.uint8
    assert frames[0].index == 0 and frames[0].image[0, 0, 0] == 77


def test_folder_in_name_order_skips_and_counts_corrupt_image(tmp_path):
    for number in (1, 2, 10):
        cv2.imwrite(str(tmp_path / f"img_{number}.png"), np.full((8, 8, 3), number * 20, np.uint8))
    (tmp_path / "img_3.png").write_bytes(b"\x89PNG not really a png")
    (tmp_path / "notes.txt").write_text("not an image, ignored")
    with open_source(tmp_path) as source:
        frames = list(source)
    assert [int(f.image[0, 0, 0]) // 20 for f in frames] == [1, 2, 10]  # natural order: 2 before 10
    assert [f.index for f in frames] == [0, 1, 3]  # img_3 was index 2 and is missing
    assert source.stats["corrupt_frames"] == 1
    assert source.stats["frames_yielded"] == 3


def test_folder_without_images_says_so(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(SourceError, match="has no images"):
        open_source(tmp_path)


def test_video_file_yields_every_frame_in_order(tmp_path):
    path = write_video(tmp_path / "clip.mp4")
    with open_source(str(path)) as source:
        assert not source.live
        assert source.fps == pytest.approx(10.0) and source.size == (64, 48)
        frames = list(source)
    assert [f.index for f in frames] == list(range(20))
    assert [frame_number(f.image) for f in frames] == list(range(20))
    assert [f.timestamp for f in frames] == pytest.approx([i / 10.0 for i in range(20)], abs=1e-3)
    assert source.stats["frames_read"] == 20 and source.stats["frames_dropped"] == 0


def test_video_file_every_fifth_frame(tmp_path):
    path = write_video(tmp_path / "clip.mp4")
    with open_source(path, every=5) as source:
        frames = list(source)
    assert [f.index for f in frames] == [0, 5, 10, 15]
    assert [frame_number(f.image) for f in frames] == [0, 5, 10, 15]
    assert frames[1].timestamp == pytest.approx(0.5, abs=1e-3)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere.mp4"
    with pytest.raises(SourceError, match="no such file") as info:
        open_source(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(SourceError, match="no such file"):
        open_source(tmp_path / "nowhere.jpg")


def test_non_video_file_names_the_path(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("these are notes, not a video")
    with pytest.raises(SourceError, match="is the file a video") as info:
        open_source(str(path))
    assert str(path) in str(info.value)


def test_bad_every_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="every"):
        open_source(write_video(tmp_path / "clip.mp4"), every=0)


def test_spec_kinds():
    assert classify(0) == ("camera", 0)
    assert classify("2") == ("camera", 2)
    assert classify("rtsp://cam.local:554/stream")[0] == "url"
    assert classify("https://example.com/live.m3u8")[0] == "url"
    assert classify("v4l2src device=/dev/video0 ! videoconvert ! appsink")[0] == "gstreamer"
    assert classify("clip.mp4")[0] == "video"
    assert classify("face.JPG")[0] == "image"


# ---- live sources, driven by a fake capture -------------------------------------------------------------

def wait_until(condition, guard_s: float = 120.0) -> None:
    """Poll until `condition()` holds. The guard only stops a hung thread from hanging the suite; no test
    result depends on how long the wait took."""
    deadline = time.monotonic() + guard_s
    while not condition():
        assert time.monotonic() < deadline, "the capture thread made no progress"
        time.sleep(0.001)


class FakeCamera:
    """Stands in for cv2.VideoCapture: delivers `frames` frames (None = forever), then read fails."""

    def __init__(self, frames: int | None = None, period_s: float = 0.001, marker: int = 0,
                 opened: bool = True, corrupt_every: int = 0):
        self.frames = frames
        self.period_s = period_s
        self.marker = marker
        self.opened = opened
        self.corrupt_every = corrupt_every
        self.produced = 0
        self.released = False

    def isOpened(self) -> bool:  # noqa: N802 - cv2's name
        return self.opened

    def read(self):
        time.sleep(self.period_s)
        if not self.opened or (self.frames is not None and self.produced >= self.frames):
            return False, None
        self.produced += 1
        if self.corrupt_every and self.produced % self.corrupt_every == 0:
            return True, None
        image = np.zeros((6, 8, 3), np.uint8)
        image[0, 0, 0] = self.marker
        image[0, 0, 1:] = divmod(self.produced - 1, 256)
        return True, image

    def grab(self) -> bool:
        return self.read()[0]

    def get(self, prop: int) -> float:
        return 0.0

    def release(self) -> None:
        self.released = True


class ScriptedFactory:
    """Returns the given captures one per open call, recording when each open happened."""

    def __init__(self, captures: list[FakeCamera]):
        self.captures = list(captures)
        self.calls: list[tuple[object, int, float]] = []
        self.params: list[list[int] | None] = []  # OpenCV open parameters per call (URL timeouts)

    def __call__(self, target, api, params=None):
        self.calls.append((target, api, time.monotonic()))
        self.params.append(params)
        return self.captures.pop(0) if self.captures else FakeCamera(opened=False)


def test_live_source_hands_over_only_the_newest_frame():
    camera = FakeCamera(period_s=0.001)
    source = open_source(0, capture_factory=ScriptedFactory([camera]))
    assert source.live
    indexes = []
    with source:
        for _ in range(5):
            produced_before = camera.produced
            frame = next(source)
            assert frame.index >= produced_before - 2  # at most one frame was in flight
            high, low = frame.image[0, 0, 1:]
            assert frame.index == int(high) * 256 + int(low)
            indexes.append(frame.index)
            # A slow model: the camera delivers 8 more frames before the consumer asks again. Waiting for
            # the frames themselves, not for a time, keeps this independent of the machine's speed.
            wait_until(lambda index=frame.index: camera.produced >= index + 8)
    stats = source.stats
    assert all(b - a > 1 for a, b in pairwise(indexes)), indexes
    assert stats["frames_dropped"] > 0
    # Everything read was either handed over, dropped, or is the single frame left in the slot: no queue.
    assert stats["frames_read"] - stats["frames_yielded"] - stats["frames_dropped"] <= 1
    assert stats["frames_read"] > 20
    assert camera.released


def test_live_camera_as_sequential_source_yields_every_frame_and_counts_corrupt():
    camera = FakeCamera(frames=9, corrupt_every=3, period_s=0.0)
    with open_source("0", live=False, reconnect_attempts=0,
                     capture_factory=ScriptedFactory([camera])) as source:
        assert not source.live
        indexes = []
        with pytest.raises(SourceError, match="after 0 reconnect attempts"):
            for frame in source:
                indexes.append(frame.index)
    assert indexes == [0, 1, 3, 4, 6, 7]  # frames 2, 5 and 8 were corrupt
    stats = source.stats
    assert stats["corrupt_frames"] == 3 and stats["frames_yielded"] == 6 and stats["frames_dropped"] == 0


def test_vanishing_camera_retries_with_backoff_then_fails():
    factory = ScriptedFactory([FakeCamera(frames=3, period_s=0.002)])
    source = open_source(0, reconnect_attempts=3, backoff_s=0.02, capture_factory=factory)
    got = []
    with source, pytest.raises(SourceError, match="camera 0 stopped delivering frames after 3 reconnect"):
        for frame in source:
            got.append(frame.index)
    assert got and got[-1] == 2  # the last good frame was still handed over
    assert len(factory.calls) == 1 + 3
    assert source.stats["reconnects"] == 0


def test_reconnect_backoff_doubles_up_to_a_cap():
    assert [backoff_delay(0.02, n) for n in range(3)] == [0.02, 0.04, 0.08]  # exponential
    assert backoff_delay(0.5, 20) == MAX_BACKOFF_S


def test_camera_that_comes_back_continues():
    factory = ScriptedFactory([FakeCamera(frames=3, marker=1), FakeCamera(opened=False),
                               FakeCamera(opened=False), FakeCamera(marker=2)])
    with open_source(0, reconnect_attempts=5, backoff_s=0.001, capture_factory=factory) as source:
        after = None
        for n, frame in enumerate(source):
            if frame.image[0, 0, 0] == 2:
                after = frame
                break
            assert n < 100, "camera never came back"
        assert after is not None and after.index >= 3  # numbering carries on across the reconnect
        assert source.stats["reconnects"] == 1
    assert len(factory.calls) == 4


def test_camera_that_cannot_open_lists_available_cameras():
    def factory(target, api):
        return FakeCamera(opened=target in (0, 2))

    assert list_cameras(max_index=4, capture_factory=factory) == [0, 2]
    with pytest.raises(SourceError, match=r"camera 3 could not be opened; available cameras: \[0, 2\]"):
        open_source(3, capture_factory=factory)


def test_url_and_pipeline_are_live_and_password_is_hidden():
    factory = ScriptedFactory([FakeCamera(), FakeCamera()])
    with open_source("rtsp://cam.local/stream", capture_factory=factory) as source:
        assert source.live
    with open_source("videotestsrc ! videoconvert ! appsink", capture_factory=factory) as source:
        assert source.live
    assert factory.calls[1][1] == cv2.CAP_GSTREAMER and factory.params[1] is None
    assert factory.calls[0][1] == cv2.CAP_FFMPEG  # a URL gets FFmpeg with its timeouts (defaults: 5 s each)
    assert factory.params[0] == [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 5000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 5000]
    with pytest.raises(SourceError) as info:
        open_source("rtsp://admin:hunter2@cam.local/stream", capture_factory=ScriptedFactory([]))
    assert "hunter2" not in str(info.value) and "cam.local" in str(info.value)


@pytest.mark.skipif(has_gstreamer(), reason="this OpenCV has GStreamer")
def test_pipeline_without_gstreamer_explains_why():
    with pytest.raises(SourceError, match="no GStreamer support"):
        open_source("videotestsrc ! videoconvert ! appsink")


def test_video_file_replayed_live_drops_frames_behind_a_slow_consumer(tmp_path):
    path = write_video(tmp_path / "fast.mp4", frames=20, fps=100.0)
    with open_source(path, live=True) as source:
        assert source.live
        frames = []
        for frame in source:
            frames.append(frame)
            # A slow consumer: the replay reads 3 more frames (or reaches the end) before the next is taken.
            wait_until(lambda index=frame.index: source.stats["frames_read"] >= min(20, index + 4))
    assert 1 < len(frames) < 20
    assert source.stats["frames_dropped"] > 0
    assert [frame_number(f.image) for f in frames] == [f.index for f in frames]
    assert all(b.timestamp > a.timestamp for a, b in pairwise(frames))


def test_close_stops_the_capture_thread():
    before = threading.active_count()
    source = open_source(0, capture_factory=ScriptedFactory([FakeCamera()]))
    next(source)
    source.close()
    assert threading.active_count() == before
    with pytest.raises(StopIteration):
        next(source)
