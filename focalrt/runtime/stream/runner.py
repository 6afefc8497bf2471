"""The real-time loop: frames -> faces -> regions -> descriptions -> events.

One frame: detect faces, find their landmarks, keep stable face ids, work out each requested region's
box from the landmarks, and describe the regions that are due. The model sees a square crop around each
face (so the face fills the encoder's input); region boxes are mapped frame -> crop -> encoder pixels.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from focalrt.bundle import has_random_weights
from focalrt.runtime.faces.crops import clip_box, crop_face, crop_face_square, fit_box, landmarks_in_view
from focalrt.runtime.faces.detection import FaceAnalyzer
from focalrt.runtime.faces.landmarks68 import to_68
from focalrt.runtime.faces.regions import parse_regions, region_box
from focalrt.runtime.faces.state import FaceStateEstimator
from focalrt.runtime.faces.tracking import IoUTracker
from focalrt.runtime.generation.drafts import Drafts
from focalrt.runtime.pipeline import GenerationOptions, ImageRegions, Pipeline, VideoClip
from focalrt.runtime.stream.annotate import event_annotations
from focalrt.runtime.stream.scheduling import RegionScheduler, appearance_signature
from focalrt.runtime.stream.sources import Frame

FIXED_BOX_FACE_ID = 0  # events for --box regions, which belong to no tracked face
WINDOW = "window"  # the region name of a tracked face's video-window descriptions


@dataclass
class RunStats:
    frames: int = 0
    frames_without_face: int = 0
    faces: int = 0
    events: int = 0
    fresh: int = 0
    carried: int = 0
    states: int = 0
    started: float = field(default_factory=time.perf_counter)

    def as_dict(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        return {"frames": self.frames, "frames_without_face": self.frames_without_face, "faces": self.faces,
                "events": self.events, "fresh_descriptions": self.fresh, "carried_over": self.carried,
                "states": self.states,
                "seconds": round(elapsed, 3), "fps": round(self.frames / elapsed, 3) if elapsed > 0 else 0.0}


@dataclass(frozen=True)
class RegionJob:
    """One region to describe: its name, its box in frame pixels and in the pixels of the encoder's view."""

    name: str
    frame_box: tuple
    view_box: tuple | None
    window: tuple[int, ...] | None = None  # a video window: the frame indices of its crops, oldest first


@dataclass
class FaceView:
    """What the encoder sees for one face (or the whole frame for fixed boxes), and its regions."""

    face_id: int
    image: np.ndarray | VideoClip
    jobs: list[RegionJob]
    landmarks68: np.ndarray | None = None


@dataclass
class Decision:
    """Whether a region is described on this frame, and why (the scheduler's verdict)."""

    job: RegionJob
    due: bool
    reason: str
    signature: Any = None


