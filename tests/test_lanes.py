"""The two lanes (issue 24): in real time the state stream never waits for the VLM, descriptions come later and
name the frame they describe, several sources share one model and one batch, a lost source stops none of the
others, and a stop finishes or drops (and counts) what is in flight.

No timing is asserted: a describer held on a threading.Event decides what can have happened, and the frame
lane runs in the test's own thread (each `next()` of the loop processes one frame).
"""

from __future__ import annotations

import json
import re
import threading

import pytest

from focalrt.demo import pan_zoom_frames

FRAMES = 8


@pytest.fixture(scope="module")
def images(astronaut_bgr):
    return pan_zoom_frames(astronaut_bgr, FRAMES)


@pytest.fixture()
def pipe(tiny_bundle):
    from focalrt.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(tiny_bundle)


def _frames(images, mirrored=False):
    from focalrt.runtime.stream.sources import Frame

    return [Frame(i, i / 10, image[:, ::-1].copy() if mirrored else image, 0.0) for i, image in enumerate(images)]


class HeldDescriber:
    """Stands in for pipeline.describe_images: records each call's region keys, says it was entered, and holds
    the call until `release()`; then the real model describes."""

    def __init__(self, monkeypatch, pipe):
        self.real = pipe.describe_images
        self.entered, self.gate = threading.Event(), threading.Event()
        self.calls: list[list] = []
        monkeypatch.setattr(pipe, "describe_images", self)

    def __call__(self, views, *args, **kwargs):
        self.calls.append([key for keys in kwargs.get("draft_keys") or [] for key in keys])
        self.entered.set()
        if not self.gate.wait(timeout=120):
            raise RuntimeError("the test never released the describer")
        return self.real(views, *args, **kwargs)

    def release(self) -> None:
        self.gate.set()


def _runner(pipe, **kwargs):
    from focalrt.runtime.stream.runner import RegionRunner, bundle_face_state

    return RegionRunner(pipe, regions="mouth", max_new_tokens=2, state=bundle_face_state(pipe), realtime=True,
                        **kwargs)


def _validator(kind):
    jsonschema = pytest.importorskip("jsonschema")
    from focalrt.runtime.stream.robotics import event_schema

    return jsonschema.Draft202012Validator(event_schema(kind))


def test_states_flow_while_a_description_is_in_flight(pipe, images, monkeypatch):
    from focalrt.runtime.stream.runner import RegionRunner, frame_loop

    held = HeldDescriber(monkeypatch, pipe)
    runner = _runner(pipe)
    loop = frame_loop(runner, _frames(images))
    first = next(loop)  # frame 0: its state; its mouth goes to the worker, which holds it
    assert held.entered.wait(timeout=300)
    assert held.calls == [[(1, "mouth")]]
    while_held = [first] + [next(loop) for _ in range(FRAMES - 2)]
    # Every frame but the last gave its state while the first description was still being written.
    assert [(e["type"], e["frame"]) for r in while_held for e in r.events] == [("state", i) for i in range(FRAMES - 1)]
    assert [r.frame.index for r in while_held] == list(range(FRAMES - 1))

    held.release()
    runner.lane.wait()  # the first description is done (the newest crop, frame 6's, may be on its way)
    last = next(loop)
    assert last.frame.index == FRAMES - 1
    rest = [e for r in loop for e in r.events]
    events = [e for r in while_held for e in r.events] + last.events + rest
    states = [e for e in events if e["type"] == "state"]
    descriptions = [e for e in events if e["type"] == "description"]
    assert [e["frame"] for e in states] == list(range(FRAMES))  # state events stay in frame order

    # The description names the frame it describes, when it was emitted and how long that took.
    first_description = descriptions[0]
    assert first_description in last.events  # emitted with the first frame taken after it finished
    assert (first_description["frame"], first_description["described_frame"]) == (0, 0)
    assert first_description["reason"] == "first" and first_description["fresh"] is True
    assert first_description["emitted_frame"] == FRAMES - 1 and first_description["latency_ms"] > 0
    assert first_description["emitted_timestamp"] == round((FRAMES - 1) / 10, 4)
    # Newest crop wins: frames 1..6 each replaced the pending request; the last crop is always described.
    frames_described = [e["frame"] for e in descriptions]
    assert frames_described == sorted(set(frames_described)) and frames_described[-1] == FRAMES - 1
    assert all(e["frame"] <= e["emitted_frame"] for e in descriptions)
    stats = runner.lane.stats
    assert stats["superseded"] >= FRAMES - 3 and stats["dropped_at_stop"] == stats["dropped_face_left"] == 0
    assert stats["submitted"] == FRAMES == stats["described"] + stats["superseded"]
    assert stats["described"] == len(descriptions) == runner.stats.fresh

    # The picture of the last frame shows the region where it is now, with its latest description and age.
    lockstep = RegionRunner(pipe, regions="mouth", max_new_tokens=1)
    mouth_now = next(e for e in lockstep.process(last.frame) if e["type"] == "description")["box"]
    shown = [a for a in last.annotations() if a["tag"] == "mouth"]
    assert len(shown) == 1 and shown[0]["box"] == mouth_now
    assert re.fullmatch(r"face 1 - mouth \(\d+\.\d s ago\)", shown[0]["label"])

    state_schema, description_schema = _validator("state"), _validator("description")
    for event in states:
        state_schema.validate(json.loads(json.dumps(event)))
    for event in descriptions:
        description_schema.validate(json.loads(json.dumps(event)))


