"""One frame loop and one annotation builder: `focalrt run`, `focalrt demo` and the Python iterator go through
`runtime.stream.runner.frame_loop`, give the same events for the same clip, and draw the same annotations."""

from __future__ import annotations

import json

import pytest

from focalrt import cli
from focalrt.commands.demo import DEMO_REGIONS, DEMO_SMOOTH, DESCRIBE_INTERVAL_S
from focalrt.runtime.stream import annotate as annotate_module
from focalrt.runtime.stream import runner as run_module
from focalrt.runtime.stream import sinks

FRAMES = 7  # frame 6 is half a second in: the demo's second fresh description


def _without_timings(events: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "timings_ms"} for e in events]


@pytest.fixture()
def spies(monkeypatch):
    """Record every use of the frame loop and every list of annotations drawn (overlay or side panel)."""
    seen = {"loops": [], "overlay": [], "panel": []}
    real_loop = run_module.frame_loop
    real_annotate, real_panel = annotate_module.annotate, annotate_module.annotate_with_panel

    def frame_loop(runner, frames, max_frames=None):
        seen["loops"].append(runner)
        yield from real_loop(runner, frames, max_frames)

    def annotate(frame, annotations):
        seen["overlay"].append(list(annotations))
        return real_annotate(frame, annotations)

    def annotate_with_panel(frame, annotations, **kw):
        seen["panel"].append(list(annotations))
        return real_panel(frame, annotations, **kw)

    monkeypatch.setattr(run_module, "frame_loop", frame_loop)
    monkeypatch.setattr(annotate_module, "annotate", annotate)
    monkeypatch.setattr(sinks, "annotate", annotate)  # the video and window sinks hold their own reference
    monkeypatch.setattr(annotate_module, "annotate_with_panel", annotate_with_panel)
    return seen


def test_run_demo_and_iterator_share_the_loop_events_and_annotations(tiny_bundle, tmp_path, spies, capsys):
    from focalrt.runtime.pipeline import Pipeline
    from focalrt.runtime.stream.runner import RegionRunner, bundle_face_state, iter_events
    from focalrt.runtime.stream.sources import open_source

    demo_out = tmp_path / "demo"
    assert cli.main(["demo", "--bundle", str(tiny_bundle), "--out", str(demo_out), "--frames", str(FRAMES),
                     "--max-new-tokens", "3"]) == 0
    assert len(spies["loops"]) == 2  # the photo, then the clip
    demo_events = [json.loads(line) for line in (demo_out / "events.jsonl").read_text().splitlines()]
    clip = demo_out / "clip.mp4"

    run_out, video = tmp_path / "run.jsonl", tmp_path / "run.avi"
    assert cli.main(["run", str(tiny_bundle), "--source", str(clip), "--regions", DEMO_REGIONS, "--max-new-tokens",
                     "3", "--out", str(run_out), "--write-video", str(video), "--quiet", "--draft", "off",
                     "--min-interval", str(DESCRIBE_INTERVAL_S), "--smooth", str(DEMO_SMOOTH)]) == 0
    assert len(spies["loops"]) == 3
    run_events = [json.loads(line) for line in run_out.read_text().splitlines()]  # drafts off, as the demo's

    pipe = Pipeline.from_bundle(tiny_bundle)
    runner = RegionRunner(pipe, regions=DEMO_REGIONS, max_new_tokens=3, min_interval_s=DESCRIBE_INTERVAL_S,
                          state=bundle_face_state(pipe, DEMO_SMOOTH))
    with open_source(str(clip)) as frames:
        iterated = list(iter_events(runner, frames))
    assert len(spies["loops"]) == 4

    # The same events, in the same order, from all three (only the measured milliseconds differ).
    assert _without_timings(demo_events) == _without_timings(run_events) == _without_timings(iterated)
    kinds = [(e["frame"], e["type"], e.get("region")) for e in iterated]
    assert sorted({e["frame"] for e in iterated if e.get("fresh")}) == [0, 6]  # the demo's cadence, run's too
    assert kinds == [(i, *k) for i in range(FRAMES)
                     for k in [("state", None)] + [("description", r) for r in DEMO_REGIONS.split(",")]]

    # One annotation builder: run's video frames and the demo's side panel draw the same boxes and labels;
    # the demo's panel (issue 18) shows the face's emotion and age beside the face.
    clip_panels = spies["panel"][-FRAMES:]
    assert spies["overlay"][-FRAMES:] == clip_panels  # (the demo's VideoSink draws nothing more on its panels)
    for panel, frame in zip(clip_panels, range(FRAMES), strict=True):
        state = next(e for e in iterated if e["frame"] == frame and e["type"] == "state")
        assert panel[0]["box"] == state["box"] and panel[0]["tag"] == "face 1"
        assert "(FER2013)" in panel[0]["label"] and "age ~" in panel[0]["label"]
        assert [a["tag"] for a in panel[1:]] == DEMO_REGIONS.split(",")
    capsys.readouterr()


def test_max_frames_stops_the_loop(tiny_bundle, tmp_path):
    from focalrt.demo import demo_photo
    from focalrt.runtime.pipeline import Pipeline
    from focalrt.runtime.stream.runner import RegionRunner, frame_loop
    from focalrt.runtime.stream.sources import Frame

    runner = RegionRunner(Pipeline.from_bundle(tiny_bundle), boxes=[(10, 10, 60, 60)], max_new_tokens=1)
    photo = demo_photo()
    frames = (Frame(i, i / 10, photo, 0.0) for i in range(10))
    results = list(frame_loop(runner, frames, max_frames=2))
    assert [r.frame.index for r in results] == [0, 1] and runner.stats.frames == 2
    assert [[e["region"] for e in r.events] for r in results] == [["box"], ["box"]]
    assert results[0].annotations() == [{"box": [10, 10, 60, 60], "label": "face 0 - box",
                                         "text": results[0].events[0]["text"], "tag": "box"}]