class RegionRunner:
    """Per-run state: the face tracker, the region schedule and the last description of each region.

    With `state` (a FaceStateEstimator), every tracked face also gets a `type: "state"` event every
    `state_every` frames (emotion, age, geometry, head pose); descriptions are `type: "description"`.

    With `video_window` (a bundle with a video encoder), each tracked face keeps its last F face crops (F the
    encoder's frames; one crop every `window_stride` processed frames) and, once it has F, its window is a
    region named "window" that the schedule describes like any other.
    """

    def __init__(self, pipeline: Pipeline, regions: str | list[str] | None = None,
                 boxes: list[tuple[int, int, int, int]] | None = None, every: int = 1,
                 min_interval_s: float = 0.0, change_threshold: float | None = None,
                 prompt: str | None = None, max_new_tokens: int | None = None,
                 faces: FaceAnalyzer | None = None, state: FaceStateEstimator | None = None,
                 state_every: int = 1, draft: str = "off", schema: Any = None, video_window: bool = False,
                 window_stride: int = 1):
        if not pipeline.bundle.has_vision:
            raise ValueError(f"{pipeline.bundle.path} is a text-only bundle (no vision component): it cannot "
                             f"describe camera frames; ask it with `focalrt describe BUNDLE --prompt TEXT`")
        self.pipeline = pipeline
        self.regions = parse_regions(regions) if isinstance(regions, str) else list(regions or [])
        if isinstance(regions, list):
            parse_regions(",".join(regions))  # validates the names
        self.boxes = [tuple(int(v) for v in b) for b in (boxes or [])]
        if video_window:
            pipeline.require_video()
        if window_stride < 1:
            raise ValueError(f"window_stride must be >= 1, got {window_stride}")
        self.video_window, self.window_stride = video_window, window_stride
        # face id -> (frame index, crop, landmarks68 in crop pixels) of its last crops; and crops seen
        self.windows: dict[int, deque[tuple[int, np.ndarray, np.ndarray | None]]] = {}
        self.window_seen: dict[int, int] = {}
        if not self.regions and not self.boxes and state is None and not video_window:
            raise ValueError("nothing to describe: give --regions (e.g. mouth,eyes), --box x1,y1,x2,y2 and/or "
                             "--video-window")
        if (self.regions or state is not None or video_window) and faces is None:
            entry = pipeline.bundle.manifest.get("face_models")
            if not entry:
                raise ValueError(f"bundle {pipeline.bundle.path} has no face models, so named regions cannot be "
                                 f"found; re-export it without --no-face-models, or use --box")
            faces = FaceAnalyzer.from_dir(pipeline.bundle.path, entry, pipeline.providers)
        self.faces = faces
        if state_every < 1:
            raise ValueError(f"state_every must be >= 1, got {state_every}")
        self.state, self.state_every = state, state_every
        self.tracker = IoUTracker()
        self.scheduler = RegionScheduler(every=every, min_interval_s=min_interval_s,
                                         change_threshold=change_threshold)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.options = GenerationOptions(max_new_tokens=max_new_tokens, schema=schema)
        if schema is not None:
            pipeline.grammar(schema)  # compiled now: a schema llguidance rejects fails before any frame is read
        self.stats = RunStats()
        self.drafts = Drafts(draft)  # "temporal": each (face id, region) drafts from its last description
        # A random-weight bundle's text is gibberish by design: its description events say so themselves.
        self.weights_note = {"random_weights": True} if has_random_weights(pipeline.bundle.manifest) else {}

    def process(self, frame: Frame) -> list[dict[str, Any]]:
        """Events for one frame: one per (face, region), fresh or carried over from an earlier frame.

        Every due region of every face goes into one batched call, so they share each decode step.
        """
        image = frame.image
        stage: dict[str, float] = {"capture": frame.capture_ms}
        self.stats.frames += 1
        views: list[FaceView] = []
        if self.boxes:
            h, w = image.shape[:2]
            jobs = []
            for i, box in enumerate(self.boxes):
                box = fit_box(box, w, h)
                jobs.append(RegionJob(f"box{i}" if len(self.boxes) > 1 else "box", box, box))
            views.append(FaceView(FIXED_BOX_FACE_ID, image, jobs))
        states: list[dict[str, Any]] = []
        if self.regions or self.state is not None or self.video_window:
            face_views, states = self._face_views(frame, stage)
            views += face_views
        events = states + self._describe(frame, views, stage)
        self.stats.events += len(events)
        return events

    def _face_views(self, frame: Frame, stage: dict[str, float]) -> tuple[list[FaceView], list[dict[str, Any]]]:
        """Detect, landmark and track faces; one square crop per face with its regions' boxes in it, and the
        faces' state events when they are due."""
        image = frame.image
        t0 = time.perf_counter()
        detections = self.faces.detector.detect(image)
        t1 = time.perf_counter()
        found = []
        for det in detections:
            points, presence = self.faces.landmarker.landmarks_and_presence(image, det)
            if presence >= self.faces.presence_threshold:
                found.append((det, points))
        t2 = time.perf_counter()
        stage["detect"] = round((t1 - t0) * 1e3, 3)
        stage["landmarks"] = round((t2 - t1) * 1e3, 3)
        ids = self.tracker.update([det.box for det, _ in found])
        for gone in self.tracker.retired:
            self.scheduler.forget_face(gone)
            self.drafts.forget_face(gone)
            self.windows.pop(gone, None)
            self.window_seen.pop(gone, None)
        if not found:
            self.stats.frames_without_face += 1
            return [], []
        self.stats.faces += len(found)
        states = self._states(frame, found, ids, stage)
        views = self._window_views(frame, found, ids) if self.video_window else []
        if not self.regions:
            return views, states
        size = self.pipeline.image_size
        for face_id, (det, points) in zip(ids, found, strict=True):
            frame_boxes = [region_box(name, points, image.shape) for name in self.regions]
            face = crop_face(image, det.box, size, frame_boxes,
                             to_68(points) if self.pipeline.adapter.uses_landmarks else None)
            jobs = [RegionJob(name, frame_box, crop_box)
                    for name, frame_box, crop_box in zip(self.regions, frame_boxes, face.boxes, strict=True)]
            views.append(FaceView(face_id, face.image, jobs, face.landmarks68))
        return views, states

    def _window_views(self, frame: Frame, found: list[tuple], ids: list[int]) -> list[FaceView]:
        """Add each face's crop to its window (every window_stride-th time the face is seen); one view per
        face whose window is full. The crop is the one the image path sees: the run's square face crop, or
        Face-LLaVA's crop tool's (side (w + h) / 2 from the box corner, 256 px) in `face_crop` region mode."""
        frames = self.pipeline.adapter.video_frames
        tool_crop = self.pipeline.profile.get("region_mode") == "face_crop"
        size = self.pipeline.image_size
        views = []
        for face_id, (det, points) in zip(ids, found, strict=True):
            seen = self.window_seen.get(face_id, 0)
            self.window_seen[face_id] = seen + 1
            window = self.windows.setdefault(face_id, deque(maxlen=frames))
            if seen % self.window_stride == 0:
                landmarks68 = to_68(points) if self.pipeline.adapter.uses_landmarks else None
                if tool_crop:
                    box = clip_box(det.box, frame.image.shape[1], frame.image.shape[0])[0]  # quietly, per frame
                    crop, crop_box = crop_face_square(frame.image, box)
                    if landmarks68 is not None:
                        landmarks68 = landmarks_in_view(landmarks68, box, crop_box)
                else:
                    face = crop_face(frame.image, det.box, size, (), landmarks68)
                    crop, landmarks68 = face.image, face.landmarks68
                window.append((frame.index, crop, landmarks68))
            if len(window) == frames:
                lms = [lm for _, _, lm in window]
                clip = VideoClip([crop for _, crop, _ in window], None if lms[0] is None else lms)
                box = tuple(int(round(v)) for v in det.box)
                views.append(FaceView(face_id, clip, [RegionJob(WINDOW, box, None, tuple(i for i, _, _ in window))]))
        return views

    def _states(self, frame: Frame, found: list[tuple], ids: list[int], stage: dict[str, float]) -> list[dict]:
        """One `type: "state"` event per face on every state_every-th processed frame."""
        if self.state is None or (self.stats.frames - 1) % self.state_every:
            return []
        t0 = time.perf_counter()
        states = self.state.estimate(frame.image, [det.box for det, _ in found], [lm for _, lm in found], ids)
        ms = round((time.perf_counter() - t0) * 1e3, 3)
        self.stats.states += len(states)
        return [{"type": "state", "frame": frame.index, "timestamp": round(frame.timestamp, 4), "face_id": face_id,
                 "box": [int(round(v)) for v in det.box], **state,
                 "timings_ms": {k: stage[k] for k in ("capture", "detect", "landmarks") if k in stage} | {"state": ms}}
                for face_id, (det, _), state in zip(ids, found, states, strict=True)]

    def _describe(self, frame: Frame, views: list[FaceView], stage: dict[str, float]) -> list[dict[str, Any]]:
        """Describe the due regions of all views in one batch; carry the others over."""
        plan: list[tuple[FaceView, list[Decision]]] = []
        for view in views:
            decided = []
            for job in view.jobs:
                signature = (appearance_signature(frame.image, job.frame_box)
                             if self.scheduler.change_threshold else None)
                due, reason = self.scheduler.due((view.face_id, job.name), frame.index, frame.timestamp, signature)
                if due and job.window and job.window[-1] != frame.index:  # no crop added on this frame
                    due, reason = False, "window_unchanged"
                decided.append(Decision(job, due, reason, signature))
            plan.append((view, decided))
        batch = [ImageRegions(view.image, [d.job.view_box for d in decided if d.due], view.landmarks68)
                 for view, decided in plan if any(d.due for d in decided)]
        keys = [[(view.face_id, d.job.name) for d in decided if d.due] for view, decided in plan
                if any(d.due for d in decided)]
        described = iter(self.pipeline.describe_views(batch, self.prompt, self.options, drafts=self.drafts,
                                                      draft_keys=keys) if batch else [])
        events = []
        for view, decided in plan:
            face_id = view.face_id
            fresh = iter(next(described)) if any(d.due for d in decided) else iter(())
            for decision in decided:
                name, frame_box, reason = decision.job.name, decision.job.frame_box, decision.reason
                key = (face_id, name)
                base = {**self._base(frame, face_id, name, frame_box), **self.weights_note}
                if not decision.due:
                    last = self.scheduler.last(key)
                    if last is None:  # a window not described yet (it filled on a frame that was not due)
                        continue
                    events.append({**base, "text": last["text"], "finish_reason": last["finish_reason"],
                                   **({"state": last["state"]} if "state" in last else {}),
                                   **({"state_error": last["state_error"]} if "state_error" in last else {}),
                                   **({"window_frames": last["window_frames"]} if "window_frames" in last else {}),
                                   "fresh": False, "described_frame": last["frame"], "reason": reason,
                                   "timings_ms": dict(stage)})
                    self.stats.carried += 1
                    continue
                d = next(fresh)
                t = d.timings_ms
                event = {**base, "text": d.text, "finish_reason": d.finish_reason, **d.state_fields(), "fresh": True,
                         "described_frame": frame.index, "reason": reason, "tokens": len(d.token_ids),
                         **({"window_frames": list(decision.job.window)} if decision.job.window else {}),
                         "timings_ms": {**stage, "vision": t["preprocess_and_vision"], "prefill": t["prefill"],
                                        "decode": t["decode"], "total": t["total"], "batch": t.get("batch", 1)}}
                self.scheduler.mark_described(key, frame.index, frame.timestamp, decision.signature)
                self.scheduler.remember(key, event)
                self.stats.fresh += 1
                events.append(event)
        return events

    @staticmethod
    def _base(frame: Frame, face_id: int, name: str, frame_box: tuple) -> dict[str, Any]:
        return {"type": "description", "frame": frame.index, "timestamp": round(frame.timestamp, 4),
                "face_id": face_id, "region": name,
                "box": [int(round(v)) for v in frame_box]}