def test_two_sources_one_model_one_batch_and_own_face_ids(pipe, images, monkeypatch):
    from focalrt.runtime.stream.inbox import SourceSet
    from focalrt.runtime.stream.runner import frame_loop

    held = HeldDescriber(monkeypatch, pipe)
    runner = _runner(pipe)
    loop = frame_loop(runner, SourceSet([_frames(images), _frames(images, mirrored=True)], ["left", "right"]))
    results = [next(loop)]  # one frame of one source: the worker's first batch is that frame's mouth alone
    assert held.entered.wait(timeout=300)
    after = set()
    while after != {0, 1}:  # frames processed while the worker is held: pending for both sources
        results.append(next(loop))
        after.add(results[-1].frame.source)
    held.release()
    events = [e for r in results for e in r.events] + [e for r in loop for e in r.events]

    assert len(held.calls[0]) == 1
    assert sorted(held.calls[1]) == [((0, 1), "mouth"), ((1, 1), "mouth")]  # one decode for both cameras
    states = [e for e in events if e["type"] == "state"]
    descriptions = [e for e in events if e["type"] == "description"]
    for source in (0, 1):  # every frame of each source gave its state, in order, with its own tracker's ids
        assert [e["frame"] for e in states if e["source"] == source] == list(range(FRAMES))
        assert {e["face_id"] for e in states if e["source"] == source} == {1}
        assert any(e["source"] == source for e in descriptions)
    second_batch = [e for e in descriptions if e["timings_ms"]["batch"] == 2]
    assert {e["source"] for e in second_batch} == {0, 1}
    assert {s: runner.sources[s].stats.frames for s in (0, 1)} == {0: FRAMES, 1: FRAMES}


@pytest.mark.parametrize("realtime", [False, True])
def test_a_lost_source_does_not_stop_the_others(pipe, images, realtime):
    from focalrt.runtime.stream.inbox import SourceSet
    from focalrt.runtime.stream.runner import RegionRunner, iter_events
    from focalrt.runtime.stream.sources import SourceError

    def unplugged(frames):
        yield from frames[:2]
        raise SourceError("camera 1 stopped delivering frames after 5 reconnect attempts")

    runner = RegionRunner(pipe, regions="mouth", max_new_tokens=1, realtime=realtime)
    sources = SourceSet([_frames(images), unplugged(_frames(images))])
    events = list(iter_events(runner, sources))
    assert sources.lost == {1: "camera 1 stopped delivering frames after 5 reconnect attempts"}
    assert runner.sources[0].stats.frames == FRAMES and runner.sources[1].stats.frames == 2
    assert {e["frame"] for e in events if e["source"] == 0} <= set(range(FRAMES))
    if not realtime:  # lock-step: every frame of the good source described, in turn with the lost one's two
        assert [(e["source"], e["frame"]) for e in events] == [(0, 0), (1, 0), (0, 1), (1, 1)] + [
            (0, i) for i in range(2, FRAMES)]


