"""The description lane: a worker thread that describes regions beside the frame lane, never in its way.

The frame lane (capture, faces, tracking, states, the choice of due regions: `runner.RegionRunner`) hands each
due region to `DescriptionLane.submit` and goes on with the next frame. The worker takes every pending request
at once -- every due region of every face of every source -- and describes them in one
`Pipeline.describe_images` call, so they share each decode step, as a lock-step frame's regions do.

Backpressure: there is one pending slot per key (source, face, region). A region that becomes due again
while the worker is busy replaces its pending request with the newer crop (counted as `superseded`), so
nothing queues beyond one request per tracked region and one batch in flight, however long a decode takes.

The Pipeline is not thread-safe: while the lane runs, only its worker calls it.

Priority: on Linux the worker can lower its own thread's CPU priority (`nice` levels, `focalrt run
--describe-nice`), so when the two lanes want the same core the frame lane gets it first. Off by default: on a
loaded 2-core machine it also hands the core to every other process, and descriptions nearly stop
(docs/benchmarks.md, "Two lanes"). With one description-lane thread (the default up to 3 cores) the whole
decode runs on the worker; with more, ONNX Runtime's pool threads (made when the session loaded) keep the
process's priority.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from focalrt.runtime.generation.drafts import Drafts
from focalrt.runtime.pipeline import Description, GenerationOptions, ImageRegions


@dataclass
class DescribeRequest:
    """One due region: the view the encoder sees, the region's box in it, and what the frame lane needs to
    write its event once described (`context`, opaque here)."""

    key: Hashable  # (face key, region name): one pending request per key
    face_key: Hashable  # the face it belongs to (its requests and drafts are dropped when the face leaves)
    image: Any  # the face crop (np.ndarray) or a VideoClip; a face's regions of one frame share it
    box: tuple | None  # the region's box in the view's pixels (None: the whole view, e.g. a video window)
    landmarks68: np.ndarray | None
    reason: str  # why it is due (the scheduler's: first, interval, changed)
    context: dict[str, Any]
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class Described:
    """A finished request, its description, and when its batch started and ended (time.monotonic())."""

    request: DescribeRequest
    description: Description
    started: float
    finished: float


DESCRIBE_NICE = 0  # default: how many nice levels the worker runs below the frame lane (Linux)


def lower_thread_priority(nice: int) -> bool:
    """Lower the calling thread's CPU priority by `nice` levels. Linux only (where a thread has its own nice
    value); False where it cannot (another OS, or a nice of 0)."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:
        return False
    return True


def new_lane_stats() -> dict[str, int]:
    return {"submitted": 0, "superseded": 0, "described": 0, "batches": 0, "dropped_face_left": 0,
            "dropped_at_stop": 0}


