"""The batched, prefix-shared path gives every region exactly the tokens of the plain one-region path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from focalrt.runtime.pipeline import Pipeline

BOXES = [(170, 80, 280, 200), (190, 120, 260, 170), (200, 150, 250, 185), (150, 60, 300, 220),
         (175, 95, 215, 120), (225, 95, 265, 120), (180, 70, 270, 100), (100, 50, 400, 300)]
NEW = 12


def _plain(pipe, image, boxes, new=NEW):
    return [pipe.describe(image, box=b, max_new_tokens=new) for b in boxes]


@pytest.mark.parametrize("n", [1, 3, 8])
def test_batched_tokens_equal_plain_path(pipe, astronaut_bgr, n):
    boxes = BOXES[:n]
    plain = _plain(pipe, astronaut_bgr, boxes)
    batched = pipe.describe_regions(astronaut_bgr, boxes, max_new_tokens=NEW)
    assert [d.token_ids for d in batched] == [d.token_ids for d in plain]
    assert [d.finish_reason for d in batched] == [d.finish_reason for d in plain]
    assert [d.prompt_token_ids for d in batched] == [d.prompt_token_ids for d in plain]
    assert all(d.timings_ms["batch"] == n for d in batched)
    if n > 1:
        assert len({tuple(d.token_ids) for d in batched}) > 1, "regions must differ for the test to mean much"


def test_regions_that_stop_at_different_steps(pipe, astronaut_bgr, monkeypatch):
    boxes = BOXES[:5]
    free = _plain(pipe, astronaut_bgr, boxes, 16)
    # Make a token that one region emits at step 3 and another at step 9 a stop token: rows then drop
    # out of the batch at different steps while the others go on.
    stops = {free[1].token_ids[3], free[3].token_ids[9]}
    monkeypatch.setattr(pipe, "stop_ids", pipe.stop_ids | stops)
    plain = _plain(pipe, astronaut_bgr, boxes, 16)
    batched = pipe.describe_regions(astronaut_bgr, boxes, max_new_tokens=16)
    assert [d.token_ids for d in batched] == [d.token_ids for d in plain]
    assert [d.finish_reason for d in batched] == [d.finish_reason for d in plain]
    lengths = {len(d.token_ids) for d in batched if d.finish_reason == "stop"}
    assert len(lengths) >= 2 and any(d.finish_reason == "length" for d in batched)


def test_prefix_reuse_across_frames(pipe, astronaut_bgr):
    shifted = np.roll(astronaut_bgr, 25, axis=1)
    for frame in (astronaut_bgr, shifted, astronaut_bgr):
        batched = pipe.describe_regions(frame, BOXES[:2], max_new_tokens=8)
        plain = _plain(pipe, frame, BOXES[:2], 8)
        assert [d.token_ids for d in batched] == [d.token_ids for d in plain]
    assert pipe.cache.heads  # the prompt head before the image is remembered across frames


def test_more_regions_than_slots_are_chunked(tiny_bundle, astronaut_bgr):
    small = Pipeline.from_bundle(tiny_bundle, max_batch=3)
    batched = small.describe_regions(astronaut_bgr, BOXES[:7], max_new_tokens=6)
    plain = _plain(small, astronaut_bgr, BOXES[:7], 6)
    assert [d.token_ids for d in batched] == [d.token_ids for d in plain]
    assert [d.timings_ms["batch"] for d in batched] == [3, 3, 3, 3, 3, 3, 1]


def test_views_of_several_faces_share_one_batch(pipe, astronaut_bgr):
    other = np.ascontiguousarray(astronaut_bgr[:, ::-1])
    views = [(astronaut_bgr, BOXES[:2], None), (other, BOXES[2:5], None)]
    out = pipe.describe_images(views, max_new_tokens=8)
    assert [len(v) for v in out] == [2, 3]
    for (image, boxes, _), got in zip(views, out, strict=True):
        assert [d.token_ids for d in got] == [d.token_ids for d in _plain(pipe, image, boxes, 8)]
        assert all(d.timings_ms["batch"] == 5 for d in got)


def test_two_faces_in_one_frame_get_two_ids_and_one_batch(pipe, astronaut_bgr):
    from focalrt.runtime.stream.runner import RegionRunner
    from focalrt.runtime.stream.sources import Frame

    face = astronaut_bgr[20:300, 90:360]  # 270 px wide around the face
    frame = np.ascontiguousarray(np.concatenate([face, face[:, ::-1]], axis=1))
    runner = RegionRunner(pipe, regions="mouth,eyes", max_new_tokens=4)
    events = runner.process(Frame(0, 0.0, frame, 0.0))
    assert sorted((e["face_id"], e["region"]) for e in events) == [(1, "eyes"), (1, "mouth"), (2, "eyes"),
                                                                    (2, "mouth")]
    assert all(e["timings_ms"]["batch"] == 4 for e in events)
    left = [e for e in events if e["box"][2] <= 270]
    right = [e for e in events if e["box"][0] >= 270]
    assert len(left) == 2 and len(right) == 2


def test_describe_batch_takes_a_prompt_per_request(pipe, astronaut_bgr):
    """Typed requests: regions of one image with different instructions share the batch (and the encoder
    input), and each gets the tokens its own one-region call gives."""
    from focalrt.runtime.pipeline import Request

    asks = [(BOXES[0], None), (BOXES[1], "Describe the eyes."), (BOXES[2], "Is the mouth open?")]
    batched = pipe.describe_batch([Request(astronaut_bgr, box, prompt=ask) for box, ask in asks], max_new_tokens=8)
    plain = [pipe.describe(astronaut_bgr, box=box, prompt=ask, max_new_tokens=8) for box, ask in asks]
    assert [d.token_ids for d in batched] == [d.token_ids for d in plain]
    assert [d.prompt_token_ids for d in batched] == [d.prompt_token_ids for d in plain]
    assert len({tuple(d.prompt_token_ids) for d in batched}) == 3
    assert sum(d.timings_ms["preprocess_and_vision"] > 0 for d in batched) == 1  # one encoder call


def test_the_callers_options_are_never_changed(pipe, astronaut_bgr):
    from focalrt.runtime.generation.drafts import Drafts
    from focalrt.runtime.pipeline import GenerationOptions

    options = GenerationOptions(max_new_tokens=4)
    drafts = Drafts(mode="temporal")
    pipe.describe(astronaut_bgr, box=BOXES[0], options=options, drafts=drafts, draft_key="mouth", temperature=0.0)
    assert options == GenerationOptions(max_new_tokens=4)
    assert drafts.mode == "temporal"
    # a decoder that cannot verify drafts: decoding goes on without them, and the caller's Drafts stay on
    names = pipe.model.names
    try:
        pipe.model.names = dataclasses.replace(names, logits_to_keep=None)
        with pytest.warns(UserWarning, match="drafts cannot be verified"):
            assert pipe.usable_drafts(drafts) is None
    finally:
        pipe.model.names = names
    assert drafts.mode == "temporal"