def test_one_source_lost_ends_the_run_as_before(pipe, images):
    from focalrt.runtime.stream.inbox import SourceSet
    from focalrt.runtime.stream.runner import RegionRunner, iter_events
    from focalrt.runtime.stream.sources import SourceError

    def unplugged():
        yield from _frames(images)[:2]
        raise SourceError("camera 0 gone")

    for realtime in (False, True):
        runner = RegionRunner(pipe, regions="mouth", max_new_tokens=1, realtime=realtime)
        seen = []
        with pytest.raises(SourceError, match="camera 0 gone"):
            for event in iter_events(runner, SourceSet([unplugged()])):
                seen.append(event)
        assert {e["frame"] for e in seen if e["type"] == "description"} <= {0, 1}


def test_stop_drops_and_counts_what_is_in_flight(pipe, images, monkeypatch):
    from focalrt.runtime.stream.runner import frame_loop

    held = HeldDescriber(monkeypatch, pipe)
    runner = _runner(pipe, stop_timeout_s=0.0)
    loop = frame_loop(runner, _frames(images))
    next(loop)
    assert held.entered.wait(timeout=300)
    next(loop)  # frame 1: its mouth is pending behind the held one
    loop.close()  # a stop (Ctrl-C, SIGTERM, the window closed): no time to wait
    stats = runner.lane.stats
    assert stats["dropped_at_stop"] == 2 and stats["described"] == 0 and stats["submitted"] == 2
    held.release()
    runner.lane.thread.join(timeout=300)
    assert not runner.lane.thread.is_alive()
    assert runner.take_described() == []  # what was given up is not emitted later

    # With time to finish, the batch in flight is written rather than dropped.
    monkeypatch.undo()
    held = HeldDescriber(monkeypatch, pipe)
    runner = _runner(pipe, stop_timeout_s=300.0)
    loop = frame_loop(runner, _frames(images))
    next(loop)
    assert held.entered.wait(timeout=300)
    held.release()
    loop.close()
    late = runner.take_described()
    assert [e["frame"] for e in late][:1] == [0]
    stats = runner.lane.stats
    assert stats["described"] == len(late) and stats["dropped_at_stop"] == 0


def test_lane_threads_share_the_cores_and_sessions_can_sleep(tiny_bundle):
    from focalrt.runtime.backends.device import format_report, realtime_lanes, report
    from focalrt.runtime.backends.sessions import create_session, lane_threads

    assert lane_threads(2) == (1, 1) and lane_threads(8) == (2, 6) and lane_threads(1) == (1, 1)
    assert lane_threads(8, face=3) == (3, 5) and lane_threads(2, describe=2) == (1, 2)
    session = create_session(next((tiny_bundle / "faces").glob("*.onnx")), ["CPUExecutionProvider"], 1,
                             spinning=False)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    r = report()  # no cameras probed (the caller probes them since the rooms refactor)
    assert r.lanes["frame_lane"] == {"provider": "CPUExecutionProvider", "threads": lane_threads()[0]}
    assert "frame lane (face models) on CPUExecutionProvider" in format_report(r)
    # With a GPU provider the VLM goes there and the face models stay on the CPU, as `focalrt run` does.
    gpu = realtime_lanes(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert gpu["description_lane"]["provider"] == "CUDAExecutionProvider"
    assert gpu["frame_lane"]["provider"] == "CPUExecutionProvider"


def test_mcap_keeps_time_order_with_late_descriptions(tmp_path):
    pytest.importorskip("foxglove")
    mcap_reader = pytest.importorskip("mcap.reader")
    from focalrt.runtime.stream.robotics import FoxgloveSink

    state = {"type": "state", "frame": 5, "timestamp": 0.5, "face_id": 1, "box": [1, 2, 3, 4],
             "geometry": {"source": "facemesh-geometry"}, "head_pose": {"source": "facemesh-3d-axes"}}
    late = {"type": "description", "frame": 0, "timestamp": 0.0, "face_id": 1, "region": "mouth",
            "box": [1, 2, 3, 4], "text": "a smile", "finish_reason": "stop", "fresh": True, "described_frame": 0,
            "reason": "first", "emitted_frame": 5, "emitted_timestamp": 0.5, "latency_ms": 480.0}
    path = tmp_path / "late.mcap"
    with FoxgloveSink(path) as sink:
        sink.write(state)
        sink.write(late)
        import numpy as np

        sink.write_frame(np.zeros((8, 8, 3), np.uint8), 0.5, source=1)
    with open(path, "rb") as f:
        messages = [(c.topic, m.log_time, m.data) for _, c, m in mcap_reader.make_reader(f).iter_messages()]
    by_topic = {topic: (t, data) for topic, t, data in messages}
    assert by_topic["/focalrt/description"][0] == by_topic["/focalrt/state"][0] == 500_000_000
    assert json.loads(by_topic["/focalrt/description"][1])["timestamp"] == 0.0  # the frame it describes
    assert by_topic["/focalrt/image/1"][0] == 500_000_000  # a second camera's pictures on their own topic


# ---- focalrt run ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip(tmp_path_factory, images):
    from focalrt.demo import write_clip

    return write_clip(tmp_path_factory.mktemp("lanes") / "clip.mp4", images)


def _summary(err: str) -> dict:
    return json.loads(next(line for line in err.splitlines() if line.startswith("summary "))[8:])


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _without(events: list[dict], *keys: str) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in ("timings_ms", *keys)} for e in events]


