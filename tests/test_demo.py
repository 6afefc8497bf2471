"""The demo's pictures: the face stays unobstructed, descriptions sit in a side panel, each region's box and
label are distinct and never hide each other; `focalrt demo` writes every file the README lists."""

from __future__ import annotations

import json

import numpy as np
import pytest

from focalrt import cli
from focalrt.commands.demo import DEMO_FILES
from focalrt.demo import demo_photo, pan_zoom_frames
from focalrt.runtime.stream.annotate import REGION_COLORS, _overlaps, annotate_with_panel, layout_labels

cv2 = pytest.importorskip("cv2")

# The demo's three regions on a 480x360 frame of the photo, as the face front end places them: brows and
# eyes overlap, as they do on a real face.
BOXES = [(172, 87, 225, 115), (165, 52, 234, 77), (161, 44, 239, 72)]  # mouth, eyes, brows (frame 0)
LABELS = ["mouth", "eyes", "brows"]


def _border_mask(shape, boxes, width=3):
    """Pixels within `width` of any box outline (where outlines, and leaders ending on them, are drawn)."""
    mask = np.zeros(shape[:2], bool)
    for x1, y1, x2, y2 in boxes:
        ring = np.zeros(shape[:2], bool)
        ring[max(0, y1 - width):y2 + width + 1, max(0, x1 - width):x2 + width + 1] = True
        ring[y1 + width:y2 - width + 1, x1 + width:x2 - width + 1] = False
        mask |= ring
    return mask


def test_panel_keeps_every_region_unobstructed_and_puts_text_beside_the_frame():
    frame = pan_zoom_frames(demo_photo(), 2)[0]
    annotations = [{"box": b, "label": n, "text": f"the {n} description " * 8} for b, n in zip(BOXES, LABELS,
                                                                                              strict=True)]
    out = annotate_with_panel(frame, annotations, title="focalrt demo")
    h, w = frame.shape[:2]
    assert out.shape[0] == h and out.shape[1] > w  # the panel is beside the frame, not over it
    changed = np.any(out[:, :w] != frame, axis=2)
    borders = _border_mask(frame.shape, BOXES)
    for x1, y1, x2, y2 in BOXES:  # inside each region only box outlines are drawn: no text, no fill
        inside = np.zeros_like(changed)
        inside[y1 + 3:y2 - 2, x1 + 3:x2 - 2] = True
        assert not (changed & inside & ~borders).any(), (x1, y1, x2, y2)
    panel = out[:, w:]
    for color in REGION_COLORS[:3]:  # each region's heading in its box's colour
        assert np.all(panel == color, axis=2).any()
    assert (panel > 200).all(axis=2).sum() > 500  # the descriptions' text


def test_labels_never_cover_a_box_or_each_other():
    rects = layout_labels(BOXES, [(44, 16), (38, 16), (46, 16)], (360, 480))
    assert all(r is not None for r in rects)
    for i, rect in enumerate(rects):
        assert 0 <= rect[0] and rect[2] <= 480 and 0 <= rect[1] and rect[3] <= 360
        others = [b for j, b in enumerate(BOXES) if j != i] + [r for j, r in enumerate(rects) if j != i]
        assert not any(_overlaps(rect, other) for other in others), (LABELS[i], rect)


def test_demo_writes_every_file_and_says_the_weights_are_random(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--bundle", str(tiny_bundle), "--out", str(out), "--frames", "2",
                     "--max-new-tokens", "3"]) == 0
    stdout, stderr = capsys.readouterr()
    assert stderr.count("random weights") == 1
    for name in DEMO_FILES:
        assert (out / name).stat().st_size > 0 and str(out / name) in stdout
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    descriptions = [e for e in events if e["type"] == "description"]
    assert {e["region"] for e in descriptions} == {"mouth", "eyes", "brows"}
    assert {e["frame"] for e in descriptions} == {0, 1}
    # what `focalrt run --regions` writes: the face's state on every frame beside the descriptions
    states = [e for e in events if e["type"] == "state"]
    assert [e["frame"] for e in states] == [0, 1] and all("emotion" in e and "age" in e for e in states)
    assert "photo, face 1 - " in stdout and "(FER2013)" in stdout and "photo, mouth at [" in stdout
    first = cv2.imread(str(out / "first_frame.png"))
    assert first.shape[0] == 360 and first.shape[1] > 480
    cap = cv2.VideoCapture(str(out / "annotated.mp4"))
    ok, frame = cap.read()
    cap.release()
    assert ok and frame.shape == first.shape


def test_demo_clip_lasts_seconds_and_the_age_of_one_photo_reads_steadily(tiny_bundle, tmp_path, capsys):
    from focalrt.commands.demo import DEMO_FPS, DEMO_FRAMES, DEMO_SMOOTH, DESCRIBE_INTERVAL_S

    out = tmp_path / "demo"
    assert cli.main(["demo", "--bundle", str(tiny_bundle), "--out", str(out), "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    cap = cv2.VideoCapture(str(out / "clip.mp4"))
    seconds = cap.get(cv2.CAP_PROP_FRAME_COUNT) / cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    assert seconds >= 2.5 and DEMO_FRAMES / DEMO_FPS == pytest.approx(seconds, abs=0.1)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    states = [e for e in events if e["type"] == "state"]
    assert len(states) == DEMO_FRAMES and all(e["smoothing"] == {"ema": DEMO_SMOOTH} for e in states)
    ages = [e["age"]["expected"] for e in states]
    jumps = [abs(b - a) for a, b in zip(ages, ages[1:], strict=False)]
    assert max(jumps) <= 2.0, ages  # the raw estimate moves by up to 15 years between frames of this clip
    fresh = sorted({e["frame"] for e in events if e["type"] == "description" and e["fresh"]})
    every = round(DESCRIBE_INTERVAL_S * DEMO_FPS)
    assert fresh == list(range(0, DEMO_FRAMES, every))  # described afresh twice a second, carried over between
    assert all(e.get("random_weights") is True for e in events if e["type"] == "description")


def test_demo_with_a_wrong_bundle_path_says_no_bundle_there(tmp_path, capsys):
    assert cli.main(["demo", "--bundle", str(tmp_path / "typo"), "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no bundle there (no such folder)" in err[0], err
    assert "torch" not in err[0] and "export]" not in err[0] and not (tmp_path / "demo").exists()
    (tmp_path / "empty").mkdir()
    assert cli.main(["demo", "--bundle", str(tmp_path / "empty")]) == 2
    assert "no bundle there (no manifest.json in it)" in capsys.readouterr().err
