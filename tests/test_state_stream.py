"""One event stream: `state` events (fast heads, every frame per face) beside `description` events (the VLM)."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import pytest

from focalrt.demo import pan_zoom_frames, write_clip

FRAMES = 6


@pytest.fixture(scope="module")
def clip(tmp_path_factory, astronaut_bgr):
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", pan_zoom_frames(astronaut_bgr, FRAMES))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "focalrt.cli", "run", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_jsonl_has_typed_state_and_description_events(tiny_bundle, clip, tmp_path):
    events_path, video = tmp_path / "e.jsonl", tmp_path / "out.avi"
    out = _run(tiny_bundle, "--source", clip, "--regions", "mouth", "--out", events_path, "--max-new-tokens", "2",
               "--state-every", "2", "--write-video", video)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    assert {e["type"] for e in events} == {"state", "description"}
    descriptions = [e for e in events if e["type"] == "description"]
    states = [e for e in events if e["type"] == "state"]
    assert [e["frame"] for e in descriptions] == list(range(FRAMES))
    assert all("text" in e and e["region"] == "mouth" for e in descriptions)
    assert [e["frame"] for e in states] == [0, 2, 4]  # --state-every 2 thins the state stream
    for s in states:
        assert s["face_id"] == 1 and len(s["box"]) == 4
        assert s["emotion"]["label"] == "happy" and s["emotion"]["source"] == "fer2013-mini-xception"
        # The photo's subject was in her late thirties; this small model moves 30-45 across the clip's zooms.
        assert 20 <= s["age"]["expected"] <= 50 and s["age"]["source"] == "age-v1 (dlib-models)"
        assert s["geometry"]["source"] == "facemesh-geometry" and s["head_pose"]["source"] == "facemesh-3d-axes"
        assert "state" in s["timings_ms"]
    summary = json.loads(out.stderr.split("summary ", 1)[1])
    assert summary["states"] == 3
    cap = cv2.VideoCapture(str(video))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == FRAMES
    cap.release()


def test_state_every_zero_turns_the_stream_off(tiny_bundle, clip, tmp_path):
    out = _run(tiny_bundle, "--source", clip, "--regions", "mouth", "--out", tmp_path / "e.jsonl",
               "--max-new-tokens", "1", "--state-every", "0", "--max-frames", "2")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert events and {e["type"] for e in events} == {"description"}
    out = _run(tiny_bundle, "--source", clip, "--regions", "mouth", "--state-every", "-1")
    assert out.returncode == 2 and "--state-every" in out.stderr


def test_python_iterator_yields_both_kinds(tiny_bundle, clip):
    from focalrt.runtime.faces.state import FaceStateEstimator
    from focalrt.runtime.pipeline import Pipeline
    from focalrt.runtime.stream.runner import RegionRunner, iter_events
    from focalrt.runtime.stream.sources import open_source

    pipe = Pipeline.from_bundle(tiny_bundle)
    state = FaceStateEstimator.from_bundle_entry(pipe.bundle.path, pipe.bundle.manifest["face_models"], smooth=0.5)
    runner = RegionRunner(pipe, regions="mouth", max_new_tokens=1, state=state)
    with open_source(str(clip)) as frames:
        events = list(iter_events(runner, frames))
    kinds = [(e["frame"], e["type"]) for e in events]
    assert kinds == [(i, kind) for i in range(FRAMES) for kind in ("state", "description")]
    assert all(e["smoothing"] == {"ema": 0.5} for e in events if e["type"] == "state")
    # States alone, no VLM call: the fast path without the decoder.
    runner = RegionRunner(pipe, state=state)
    with open_source(str(clip)) as frames:
        assert {e["type"] for e in iter_events(runner, frames)} == {"state"}


def test_state_annotation_names_the_models():
    from focalrt.runtime.stream.annotate import state_annotation

    a = state_annotation({"face_id": 2, "box": [1, 2, 30, 40],
                          "emotion": {"label": "happy", "probabilities": {"happy": 0.97}},
                          "age": {"expected": 31.4}})
    assert a["box"] == [1, 2, 30, 40] and a["label"] == "face 2 - happy 0.97 (FER2013), age ~31 (dlib-models)"