# Recorded from `focalrt run` as it was before the two lanes (the lock-step loop of one `process` per frame), with
# the arguments of the test below on the module's clip: (type, frame, region, fresh, described_frame, reason).
BEFORE_TWO_LANES = [
    ("state", 0, None, None, None, None),
    ("description", 0, "mouth", True, 0, "first"), ("description", 0, "left_eye", True, 0, "first"),
    ("description", 1, "mouth", True, 1, "interval"), ("description", 1, "left_eye", True, 1, "interval"),
    ("state", 2, None, None, None, None),
    ("description", 2, "mouth", True, 2, "interval"), ("description", 2, "left_eye", True, 2, "interval"),
    ("description", 3, "mouth", True, 3, "interval"), ("description", 3, "left_eye", True, 3, "interval"),
    ("state", 4, None, None, None, None),
    ("description", 4, "mouth", False, 3, "not_due"), ("description", 4, "left_eye", False, 3, "not_due"),
    ("description", 5, "mouth", True, 5, "interval"), ("description", 5, "left_eye", True, 5, "interval"),
    ("state", 6, None, None, None, None),
    ("description", 6, "mouth", True, 6, "interval"), ("description", 6, "left_eye", True, 6, "interval"),
    ("description", 7, "mouth", False, 6, "not_due"), ("description", 7, "left_eye", False, 6, "not_due"),
]
STATE_KEYS = ["type", "frame", "timestamp", "face_id", "box", "emotion", "age", "geometry", "head_pose", "timings_ms"]
# (random_weights, which main added for random-weight bundles such as this one after the recording, included.)
FRESH_KEYS = ["type", "frame", "timestamp", "face_id", "region", "box", "random_weights", "text", "finish_reason",
              "fresh", "described_frame", "reason", "tokens", "timings_ms"]


def test_lockstep_file_runs_give_the_events_of_before_the_two_lanes(tiny_bundle, clip, tmp_path, capsys):
    """A file runs in lock-step by default: the same events, in the same order, with the same fields as before
    the two lanes (no emitted_frame, latency_ms or source), carried-over descriptions included."""
    from focalrt import cli

    out = tmp_path / "e.jsonl"
    assert cli.main(["run", str(tiny_bundle), "--source", str(clip), "--regions", "mouth,left_eye", "--min-interval",
                     "0.1", "--state-every", "2", "--max-new-tokens", "2", "--out", str(out), "--quiet"]) == 0
    assert _summary(capsys.readouterr().err)["mode"] == "lockstep"
    events = _lines(out)
    assert [(e["type"], e["frame"], e.get("region"), e.get("fresh"), e.get("described_frame"), e.get("reason"))
            for e in events] == BEFORE_TWO_LANES
    assert {e["face_id"] for e in events} == {1}
    fresh = {(e["frame"], e["region"]): e for e in events if e.get("fresh")}
    for e in events:
        expected = STATE_KEYS if e["type"] == "state" else FRESH_KEYS if e["fresh"] else [
            k for k in FRESH_KEYS if k != "tokens"]
        assert list(e) == expected
        if e["type"] == "description" and not e["fresh"]:  # carried over: what was said about the region then
            said = fresh[(e["described_frame"], e["region"])]
            assert (e["text"], e["finish_reason"]) == (said["text"], said["finish_reason"])


