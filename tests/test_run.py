"""`focalrt run` end to end on a synthetic clip of a real face, plus the coordinate mapping it relies on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from focalrt.demo import pan_zoom_frames, pan_zoom_transforms, write_clip
from focalrt.runtime.faces.crops import map_box

FRAMES = 6
# The astronaut's face in the 512x512 photo (hand-checked; the detector finds about 178,81,272,175).
PHOTO_FACE = (170, 70, 280, 185)


@pytest.fixture(scope="module")
def clip(tmp_path_factory, astronaut_bgr):
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    return write_clip(path, pan_zoom_frames(astronaut_bgr, FRAMES))


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "focalrt.cli", "run", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def _read_events(path):
    """The description events of a JSONL file (state events, one per face and frame, are tested in
    test_state_stream.py)."""
    events = [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in events if e["type"] == "description"]


def test_run_on_moving_face_gives_events_on_the_face(tiny_bundle, clip, tmp_path, astronaut_bgr):
    events_path, video_path = tmp_path / "events.jsonl", tmp_path / "out.avi"
    out = _run(tiny_bundle, "--source", clip, "--regions", "mouth,left_eye", "--out", events_path,
               "--write-video", video_path, "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr
    events = _read_events(events_path)
    assert len(events) == FRAMES * 2
    assert {e["face_id"] for e in events} == {1}
    assert [e["frame"] for e in events] == [i for i in range(FRAMES) for _ in range(2)]
    transforms = pan_zoom_transforms(astronaut_bgr.shape, FRAMES)
    for e in events:
        m = transforms[e["frame"]]
        fx1, fy1, fx2, fy2 = map_box(PHOTO_FACE, m)
        x1, y1, x2, y2 = e["box"]
        assert fx1 <= x1 < x2 <= fx2 and fy1 <= y1 < y2 <= fy2, (e["region"], e["box"], (fx1, fy1, fx2, fy2))
        assert e["fresh"] and e["finish_reason"] in ("stop", "length") and isinstance(e["text"], str)
        assert {"capture", "detect", "landmarks", "vision", "prefill", "decode"} <= set(e["timings_ms"])
    mouths = [e for e in events if e["region"] == "mouth"]
    eyes = [e for e in events if e["region"] == "left_eye"]
    for mouth, eye in zip(mouths, eyes, strict=True):
        assert eye["box"][3] < mouth["box"][1], "the eye is above the mouth"
        assert eye["box"][0] > mouth["box"][0], "the subject's left eye is on the image's right"
    cap = cv2.VideoCapture(str(video_path))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == FRAMES
    cap.release()
    summary = json.loads(out.stderr.split("summary ", 1)[1])
    assert summary["frames"] == FRAMES and summary["frames_without_face"] == 0


def test_every_n_and_carried_over(tiny_bundle, clip, tmp_path):
    from focalrt.runtime.pipeline import Pipeline
    from focalrt.runtime.stream.runner import RegionRunner, iter_events
    from focalrt.runtime.stream.sources import open_source

    runner = RegionRunner(Pipeline.from_bundle(tiny_bundle), regions="mouth", every=2, max_new_tokens=2)
    with open_source(str(clip)) as frames:
        events = list(iter_events(runner, frames))
    assert [e["fresh"] for e in events] == [True, False] * (FRAMES // 2)
    for carried, fresh in zip(events[1::2], events[0::2], strict=True):
        assert carried["text"] == fresh["text"] and carried["described_frame"] == fresh["frame"]
    # A file source with --every skips frames at the source: every processed frame is due.
    out = _run(tiny_bundle, "--source", clip, "--regions", "mouth", "--every", "2", "--out", tmp_path / "e.jsonl",
               "--max-new-tokens", "2")
    assert out.returncode == 0, out.stderr
    assert [e["frame"] for e in _read_events(tmp_path / "e.jsonl")] == list(range(0, FRAMES, 2))


def test_fixed_box_needs_no_face(tiny_bundle, tmp_path):
    blank = write_clip(tmp_path / "blank.mp4", [np.full((120, 160, 3), 90, np.uint8)] * 3)
    out = _run(tiny_bundle, "--source", blank, "--box", "10,10,200,80", "--regions", "mouth",
               "--out", tmp_path / "e.jsonl", "--max-new-tokens", "2")
    assert out.returncode == 0, out.stderr
    events = _read_events(tmp_path / "e.jsonl")
    assert [e["region"] for e in events] == ["box"] * 3
    assert events[0]["box"] == [10, 10, 160, 80]  # clipped to the 160x120 frame
    assert "clipped" in out.stderr
    summary = json.loads(out.stderr.split("summary ", 1)[1])
    assert summary["frames_without_face"] == 3


def test_bad_input_is_explained(tiny_bundle, clip, tmp_path):
    out = _run(tiny_bundle, "--source", clip, "--regions", "mouht")
    assert out.returncode == 2 and "mouth" in out.stderr and "left_eye" in out.stderr
    out = _run(tiny_bundle, "--source", tmp_path / "nope.mp4", "--regions", "mouth")
    assert out.returncode == 2 and "nope.mp4" in out.stderr
    out = _run(tiny_bundle, "--source", clip)
    assert out.returncode == 2 and "--regions" in out.stderr


def test_lost_source_exits_nonzero_and_keeps_events(tiny_bundle, clip, tmp_path, monkeypatch):
    from focalrt import cli
    from focalrt.runtime.stream import sources

    real_open = sources.open_source

    def flaky(spec, every=1, **kw):
        src = real_open(spec, every=every, **kw)
        inner = src._frames

        def frames():
            yield next(inner)
            yield next(inner)
            raise sources.SourceError("camera 0 stopped delivering frames after 5 reconnect attempts")

        src._frames = frames()
        return src

    monkeypatch.setattr(sources, "open_source", flaky)
    events_path = tmp_path / "e.jsonl"
    code = cli.main(["run", str(tiny_bundle), "--source", str(clip), "--regions", "mouth,eyes", "--out",
                     str(events_path), "--max-new-tokens", "2", "--quiet"])
    assert code == 3
    assert len(_read_events(events_path)) == 4


def test_killed_run_leaves_whole_lines(tiny_bundle, tmp_path, astronaut_bgr):
    long_clip = write_clip(tmp_path / "long.mp4", pan_zoom_frames(astronaut_bgr, 40))
    events_path = tmp_path / "events.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "focalrt.cli", "run", str(tiny_bundle), "--source", str(long_clip),
                             "--regions", "mouth,eyes,brows,nose", "--out", str(events_path), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not events_path.exists() or events_path.stat().st_size < 2000):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lines = events_path.read_text().splitlines()
    assert len(lines) >= 2
    assert all(e["region"] for e in map(json.loads, lines) if e["type"] == "description")
    assert events_path.read_text().endswith("\n")


def _default_sigint() -> None:
    """Children of a background shell (as CI may run us) start with SIGINT ignored, and Python keeps it
    ignored; give the child the default so it installs its Ctrl-C handler like an interactive run."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum,code,word", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_closes_the_video_and_keeps_events(tiny_bundle, tmp_path, astronaut_bgr, signum, code,
                                                             word):
    long_clip = write_clip(tmp_path / "long.mp4", pan_zoom_frames(astronaut_bgr, 40))
    events_path, video_path = tmp_path / "events.jsonl", tmp_path / "out.avi"
    proc = subprocess.Popen([sys.executable, "-m", "focalrt.cli", "run", str(tiny_bundle), "--source", str(long_clip),
                             "--regions", "mouth,eyes", "--out", str(events_path), "--write-video", str(video_path),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    deadline = time.time() + 120
    # Events of frame 2 mean frames 0 and 1 are already in the video.
    while time.time() < deadline and not (events_path.exists() and '"frame": 2' in events_path.read_text()):
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert word in err
    events = _read_events(events_path)
    assert events and len({e["frame"] for e in events}) < 40  # stopped early, not at the end of the clip
    cap = cv2.VideoCapture(str(video_path))
    ok, first = cap.read()
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    assert ok and first.shape == (360, 480, 3)
    assert n >= 2 and n >= len({e["frame"] for e in events}) - 1


def test_run_with_face_llava_bundle(face_llava_bundle, clip, tmp_path, monkeypatch):
    """The second family goes through the same run loop, fed the 68 landmarks of each tracked face."""
    from focalrt.runtime.pipeline import Pipeline
    from focalrt.runtime.stream.runner import RegionRunner, iter_events
    from focalrt.runtime.stream.sources import open_source

    bundle = face_llava_bundle
    out = _run(bundle, "--source", clip, "--regions", "mouth,brows", "--out", tmp_path / "e.jsonl",
               "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr
    events = _read_events(tmp_path / "e.jsonl")
    assert len(events) == FRAMES * 2 and {e["face_id"] for e in events} == {1}
    # In process: the landmarks reach the vision encoder, in the face crop's pixels.
    pipe = Pipeline.from_bundle(bundle)
    assert pipe.adapter.uses_landmarks
    seen = []
    real = pipe.encode_image
    monkeypatch.setattr(pipe, "encode_image", lambda view, lm=None: (seen.append(lm), real(view, lm))[1])
    with open_source(str(clip)) as frames:
        assert len(list(iter_events(RegionRunner(pipe, regions="mouth", max_new_tokens=2), frames))) == FRAMES
    assert len(seen) == FRAMES
    for lm in seen:
        assert lm.shape == (68, 2) and (lm >= 0).all() and (lm <= pipe.image_size).all()
        assert lm[36:42, 1].mean() < lm[48:60, 1].mean(), "eyes above the mouth in the crop"
