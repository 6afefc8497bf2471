"""The real-time loop: frames -> faces -> regions -> descriptions -> events, in two lanes.

The frame lane (`RegionRunner.face_stage`): detect faces, find their landmarks, keep stable face ids, estimate
each face's state, work out each requested region's box from the landmarks, and decide which regions are due.
The description lane: describe the due regions of every face (and every source) in one batch. The model sees
a square crop around each face (so the face fills the encoder's input); region boxes are mapped frame -> crop
-> encoder pixels.

Lock-step (`realtime=False`, files by default): each frame's description stage runs right after its face stage
(`RegionRunner.process`), so a run is complete and reproducible. Real time (`realtime=True`, live sources by
default): the frame lane never waits for the VLM; due regions go to the worker of `lanes.DescriptionLane`,
and their description events come out when they are done, after later frames' states.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
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
from focalrt.runtime.pipeline import Description, GenerationOptions, ImageRegions, Pipeline, VideoClip
from focalrt.runtime.stream.annotate import event_annotations
from focalrt.runtime.stream.inbox import Inbox, SourceSet
from focalrt.runtime.stream.lanes import DescribeRequest, DescriptionLane
from focalrt.runtime.stream.scheduling import RegionScheduler, appearance_signature
from focalrt.runtime.stream.sources import Frame

FIXED_BOX_FACE_ID = 0  # events for --box regions, which belong to no tracked face
WINDOW = "window"  # the region name of a tracked face's video-window descriptions
STOP_TIMEOUT_S = 3.0  # real time, on a stop: how long the batch in flight may take before it is dropped


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

    def add(self, **counts: int) -> None:
        for name, n in counts.items():
            setattr(self, name, getattr(self, name) + n)

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
class FaceJobs:
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


@dataclass
class SourceState:
    """What the frame lane keeps per source: its tracker (so its own face ids), region schedule, video windows,
    state smoothing and counts, and its newest frame (index, timestamp), which late descriptions name."""

    tracker: IoUTracker
    scheduler: RegionScheduler
    state: FaceStateEstimator | None
    windows: dict[int, deque[tuple[int, np.ndarray, np.ndarray | None]]] = field(default_factory=dict)
    window_seen: dict[int, int] = field(default_factory=dict)  # face id -> times seen (for window_stride)
    stats: RunStats = field(default_factory=RunStats)
    last_frame: tuple[int, float] = (0, 0.0)


@dataclass
class FramePlan:
    """The face stage's result for one frame: its state events, each view with the verdict on each region,
    the stage timings so far and the face ids the tracker retired on it."""

    frame: Frame
    source: SourceState
    states: list[dict[str, Any]]
    decisions: list[tuple[FaceJobs, list[Decision]]]
    stage: dict[str, float]
    retired: list[int]


class RegionRunner:
    """Per-run state: the face tracker, the region schedule and the last description of each region, per source.

    With `state` (a FaceStateEstimator), every tracked face also gets a `type: "state"` event every
    `state_every` frames (emotion, age, geometry, head pose); descriptions are `type: "description"`.

    With `video_window` (a bundle with a video encoder), each tracked face keeps its last F face crops (F the
    encoder's frames; one crop every `window_stride` processed frames) and, once it has F, its window is a
    region named "window" that the schedule describes like any other.

    With `realtime`, `frame_loop` runs the description stage on a worker beside the frame lane (module
    docstring); `stop_timeout_s` bounds how long a stop waits for the batch in flight, and `describe_nice`
    lowers the worker's CPU priority (Linux; `lanes.lower_thread_priority`) so the frame lane wins a contended
    core. Frames tagged with a
    `source` (several cameras, `inbox.SourceSet`) each get their own tracker, face ids, schedule and state
    smoothing, and their events say which `source` they come from; one model describes them all.
    `face_providers` and `face_threads` place the face models this runner loads (default: the pipeline's
    providers, ONNX Runtime's threads).
    """

    def __init__(self, pipeline: Pipeline, regions: str | list[str] | None = None,
                 boxes: list[tuple[int, int, int, int]] | None = None, every: int = 1,
                 min_interval_s: float = 0.0, change_threshold: float | None = None,
                 prompt: str | None = None, max_new_tokens: int | None = None,
                 faces: FaceAnalyzer | None = None, state: FaceStateEstimator | None = None,
                 state_every: int = 1, draft: str = "off", schema: Any = None, video_window: bool = False,
                 window_stride: int = 1, realtime: bool = False, stop_timeout_s: float = STOP_TIMEOUT_S,
                 face_providers: list[str] | None = None, face_threads: int | None = None,
                 describe_nice: int | None = None):
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
        if not self.regions and not self.boxes and state is None and not video_window:
            raise ValueError("nothing to describe: give --regions (e.g. mouth,eyes), --box x1,y1,x2,y2 and/or "
                             "--video-window")
        if (self.regions or state is not None or video_window) and faces is None:
            entry = pipeline.bundle.manifest.get("face_models")
            if not entry:
                raise ValueError(f"bundle {pipeline.bundle.path} has no face models, so named regions cannot be "
                                 f"found; re-export it without --no-face-models, or use --box")
            faces = FaceAnalyzer.from_dir(pipeline.bundle.path, entry, face_providers or pipeline.providers,
                                          threads=face_threads, spinning=not realtime)
        self.faces = faces
        if state_every < 1:
            raise ValueError(f"state_every must be >= 1, got {state_every}")
        self.state, self.state_every = state, state_every
        self.schedule = {"every": every, "min_interval_s": min_interval_s, "change_threshold": change_threshold}
        self.change_threshold = RegionScheduler(**self.schedule).change_threshold  # validates the schedule now
        self.sources: dict[int | None, SourceState] = {}
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.options = GenerationOptions(max_new_tokens=max_new_tokens, schema=schema)
        if schema is not None:
            pipeline.grammar(schema)  # compiled now: a schema llguidance rejects fails before any frame is read
        self.stats = RunStats()
        self.drafts = Drafts(draft)  # "temporal": each (face, region) drafts from its last description
        # A random-weight bundle's text is gibberish by design: its description events say so themselves.
        self.weights_note = {"random_weights": True} if has_random_weights(pipeline.bundle.manifest) else {}
        if stop_timeout_s < 0:
            raise ValueError(f"stop_timeout_s must be >= 0, got {stop_timeout_s}")
        self.realtime, self.stop_timeout_s, self.describe_nice = realtime, stop_timeout_s, describe_nice
        self.lane: DescriptionLane | None = None  # real time: the description lane of the running frame_loop

    # ---- per source -------------------------------------------------------------------------------------

    def source_state(self, source: int | None) -> SourceState:
        """A source's tracker, schedule and counts, made on its first frame (the first source uses `state`
        itself, the others a sibling with its own smoothing)."""
        if source not in self.sources:
            state = self.state.sibling() if self.state is not None and self.sources else self.state
            self.sources[source] = SourceState(IoUTracker(), RegionScheduler(**self.schedule), state)
        return self.sources[source]

    @staticmethod
    def face_key(source: int | None, face_id: int) -> Hashable:
        """How drafts and the description lane name a face: its id, or (source, id) among several sources."""
        return face_id if source is None else (source, face_id)

    def _count(self, src: SourceState, **counts: int) -> None:
        self.stats.add(**counts)
        src.stats.add(**counts)

    # ---- lock-step ---------------------------------------------------------------------------------------

    def process(self, frame: Frame) -> list[dict[str, Any]]:
        """Lock-step events for one frame: its states, then one event per (face, region), fresh or carried over
        from an earlier frame. Every due region of every face goes into one batched call, so they share each
        decode step."""
        plan = self.face_stage(frame)
        events = plan.states + self.description_stage(plan)
        self._count(plan.source, events=len(events))
        return events

    def face_stage(self, frame: Frame) -> FramePlan:
        """The frame lane's work on one frame: faces, ids, states, region boxes and crops, and which regions
        are due. Never calls the VLM."""
        src = self.source_state(frame.source)
        image = frame.image
        stage: dict[str, float] = {"capture": frame.capture_ms}
        self._count(src, frames=1)
        src.last_frame = (frame.index, frame.timestamp)
        views: list[FaceJobs] = []
        if self.boxes:
            h, w = image.shape[:2]
            jobs = []
            for i, box in enumerate(self.boxes):
                box = fit_box(box, w, h)
                jobs.append(RegionJob(f"box{i}" if len(self.boxes) > 1 else "box", box, box))
            views.append(FaceJobs(FIXED_BOX_FACE_ID, image, jobs))
        states: list[dict[str, Any]] = []
        retired: list[int] = []
        if self.regions or self.state is not None or self.video_window:
            face_views, states, retired = self._face_views(frame, src, stage)
            views += face_views
        return FramePlan(frame, src, states, self._decide(frame, src, views), stage, retired)

    def _face_views(self, frame: Frame, src: SourceState,
                    stage: dict[str, float]) -> tuple[list[FaceJobs], list[dict[str, Any]], list[int]]:
        """Detect, landmark and track faces; one square crop per face with its regions' boxes in it, the
        faces' state events when they are due, and the face ids retired on this frame."""
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
        ids = src.tracker.update([det.box for det, _ in found])
        retired = list(src.tracker.retired)
        for gone in retired:
            src.scheduler.forget_face(gone)
            src.windows.pop(gone, None)
            src.window_seen.pop(gone, None)
        if not found:
            self._count(src, frames_without_face=1)
            return [], [], retired
        self._count(src, faces=len(found))
        states = self._states(frame, src, found, ids, stage)
        views = self._window_views(frame, src, found, ids) if self.video_window else []
        if not self.regions:
            return views, states, retired
        size = self.pipeline.image_size
        for face_id, (det, points) in zip(ids, found, strict=True):
            frame_boxes = [region_box(name, points, image.shape) for name in self.regions]
            face = crop_face(image, det.box, size, frame_boxes,
                             to_68(points) if self.pipeline.adapter.uses_landmarks else None)
            jobs = [RegionJob(name, frame_box, crop_box)
                    for name, frame_box, crop_box in zip(self.regions, frame_boxes, face.boxes, strict=True)]
            views.append(FaceJobs(face_id, face.image, jobs, face.landmarks68))
        return views, states, retired

    def _window_views(self, frame: Frame, src: SourceState, found: list[tuple], ids: list[int]) -> list[FaceJobs]:
        """Add each face's crop to its window (every window_stride-th time the face is seen); one view per
        face whose window is full. The crop is the one the image path sees: the run's square face crop, or
        Face-LLaVA's crop tool's (side (w + h) / 2 from the box corner, 256 px) in `face_crop` region mode."""
        frames = self.pipeline.adapter.video_frames
        tool_crop = self.pipeline.profile.get("region_mode") == "face_crop"
        size = self.pipeline.image_size
        views = []
        for face_id, (det, points) in zip(ids, found, strict=True):
            seen = src.window_seen.get(face_id, 0)
            src.window_seen[face_id] = seen + 1
            window = src.windows.setdefault(face_id, deque(maxlen=frames))
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
                views.append(FaceJobs(face_id, clip, [RegionJob(WINDOW, box, None, tuple(i for i, _, _ in window))]))
        return views

    def _states(self, frame: Frame, src: SourceState, found: list[tuple], ids: list[int],
                stage: dict[str, float]) -> list[dict]:
        """One `type: "state"` event per face on every state_every-th processed frame of its source."""
        if src.state is None or (src.stats.frames - 1) % self.state_every:
            return []
        t0 = time.perf_counter()
        states = src.state.estimate(frame.image, [det.box for det, _ in found], [lm for _, lm in found], ids)
        ms = round((time.perf_counter() - t0) * 1e3, 3)
        self._count(src, states=len(states))
        return [{"type": "state", **self._source_field(frame), "frame": frame.index,
                 "timestamp": round(frame.timestamp, 4), "face_id": face_id,
                 "box": [int(round(v)) for v in det.box], **state,
                 "timings_ms": {k: stage[k] for k in ("capture", "detect", "landmarks") if k in stage} | {"state": ms}}
                for face_id, (det, _), state in zip(ids, found, states, strict=True)]

    def _decide(self, frame: Frame, src: SourceState, views: list[FaceJobs]) -> list[tuple[FaceJobs, list[Decision]]]:
        """The schedule's verdict on every region of every view (the frame lane's choice of due regions)."""
        plan = []
        for view in views:
            decided = []
            for job in view.jobs:
                signature = (appearance_signature(frame.image, job.frame_box)
                             if self.change_threshold else None)
                due, reason = src.scheduler.due((view.face_id, job.name), frame.index, frame.timestamp, signature)
                if due and job.window and job.window[-1] != frame.index:  # no crop added on this frame
                    due, reason = False, "window_unchanged"
                decided.append(Decision(job, due, reason, signature))
            plan.append((view, decided))
        return plan

    def description_stage(self, plan: FramePlan) -> list[dict[str, Any]]:
        """Lock-step: describe the plan's due regions of all views in one batch; carry the others over."""
        frame, src, stage = plan.frame, plan.source, plan.stage
        for gone in plan.retired:
            self.drafts.forget_face(self.face_key(frame.source, gone))
        due_views = [(view, decided) for view, decided in plan.decisions if any(d.due for d in decided)]
        batch = [ImageRegions(view.image, [d.job.view_box for d in decided if d.due], view.landmarks68)
                 for view, decided in due_views]
        keys = [[(self.face_key(frame.source, view.face_id), d.job.name) for d in decided if d.due]
                for view, decided in due_views]
        described = iter(self.pipeline.describe_images(batch, self.prompt, self.options, drafts=self.drafts,
                                                      draft_keys=keys) if batch else [])
        events = []
        for view, decided in plan.decisions:
            face_id = view.face_id
            fresh = iter(next(described)) if any(d.due for d in decided) else iter(())
            for decision in decided:
                name, frame_box, reason = decision.job.name, decision.job.frame_box, decision.reason
                key = (face_id, name)
                base = {**self._base(frame, face_id, name, frame_box), **self.weights_note}
                if not decision.due:
                    last = src.scheduler.last(key)
                    if last is None:  # a window not described yet (it filled on a frame that was not due)
                        continue
                    events.append({**base, "text": last["text"], "finish_reason": last["finish_reason"],
                                   **({"state": last["state"]} if "state" in last else {}),
                                   **({"state_error": last["state_error"]} if "state_error" in last else {}),
                                   **({"window_frames": last["window_frames"]} if "window_frames" in last else {}),
                                   "fresh": False, "described_frame": last["frame"], "reason": reason,
                                   "timings_ms": dict(stage)})
                    self._count(src, carried=1)
                    continue
                event = self.fresh_event(base, next(fresh), reason, decision.job.window, stage)
                src.scheduler.mark_described(key, frame.index, frame.timestamp, decision.signature)
                src.scheduler.remember(key, event)
                self._count(src, fresh=1)
                events.append(event)
        return events

    @staticmethod
    def fresh_event(base: dict[str, Any], d: Description, reason: str, window: tuple[int, ...] | None,
                    stage: dict[str, float], late: dict[str, Any] | None = None,
                    queue_ms: float | None = None) -> dict[str, Any]:
        """A new description's event; `late` (real time: emitted_frame, emitted_timestamp, latency_ms) goes
        before the timings, and `queue_ms` (how long it waited for the worker) into them."""
        t = d.timings_ms
        return {**base, "text": d.text, "finish_reason": d.finish_reason, **d.state_fields(), "fresh": True,
                "described_frame": base["frame"], "reason": reason, "tokens": len(d.token_ids),
                **({"window_frames": list(window)} if window else {}), **(late or {}),
                "timings_ms": {**stage, **({"queue": queue_ms} if queue_ms is not None else {}),
                               "vision": t["preprocess_and_vision"], "prefill": t["prefill"],
                               "decode": t["decode"], "total": t["total"], "batch": t.get("batch", 1)}}

    @staticmethod
    def _source_field(frame: Frame) -> dict[str, Any]:
        return {} if frame.source is None else {"source": frame.source}

    @classmethod
    def _base(cls, frame: Frame, face_id: int, name: str, frame_box: tuple) -> dict[str, Any]:
        return {"type": "description", **cls._source_field(frame), "frame": frame.index,
                "timestamp": round(frame.timestamp, 4), "face_id": face_id, "region": name,
                "box": [int(round(v)) for v in frame_box]}

    # ---- real time ---------------------------------------------------------------------------------------

    def start_lane(self, on_ready: Callable[[], None] | None = None) -> DescriptionLane:
        """Start the description lane's worker; from now until stop_lane only it calls the pipeline."""
        self.lane = DescriptionLane(self.pipeline, self.prompt, self.options, self.drafts, on_ready,
                                    self.describe_nice).start()
        return self.lane

    def stop_lane(self) -> None:
        """Stop the worker: pending requests are dropped, the batch in flight gets stop_timeout_s to finish
        (take_described() then still returns it) or is dropped; the lane's stats count both."""
        if self.lane is not None:
            self.lane.stop(self.stop_timeout_s)

    def realtime_step(self, frame: Frame) -> FrameEvents:
        """The frame lane on one frame in real time: its face stage, its due regions handed to the description
        lane (each replacing its region's pending request), and its events: the frame's states, then the
        descriptions finished since the last step. The picture shows each region's latest description."""
        plan = self.face_stage(frame)
        src = plan.source
        self.lane.forget_faces([self.face_key(frame.source, gone) for gone in plan.retired])
        requests = []
        for view, decided in plan.decisions:
            face_key = self.face_key(frame.source, view.face_id)
            for d in decided:
                if not d.due:
                    continue
                key = (view.face_id, d.job.name)
                src.scheduler.mark_described(key, frame.index, frame.timestamp, d.signature)  # asked for now
                context = {"source": frame.source, "key": key, "window": d.job.window, "stage": dict(plan.stage),
                           "captured": frame.captured,
                           "base": {**self._base(frame, view.face_id, d.job.name, d.job.frame_box),
                                    **self.weights_note}}
                requests.append(DescribeRequest((face_key, d.job.name), face_key, view.image, d.job.view_box,
                                                view.landmarks68, d.reason, context))
        self.lane.submit(requests)
        self._count(src, events=len(plan.states))
        events = plan.states + self.take_described()
        shown = list(plan.states)
        for view, decided in plan.decisions:
            for d in decided:
                last = src.scheduler.last((view.face_id, d.job.name))
                if last is not None:  # where the region is now, what was last said about it, and how long ago
                    shown.append({**last, "box": [int(round(v)) for v in d.job.frame_box],
                                  "age_s": round(max(0.0, frame.timestamp - last["timestamp"]), 1)})
        return FrameEvents(frame, events, shown)

    def take_described(self) -> list[dict[str, Any]]:
        """Real time: the events of the descriptions finished since the last call, oldest first. Each names
        the frame it describes (`frame`), the newest frame of its source when it was emitted (`emitted_frame`,
        `emitted_timestamp`) and the milliseconds from that frame's capture to now (`latency_ms`)."""
        if self.lane is None:
            return []
        now = time.monotonic()
        events = []
        for done in self.lane.take():
            context = done.request.context
            src = self.sources[context["source"]]
            emitted_frame, emitted_timestamp = src.last_frame
            late = {"emitted_frame": emitted_frame, "emitted_timestamp": round(emitted_timestamp, 4),
                    "latency_ms": round((now - context["captured"]) * 1e3, 1)}
            event = self.fresh_event(context["base"], done.description, done.request.reason, context["window"],
                                     context["stage"], late, round((done.started - done.request.submitted) * 1e3, 3))
            if context["key"] in src.scheduler.described:  # its face is still tracked: the picture shows it
                src.scheduler.remember(context["key"], event)
            self._count(src, fresh=1, events=1)
            events.append(event)
        return events


@dataclass
class FrameEvents:
    """One processed frame and its events, in the order they were produced (each face's state, then the
    descriptions). In real time `frame` is None for descriptions that finished between frames or after the
    last one, and `shown` is what the frame's picture shows: its states and each region's latest description
    (at the region's box on this frame, with its age)."""

    frame: Frame | None
    events: list[dict[str, Any]]
    shown: list[dict[str, Any]] | None = None

    def annotations(self) -> list[dict[str, Any]]:
        """What this frame's pictures show: boxes, labels and texts from the one builder
        (`annotate.event_annotations`), for `annotate` (run's video, window, MCAP) or `annotate_with_panel`
        (the demo)."""
        return event_annotations(self.shown if self.shown is not None else self.events)


def frame_loop(runner: RegionRunner, frames: Iterable[Frame] | SourceSet,
               max_frames: int | None = None) -> Iterator[FrameEvents]:
    """The one frame loop: `focalrt run`, `focalrt demo` and `iter_events` all iterate it, so they see the
    same events for the same frames. Stops when the frames end or after `max_frames` processed frames
    (None or 0: no limit; with several sources, their frames together); where the events go is the caller's
    business. `frames` may be a `SourceSet` of several sources.

    Lock-step (`runner.realtime` False): each frame's states and descriptions, frame by frame.
    Real time: each source is read by its own thread, the frame lane takes whichever frame is ready and never
    waits for the VLM; descriptions come out as they finish (in a FrameEvents of their own, frame None, when
    no frame is ready). At the frames' end every pending description is finished; if the loop is left early
    (closed, Ctrl-C) the lane stops as `RegionRunner.stop_lane` says, and `runner.take_described()` has what
    finished in time.
    """
    if not runner.realtime:
        for frame in frames:
            yield FrameEvents(frame, runner.process(frame))
            if max_frames and runner.stats.frames >= max_frames:
                return
        return
    inbox = Inbox(frames if isinstance(frames, SourceSet) else SourceSet([frames]))
    runner.start_lane(on_ready=inbox.wake)
    try:
        inbox.start()
        for frame in inbox:
            if frame is None:
                described = runner.take_described()
                if described:
                    yield FrameEvents(None, described)
                continue
            yield runner.realtime_step(frame)
            if max_frames and runner.stats.frames >= max_frames:
                break
        while True:  # the frames ended: every pending description is finished, each emitted when ready
            runner.lane.wait()
            described = runner.take_described()
            if described:
                yield FrameEvents(None, described)
            elif not runner.lane.busy():
                break
    finally:
        inbox.close()
        runner.stop_lane()


def iter_events(runner: RegionRunner, frames: Iterable[Frame] | SourceSet,
                on_frame: Callable[[Frame, list[dict[str, Any]]], None] | None = None) -> Iterator[dict[str, Any]]:
    """Events as they are produced, for robotics code that wants a plain iterator: `type` says "state"
    (every frame per face, when the runner has a FaceStateEstimator) or "description" (the VLM's text).
    With a real-time runner a description comes after the states of later frames; its `frame` says which
    frame it describes. `on_frame` sees each frame with the events emitted with it."""
    for result in frame_loop(runner, frames):
        if on_frame is not None and result.frame is not None:
            on_frame(result.frame, result.events)
        yield from result.events


def bundle_face_state(pipeline: Pipeline, smooth: float = 0.0, providers: list[str] | None = None,
                      threads: int | None = None, spinning: bool = True) -> FaceStateEstimator | None:
    """The state estimator of a bundle's face models (emotion and age heads when it has them, geometry and
    head pose always), or None for a bundle without face models. `providers` default to the pipeline's."""
    entry = pipeline.bundle.manifest.get("face_models")
    return FaceStateEstimator.from_bundle_entry(pipeline.bundle.path, entry, providers or pipeline.providers, smooth,
                                                threads, spinning) if entry else None