def test_run_realtime_replays_a_file_as_a_camera(tiny_bundle, clip, tmp_path, capsys):
    from focalrt import cli

    out, video = tmp_path / "rt.jsonl", tmp_path / "rt.avi"
    assert cli.main(["run", str(tiny_bundle), "--source", str(clip), "--realtime", "--regions", "mouth",
                     "--max-new-tokens", "2", "--out", str(out), "--write-video", str(video), "--quiet",
                     "--describe-nice", "3"]) == 0
    summary = _summary(capsys.readouterr().err)
    assert summary["lanes"]["describe_nice"] == 3  # the worker ran 3 nice levels below the frame lane
    events = _lines(out)
    states = [e["frame"] for e in events if e["type"] == "state"]
    descriptions = [e for e in events if e["type"] == "description"]
    assert states == sorted(set(states)) and len(states) == summary["frames"]  # frame order; dropped frames skipped
    assert descriptions and all(e["fresh"] and e["frame"] <= e["emitted_frame"] and e["latency_ms"] >= 0
                                and e["random_weights"] is True for e in descriptions)  # as in lock-step
    assert summary["mode"] == "realtime" and summary["lanes"]["frame_lane_threads"] >= 1
    lanes = summary["lanes"]
    assert lanes["submitted"] == lanes["described"] + lanes["superseded"] + lanes["dropped_face_left"]
    assert lanes["described"] == len(descriptions) and lanes["dropped_at_stop"] == 0
    assert summary["source"]["frames_yielded"] == summary["frames"]
    import cv2

    cap = cv2.VideoCapture(str(video))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == summary["frames"]
    cap.release()


def test_run_two_sources_in_lockstep_give_each_one_source_events(tiny_bundle, clip, tmp_path, capsys):
    from focalrt import cli

    one, two, video = tmp_path / "one.jsonl", tmp_path / "two.jsonl", tmp_path / "v.avi"
    assert cli.main(["run", str(tiny_bundle), "--source", str(clip), "--regions", "mouth", "--max-new-tokens", "2",
                     "--out", str(one), "--quiet", "--draft", "off"]) == 0
    capsys.readouterr()
    assert cli.main(["run", str(tiny_bundle), "--source", str(clip), "--source", str(clip), "--regions", "mouth",
                     "--max-new-tokens", "2", "--out", str(two), "--quiet", "--draft", "off",
                     "--write-video", str(video)]) == 0
    summary = _summary(capsys.readouterr().err)
    alone, both = _lines(one), _lines(two)
    assert "source" not in alone[0]  # one source: the events are what they always were
    for source in (0, 1):  # each camera of a two-camera run: its own ids, exactly the one-camera events
        assert _without([e for e in both if e["source"] == source], "source") == _without(alone)
    assert [s["frames"] for s in summary["sources"]] == [FRAMES, FRAMES]
    assert [s["lost"] for s in summary["sources"]] == [None, None] and summary["mode"] == "lockstep"
    import cv2

    for i in (0, 1):  # one annotated video per source
        cap = cv2.VideoCapture(str(tmp_path / f"v-source{i}.avi"))
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == FRAMES
        cap.release()
    assert not video.exists()


