"""URL sources give up on a silent server after --open-timeout and on a stalled stream after --read-timeout, on
loopback, instead of OpenCV's ~30 s; a stall is a dropped stream and follows the reconnect rules.

No timing is asserted beyond a generous bound (WAIT_S, far above the 1 s timeouts used here, still below
OpenCV's own ~30 s): each test proves the source ends with its documented error rather than hanging.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from focalrt.runtime.stream.sources import SourceError, open_source

cv2 = pytest.importorskip("cv2")
if not cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG) or not hasattr(cv2, "CAP_PROP_OPEN_TIMEOUT_MSEC"):
    pytest.skip("this OpenCV has no FFmpeg backend with open/read timeouts", allow_module_level=True)

WAIT_S = 25.0


class Listener:
    """A loopback TCP server. Connection i gets `frames[i]` MJPEG frames over HTTP, then silence (the socket
    stays open); connections beyond the list get silence from the start."""

    def __init__(self, frames: list[int] | None = None):
        self.frames = list(frames or [])
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.jpeg = cv2.imencode(".jpg", np.full((96, 128, 3), 127, np.uint8))[1].tobytes()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            index = len(self.connections)
            self.connections.append(conn)
            if index < len(self.frames):
                threading.Thread(target=self.stream, args=(conn, self.frames[index]), daemon=True).start()

    def stream(self, conn: socket.socket, frames: int) -> None:
        try:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n")
            for _ in range(frames):
                conn.sendall(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(self.jpeg)
                             + self.jpeg + b"\r\n")
                time.sleep(0.02)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def listener():
    made = []

    def make(frames=None) -> Listener:
        made.append(Listener(frames))
        return made[-1]

    yield make
    for item in made:
        item.close()


def in_thread(fn):
    """Run fn in a thread; (result or exception, finished within WAIT_S)."""
    box: list = []
    thread = threading.Thread(target=lambda: box.append(_call(fn)), daemon=True)
    thread.start()
    thread.join(WAIT_S)
    return (box[0] if box else None), not thread.is_alive()


def _call(fn):
    try:
        return fn()
    except Exception as e:  # handed back to the test
        return e


def test_a_server_that_accepts_and_stays_silent_fails_the_open(listener):
    server = listener()
    url = f"rtsp://127.0.0.1:{server.port}/stream"
    error, finished = in_thread(lambda: open_source(url, open_timeout_s=1.0, read_timeout_s=1.0))
    assert finished, f"open_source hung for {WAIT_S} s on a silent server"
    assert isinstance(error, SourceError), error
    assert "could not open stream" in str(error) and "within 1 s (--open-timeout)" in str(error)
    assert len(server.connections) == 1  # it did connect: the silence, not a refusal, is what timed out


def test_a_stream_that_stalls_is_reopened_then_given_up_as_a_lost_camera_is(listener):
    server = listener(frames=[5])  # 5 frames, then silence; every reconnect finds a silent server
    url = f"http://127.0.0.1:{server.port}/cam.mjpg"

    def read_all():
        frames = []
        with open_source(url, live=False, open_timeout_s=1.0, read_timeout_s=1.0, reconnect_attempts=2,
                         backoff_s=0.05) as source:
            try:
                for frame in source:
                    frames.append(frame)
            except SourceError as e:
                return frames, e, source.stats
        return frames, None, source.stats

    result, finished = in_thread(read_all)
    assert finished, f"a stalled stream hung the source for {WAIT_S} s"
    frames, error, stats = result
    assert len(frames) == 5 and frames[0].image.shape == (96, 128, 3)
    assert isinstance(error, SourceError) and "stopped delivering frames after 2 reconnect attempts" in str(error)
    assert stats["reconnects"] == 0 and len(server.connections) == 3  # the first, then two reopen attempts


def test_a_stream_that_stalls_and_comes_back_keeps_going(listener):
    server = listener(frames=[3, 4])  # a stall after 3 frames; the reconnect gets 4 more, then a stall for good

    def read_all():
        with open_source(f"http://127.0.0.1:{server.port}/cam.mjpg", live=False, open_timeout_s=1.0,
                         read_timeout_s=1.0, reconnect_attempts=1, backoff_s=0.05) as source:
            frames = []
            try:
                for frame in source:
                    frames.append(frame)
            except SourceError:
                pass
            return frames, source.stats

    result, finished = in_thread(read_all)
    assert finished
    frames, stats = result
    assert len(frames) == 7 and stats["reconnects"] == 1


def test_run_passes_its_timeouts_to_the_source(listener, tiny_bundle, tmp_path):
    server = listener()
    out = tmp_path / "events.jsonl"
    done = subprocess.run([sys.executable, "-m", "focalrt.cli", "run", str(tiny_bundle), "--source",
                           f"rtsp://user:secret@127.0.0.1:{server.port}/live", "--open-timeout", "1",
                           "--read-timeout", "1", "--box", "0,0,32,32", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    line = next(x for x in done.stderr.splitlines() if x.startswith("focalrt run: error:"))
    assert "could not open stream rtsp://user:***@127.0.0.1" in line and "within 1 s (--open-timeout)" in line
    assert "secret" not in done.stderr and not out.exists()
