"""Sinks: JSONL survives a hard kill with whole lines, videos are playable, annotations are visible."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from focalrt.runtime.stream.annotate import annotate
from focalrt.runtime.stream.sinks import CallbackSink, JsonlSink, ShowSink, VideoSink, gui_problems

REPO = Path(__file__).resolve().parents[1]


def test_jsonl_lines_are_whole_and_parseable(tmp_path):
    path = tmp_path / "out" / "events.jsonl"
    with JsonlSink(path) as sink:
        sink.write({"face_id": 1, "region": "mouth", "text": "lèvres entrouvertes · smiling"})
        sink.write({"box": np.array([1, 2, 3, 4]), "score": np.float32(0.5), "frame": np.int64(7)})
    lines = path.read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in lines]
    assert events[0]["text"] == "lèvres entrouvertes · smiling"
    assert events[1] == {"box": [1, 2, 3, 4], "score": 0.5, "frame": 7}
    assert path.read_bytes().endswith(b"\n")


def test_jsonl_truncates_unless_appending(tmp_path):
    path = tmp_path / "events.jsonl"
    for append in (False, False, True):
        with JsonlSink(path, append=append) as sink:
            sink.write({"n": 1})
    assert len(path.read_text().splitlines()) == 2


def test_jsonl_rejects_unserialisable_and_closed(tmp_path):
    sink = JsonlSink(tmp_path / "events.jsonl")
    with pytest.raises(TypeError, match="not JSON serialisable"):
        sink.write({"what": object()})
    sink.close()
    with pytest.raises(ValueError, match="closed"):
        sink.write({"n": 1})
    assert (tmp_path / "events.jsonl").read_text() == ""  # the failed event left nothing behind


def test_jsonl_killed_mid_run_leaves_only_whole_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    # Mostly short lines with a large one now and then; the child reports each event it has written.
    script = (
        "import sys, time\n"
        "from focalrt.runtime.stream.sinks import JsonlSink\n"
        "sink = JsonlSink(sys.argv[1])\n"
        "for i in range(100000):\n"
        "    sink.write({'i': i, 'text': 'x' * (i % 50 * 37 + (100000 if i % 25 == 0 else 0))})\n"
        "    print(i, flush=True)\n"
        "    time.sleep(0.002)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], env=env, stdout=subprocess.PIPE)
    reported = []
    for line in proc.stdout:  # kill once the child says it wrote 40 events, whatever the machine's speed
        reported.append(line)
        if int(line) >= 40:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    reported += proc.stdout.read().split()
    proc.stdout.close()
    data = path.read_bytes()
    assert data.endswith(b"\n")
    events = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    assert len(events) > 10
    assert [e["i"] for e in events] == list(range(len(events)))
    assert len(events) >= int(reported[-1]) + 1  # every event reported as written reached the file


def test_callback_sink_calls_the_function():
    seen = []
    with CallbackSink(seen.append) as sink:
        sink.write({"n": 1})
        sink.write({"n": 2})
    assert seen == [{"n": 1}, {"n": 2}]
    with pytest.raises(TypeError, match="callable"):
        CallbackSink("not a function")


def read_video(path: Path) -> tuple[int, tuple[int, int]]:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened()
    count, size = 0, None
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        count += 1
        size = (frame.shape[1], frame.shape[0])
    cap.release()
    return count, size


@pytest.mark.parametrize("name", ["out.mp4", "out.avi"])
def test_video_sink_writes_playable_file(tmp_path, name):
    path = tmp_path / name
    frame = np.full((64, 96, 3), 100, np.uint8)
    with VideoSink(path, fps=10, size=(96, 64)) as sink:
        for i in range(12):
            sink.write(frame, [{"box": (10 + i, 10, 50 + i, 40), "label": "face 1 · mouth", "text": "open"}])
    assert sink.frames_written == 12
    assert read_video(path) == (12, (96, 64))


def test_video_sink_is_finalised_when_interrupted(tmp_path):
    path = tmp_path / "interrupted.mp4"
    with pytest.raises(KeyboardInterrupt), VideoSink(path, fps=10, size=(32, 32)) as sink:
        for _ in range(5):
            sink.write(np.zeros((32, 32, 3), np.uint8))
        raise KeyboardInterrupt
    assert read_video(path) == (5, (32, 32))


def test_video_sink_bad_input_is_explained(tmp_path):
    with pytest.raises(ValueError, match="unsupported video extension '.gif'"):
        VideoSink(tmp_path / "out.gif", fps=10, size=(32, 32))
    with VideoSink(tmp_path / "out.mp4", fps=10, size=(32, 32)) as sink, \
            pytest.raises(ValueError, match="frame is 64x48 but .* opened for 32x32"):
        sink.write(np.zeros((48, 64, 3), np.uint8))


def test_annotate_draws_box_label_and_text_without_touching_input():
    frame = np.full((240, 320, 3), 128, np.uint8)
    box = (100, 80, 180, 140)
    out = annotate(frame, [{"box": box, "label": "face 1 · mouth",
                            "text": "lips parted, corners raised; AU12 present; emotion: happiness"}])
    assert np.all(frame == 128)
    changed = np.any(out != frame, axis=2)
    assert changed[80, 100:181].all() and changed[80:141, 100].all()  # the box outline
    assert changed[60:80, 100:180].any()  # label above
    assert changed[141:200, 100:180].sum() > 200  # wrapped description below, on its background
    assert not changed[100:120, 120:160].any()  # the region itself stays visible


def test_annotate_wraps_long_text_inside_the_frame():
    frame = np.zeros((200, 200, 3), np.uint8)
    text = "a very long description of the left eye " * 6
    out = annotate(frame, [{"box": (150, 20, 190, 60), "text": text}])
    rows = np.flatnonzero(np.any(out[61:] != 0, axis=(1, 2)))
    assert rows.size and rows[-1] - rows[0] > 40  # several lines, not one clipped line


def test_annotate_rejects_bad_boxes():
    frame = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(ValueError, match="is empty"):
        annotate(frame, [{"box": (30, 10, 20, 40)}])
    with pytest.raises(ValueError, match="needs a 'box'"):
        annotate(frame, [{"label": "face 1"}])


def test_show_sink_without_display_is_explained(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    with pytest.raises(RuntimeError, match=r"--show needs a display .* none found: .*DISPLAY"):
        ShowSink("focalrt")


@pytest.mark.skipif(not any("GUI" in p for p in gui_problems()), reason="this OpenCV has GUI support")
def test_show_sink_with_headless_opencv_is_explained(monkeypatch):
    monkeypatch.setenv("DISPLAY", ":0")
    with pytest.raises(RuntimeError, match=r"not -headless\); none found: OpenCV .* without GUI support"):
        ShowSink("focalrt")