def test_run_a_lost_camera_among_two(tiny_bundle, clip, tmp_path, monkeypatch, capsys):
    from focalrt import cli
    from focalrt.runtime.stream import sources

    real_open = sources.open_source
    opened = []

    def second_one_fails(spec, every=1, **kw):
        src = real_open(spec, every=every, **kw)
        opened.append(src)
        if len(opened) == 2:
            inner = src._frames

            def frames():
                yield next(inner)
                raise sources.SourceError("camera 1 stopped delivering frames after 5 reconnect attempts")

            src._frames = frames()
        return src

    monkeypatch.setattr(sources, "open_source", second_one_fails)
    out = tmp_path / "e.jsonl"
    code = cli.main(["run", str(tiny_bundle), "--source", str(clip), "--source", str(clip), "--regions", "mouth",
                     "--max-new-tokens", "1", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 3 and "source 1" in err and "lost" in err
    events = _lines(out)
    assert {e["frame"] for e in events if e["source"] == 0} == set(range(FRAMES))  # the other camera went on
    assert {e["frame"] for e in events if e["source"] == 1} == {0}
    summary = _summary(err)
    assert summary["sources"][0]["lost"] is None and "camera 1" in summary["sources"][1]["lost"]


def test_run_mode_flags_are_checked(tiny_bundle, clip, tmp_path, astronaut_bgr, capsys):
    import cv2

    from focalrt import cli

    assert cli.main(["run", str(tiny_bundle), "--source", str(clip), "--realtime", "--lockstep",
                     "--regions", "mouth"]) == 2
    assert "--lockstep not allowed with argument --realtime" in capsys.readouterr().err
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "0.png"), astronaut_bgr)
    assert cli.main(["run", str(tiny_bundle), "--source", str(folder), "--realtime", "--regions", "mouth"]) == 2
    assert "no frame rate" in capsys.readouterr().err


@pytest.mark.parametrize("signame,code,word", [("SIGTERM", 143, "terminated (SIGTERM)"),
                                               ("SIGINT", 130, "interrupted")])
def test_ctrl_c_or_sigterm_in_real_time_finishes_or_drops_what_is_in_flight(tiny_bundle, tmp_path, astronaut_bgr,
                                                                             signame, code, word):
    import signal
    import subprocess
    import sys
    import time

    from focalrt.demo import write_clip

    long_clip = write_clip(tmp_path / "long.mp4", pan_zoom_frames(astronaut_bgr, 40))
    events_path = tmp_path / "events.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "focalrt.cli", "run", str(tiny_bundle), "--source", str(long_clip),
                             "--loop", "--realtime", "--regions", "mouth,eyes", "--out", str(events_path), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (events_path.exists() and '"description"' in events_path.read_text()):
        time.sleep(0.05)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert word in err and "descriptions in flight" in err
    text = events_path.read_text()
    assert text.endswith("\n")
    events = [json.loads(line) for line in text.splitlines()]  # every line whole
    lanes = _summary(err)["lanes"]
    # (A signal lands between any two lines of Python, so these are bounds, not equalities.)
    assert 0 < sum(e["type"] == "description" for e in events) <= lanes["described"]
    assert "dropped_at_stop" in lanes and lanes["described"] + lanes["dropped_at_stop"] <= lanes["submitted"]


@pytest.mark.parametrize("nice", [None, 10])
def test_the_description_lane_can_yield_the_cpu_to_the_frame_lane(nice):
    """On Linux `--describe-nice N` runs the worker N levels below the frame lane, so the state stream gets a
    contended core first (default 0: the same priority); the frame lane's own thread keeps its priority."""
    import os
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread nice values are Linux's")
    from focalrt.runtime.generation.drafts import Drafts
    from focalrt.runtime.pipeline import GenerationOptions
    from focalrt.runtime.stream.lanes import DESCRIBE_NICE, DescribeRequest, DescriptionLane

    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen = {}

    class Recorder:  # stands in for the Pipeline: notes the priority it is called with
        def describe_images(self, views, *args, **kwargs):
            seen["worker"] = priority()
            raise RuntimeError("recorded")

    before = priority()
    lane = DescriptionLane(Recorder(), None, GenerationOptions(), Drafts(), nice=nice).start()
    lane.submit([DescribeRequest(("face", "mouth"), "face", object(), None, None, "first", {})])
    lane.wait()
    with pytest.raises(RuntimeError, match="recorded"):  # the worker's error reaches the frame lane
        lane.take()
    assert seen["worker"] == min(19, before + (DESCRIBE_NICE if nice is None else nice)) and priority() == before