@dataclass
class FrameEvents:
    """One processed frame and its events, in the order they were produced (each face's state, then the
    descriptions)."""

    frame: Frame
    events: list[dict[str, Any]]

    def annotations(self) -> list[dict[str, Any]]:
        """What this frame's pictures show: boxes, labels and texts from the one builder
        (`annotate.event_annotations`), for `annotate` (run's video, window, MCAP) or `annotate_with_panel`
        (the demo)."""
        return event_annotations(self.events)


def frame_loop(runner: RegionRunner, frames: Iterable[Frame], max_frames: int | None = None) -> Iterator[FrameEvents]:
    """The one frame loop: `focalrt run`, `focalrt demo` and `iter_events` all iterate it, so they see the
    same events for the same frames. Stops when the frames end or after `max_frames` processed frames
    (None or 0: no limit); where the events go is the caller's business."""
    for frame in frames:
        yield FrameEvents(frame, runner.process(frame))
        if max_frames and runner.stats.frames >= max_frames:
            return


def iter_events(runner: RegionRunner, frames: Iterable[Frame],
                on_frame: Callable[[Frame, list[dict[str, Any]]], None] | None = None) -> Iterator[dict[str, Any]]:
    """Events as they are produced, for robotics code that wants a plain iterator: `type` says "state"
    (every frame per face, when the runner has a FaceStateEstimator) or "description" (the VLM's text)."""
    for result in frame_loop(runner, frames):
        if on_frame is not None:
            on_frame(result.frame, result.events)
        yield from result.events


def bundle_face_state(pipeline: Pipeline, smooth: float = 0.0) -> FaceStateEstimator | None:
    """The state estimator of a bundle's face models (emotion and age heads when it has them, geometry and
    head pose always), or None for a bundle without face models."""
    entry = pipeline.bundle.manifest.get("face_models")
    return FaceStateEstimator.from_bundle_entry(pipeline.bundle.path, entry, pipeline.providers, smooth) \
        if entry else None