class DescriptionLane:
    """One worker thread over a Pipeline (or RemotePipeline), fed through a keyed newest-request slot.

    Every submitted request ends in exactly one of the counters: described, superseded (a newer crop of the
    same region took its place), dropped_face_left (its face left before its turn) or dropped_at_stop.
    """

    def __init__(self, pipeline: Any, prompt: str | None, options: GenerationOptions, drafts: Drafts,
                 on_ready: Callable[[], None] | None = None, nice: int | None = None):
        self.pipeline, self.prompt, self.options, self.drafts = pipeline, prompt, options, drafts
        self.nice = DESCRIBE_NICE if nice is None else nice  # the worker's priority below the frame lane's
        self.on_ready = on_ready  # called (from the worker) when descriptions are ready to take
        self.cond = threading.Condition()
        self.pending: dict[Hashable, DescribeRequest] = {}
        self.in_flight: list[DescribeRequest] = []
        self.finished: list[Described] = []
        self.forgotten: list[Hashable] = []  # face keys whose drafts the worker drops before its next batch
        self.error: BaseException | None = None
        self.stopping = False
        self.abandoned = False  # stop() gave up on the batch in flight: its results are discarded
        self.stats = new_lane_stats()
        self.thread = threading.Thread(target=self._work, name="focalrt description lane", daemon=True)

    def start(self) -> DescriptionLane:
        self.thread.start()
        return self

    def submit(self, requests: Iterable[DescribeRequest]) -> None:
        """Queue due regions; each replaces the pending request of its key, if any (newest crop wins)."""
        with self.cond:
            for request in requests:
                self.stats["submitted"] += 1
                if self.stopping:
                    self.stats["dropped_at_stop"] += 1
                    continue
                replaced = self.pending.pop(request.key, None)
                if replaced is not None:
                    self.stats["superseded"] += 1
                    if replaced.reason == "first":  # the region has still never been described
                        request.reason = "first"
                self.pending[request.key] = request  # re-inserted: the batch keeps the order regions were due
            self.cond.notify_all()

    def forget_faces(self, face_keys: Iterable[Hashable]) -> None:
        """Faces the tracker retired: drop their pending requests; their drafts go before the next batch."""
        gone = set(face_keys)
        if not gone:
            return
        with self.cond:
            for key in [k for k, r in self.pending.items() if r.face_key in gone]:
                del self.pending[key]
                self.stats["dropped_face_left"] += 1
            self.forgotten += gone

    def take(self) -> list[Described]:
        """The descriptions finished since the last call, oldest first; raises what the worker raised."""
        with self.cond:
            if self.error is not None:
                error, self.error = self.error, None
                raise error
            done, self.finished = self.finished, []
        return done

    def busy(self) -> bool:
        with self.cond:
            return bool(self.pending or self.in_flight)

    def wait(self) -> None:
        """Wait until descriptions are ready to take, or nothing is pending or in flight any more."""
        with self.cond:
            while (not self.finished and (self.pending or self.in_flight) and self.error is None
                   and self.thread.is_alive()):
                self.cond.wait(1.0)

    def stop(self, timeout_s: float) -> None:
        """Take no more requests: pending ones are dropped, the batch in flight gets `timeout_s` seconds to
        finish (its descriptions can then still be taken) or is dropped; both counted in dropped_at_stop."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self.cond:
            self.stopping = True
            self.stats["dropped_at_stop"] += len(self.pending)
            self.pending.clear()
            self.cond.notify_all()
            while self.in_flight and (left := deadline - time.monotonic()) > 0:
                self.cond.wait(left)
            if self.in_flight:
                self.stats["dropped_at_stop"] += len(self.in_flight)
                self.in_flight = []
                self.abandoned = True
        if self.abandoned:
            # Its results are discarded, but the worker is inside ONNX Runtime until its batch ends: a process
            # that exits under it has ONNX Runtime torn down mid-run (and aborts). Exit waits for it instead.
            atexit.register(self.thread.join)
        elif self.thread.is_alive():
            self.thread.join(timeout=1.0)

    def _work(self) -> None:
        lower_thread_priority(self.nice)
        while True:
            with self.cond:
                while not self.pending and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                batch = list(self.pending.values())
                self.pending.clear()
                self.in_flight = batch
                forgotten, self.forgotten = self.forgotten, []
            for face_key in forgotten:
                self.drafts.forget_face(face_key)
            started = time.monotonic()
            try:
                descriptions = self._describe(batch)
            except BaseException as e:  # handed to the frame lane, which raises it from take()
                with self.cond:
                    self.error = e
                    self.in_flight = []
                    self.cond.notify_all()
                self._ready()
                return
            finished = time.monotonic()
            with self.cond:
                if self.abandoned:
                    return
                self.finished += [Described(r, d, started, finished) for r, d in zip(batch, descriptions, strict=True)]
                self.stats["described"] += len(batch)
                self.stats["batches"] += 1
                self.in_flight = []
                self.cond.notify_all()
            self._ready()

    def _describe(self, batch: list[DescribeRequest]) -> list[Description]:
        """One describe_images call: requests sharing a view (a face's regions of one frame) share its encoder
        pass; descriptions come back in request order."""
        views: list[ImageRegions] = []
        keys: list[list[Hashable]] = []
        where: list[tuple[int, int]] = []
        index: dict[int, int] = {}
        for request in batch:
            i = index.setdefault(id(request.image), len(views))
            if i == len(views):
                views.append(ImageRegions(request.image, [], request.landmarks68))
                keys.append([])
            views[i].boxes.append(request.box)
            keys[i].append(request.key)
            where.append((i, len(keys[i]) - 1))
        described = self.pipeline.describe_images(views, self.prompt, self.options, drafts=self.drafts,
                                                  draft_keys=keys)
        return [described[i][j] for i, j in where]

    def _ready(self) -> None:
        if self.on_ready is not None:
            self.on_ready()
