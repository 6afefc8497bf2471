"""A bundle served on Triton Inference Server through PyTriton: models `describe` and `faces`.

Triton's dynamic batcher gathers requests from many clients; `describe` hands all of a batch's images and
regions to one `Pipeline.describe_images` call, so they share every decode step. Malformed requests never reach
the model: each gets its own `error` output while the rest of the batch is answered. If the merged call still
fails (something only the model can find, e.g. a prompt longer than the context), the batch is split and each
request runs alone, so one bad request costs only its own answer.

The Pipeline is not thread-safe: one lock serialises every call into it (and one into the face models).
Nothing here writes files or loads anything named by a request.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from focalrt.runtime.faces.crops import crop_face
from focalrt.runtime.faces.detection import FaceAnalyzer
from focalrt.runtime.faces.landmarks68 import to_68
from focalrt.runtime.faces.regions import region_box
from focalrt.runtime.generation.grammar import GrammarError
from focalrt.runtime.pipeline import Pipeline, parse_state
from focalrt.serve.gate import DEFAULT_MAX_REQUEST_BYTES, start_gate
from focalrt.serve.process import free_ports
from focalrt.serve.requests import (
    DescribeRequest,
    Limits,
    RequestError,
    decode_describe,
    decode_image,
    decode_window,
    is_window,
)

log = logging.getLogger(__name__)

NO_FACE = -1  # face_id of a result for a box the client gave (not a detected face)
WINDOW = "window"  # region of a video window's result (as in a local run's events)


@dataclass
class BatchStats:
    """How many requests each call into the model received: Triton's batches as the model saw them."""
    sizes: Counter = field(default_factory=Counter)
    requests: int = 0
    errors: int = 0
    splits: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())}, "requests": self.requests,
                "errors": self.errors, "batch_splits": self.splits}


def _bytes_array(items: list[str]) -> np.ndarray:
    return np.array([[s.encode() for s in items]], dtype=object).reshape(1, len(items))


# PyTriton 0.7 cannot send a zero-size tensor (its shared-memory copy fails on a zero in the shape), so a
# response with no results carries one placeholder row and `count` says how many rows are real.
def _error_response(message: str) -> dict[str, np.ndarray]:
    return {"count": np.zeros((1, 1), np.int64), "text": _bytes_array([""]), "token_ids": np.full((1, 1, 1), -1),
            "finish_reason": _bytes_array([""]), "region": _bytes_array([""]),
            "face_id": np.full((1, 1), NO_FACE, np.int64), "box": np.zeros((1, 1, 4), np.int64),
            "timings": _bytes_array(["{}"]), "state": _bytes_array(["{}"]),
            "error": np.array([[message.encode()]], dtype=object)}


class DescribeModel:
    """The `describe` inference callable: a list of Triton requests in, one response dict per request out."""

    def __init__(self, pipeline: Pipeline, faces: FaceAnalyzer | None, limits: Limits, lock: threading.Lock,
                 face_lock: threading.Lock):
        self.pipeline = pipeline
        self.faces = faces
        self.limits = limits
        self.lock = lock
        self.face_lock = face_lock
        self.stats = BatchStats()
        # A runtime that compiles schemas (Pipeline.grammar, llguidance) decodes them; each distinct schema is
        # compiled once and kept in the Pipeline's SchemaCache.
        self.schema_supported = callable(getattr(pipeline, "grammar", None))
        # frames of a video window: what the bundle's video encoder takes (0: no video encoder)
        self.window_frames = int(getattr(pipeline.adapter, "video_frames", 0)) if pipeline.video is not None else 0

    def __call__(self, requests: list) -> list[dict[str, np.ndarray]]:
        try:
            return self._answer(requests)
        except Exception as e:  # a bug of ours: every request still gets one answer, and no traceback
            log.exception("describe: batch of %d failed", len(requests))
            return [_error_response(f"internal server error ({type(e).__name__}); see the server log")
                    for _ in requests]

    def _answer(self, requests: list) -> list[dict[str, np.ndarray]]:
        t_batch = time.perf_counter()
        self.stats.sizes[len(requests)] += 1
        self.stats.requests += len(requests)
        responses: list[dict[str, np.ndarray] | None] = [None] * len(requests)
        jobs: list[tuple[int, DescribeRequest, list[tuple]]] = []  # (index, request, views)
        for i, request in enumerate(requests):
            try:
                if is_window(request.data):
                    req = decode_window(request.data, self.limits, self.window_frames)
                else:
                    req = decode_describe(request.data, self.limits, self.schema_supported, self.faces is not None)
                if req.schema is not None:
                    self._compile(req.schema)
                jobs.append((i, req, self._views(req)))
            except RequestError as e:
                responses[i] = _error_response(str(e))
            except Exception as e:  # never let one request's surprise fail its neighbours
                log.exception("describe: request %d could not be prepared", i)
                responses[i] = _error_response(f"the server could not prepare this request: {e}")
        groups: dict[tuple, list] = {}
        for job in jobs:  # one describe_images call per (prompt, max tokens); schemas are per row (one matcher each)
            req = job[1]
            groups.setdefault((req.prompt, req.max_new_tokens), []).append(job)
        for group in groups.values():
            for i, response in self._run_group(group, t_batch).items():
                responses[i] = response
        self.stats.errors += sum(1 for r in responses if r is not None and r["error"][0, 0])
        return responses  # type: ignore[return-value]

    def _views(self, req: DescribeRequest) -> list[tuple]:
        """(image, boxes, landmarks68, [(face_id, region, frame_box)]) per view: the boxes on the whole image,
        then one square face crop per detected face with its named regions, as a local `focalrt run` does; or
        a video window as one view with one row, the whole clip (region "window")."""
        if req.window is not None:
            return [(req.window, [None], None, [(NO_FACE, WINDOW, None)])]
        views = []
        if req.boxes:
            names = [f"box{i}" if len(req.boxes) > 1 else "box" for i in range(len(req.boxes))]
            views.append((req.image, list(req.boxes), req.landmarks68,
                          [(NO_FACE, n, None) for n in names]))  # box: as the model clipped it
        if req.regions:
            with self.face_lock:
                found = self.faces.analyze(req.image)
            size = self.pipeline.image_size
            for face_id, face in enumerate(found):
                frame_boxes = [region_box(name, face.landmarks, req.image.shape) for name in req.regions]
                crop = crop_face(req.image, face.box, size, frame_boxes,
                                 to_68(face.landmarks) if self.pipeline.adapter.uses_landmarks else None)
                meta = [(face_id, name, frame_box) for name, frame_box in zip(req.regions, frame_boxes, strict=True)]
                views.append((crop.image, crop.boxes, crop.landmarks68, meta))
        return views

    def _compile(self, schema: dict[str, Any]) -> None:
        """Compile (once: the Pipeline caches it) or refuse the request's schema, naming what is wrong."""
        try:
            with self.lock:
                self.pipeline.grammar(schema)
        except GrammarError as e:
            raise RequestError(f"input 'schema': schema does not compile: {e}") from None

    def _describe(self, group: list) -> list[list]:
        """One describe_images call for the group. Rows under a schema get their own matcher and their parsed
        `state`, as a local run's do; the other rows of the batch decode freely beside them."""
        views = [(image, boxes, lm) for _, _, vs in group for image, boxes, lm, _ in vs]
        schemas = [req.schema for _, req, vs in group for _, boxes, _, _ in vs for _ in boxes]
        req = group[0][1]
        with self.lock:
            if not views:
                return []
            kwargs = {}
            if any(s is not None for s in schemas):
                kwargs["logits_processors"] = [[self.pipeline.grammar(s).processor()] if s is not None else []
                                               for s in schemas]
            described = self.pipeline.describe_images(views, req.prompt, max_new_tokens=req.max_new_tokens, **kwargs)
            limit = self.pipeline.options(max_new_tokens=req.max_new_tokens).max_new_tokens
        for d, schema in zip((d for per_view in described for d in per_view), schemas, strict=True):
            if schema is not None:
                parse_state(d, limit)
        return described

    def _run_group(self, group: list, t_batch: float) -> dict[int, dict[str, np.ndarray]]:
        try:
            described = self._describe(group)
        except Exception as e:
            if len(group) == 1:
                return {group[0][0]: _error_response(_model_error(e))}
            self.stats.splits += 1  # find the culprit: each request alone
            out = {}
            for job in group:
                out.update(self._run_group([job], t_batch))
            return out
        out, k = {}, 0
        for i, _, views in group:
            results = []
            for *_, meta in views:
                for d, (face_id, name, frame_box) in zip(described[k], meta, strict=True):
                    results.append((face_id, name, frame_box, d))
                k += 1
            out[i] = self._response(results, len(group), t_batch)
        return out

    @staticmethod
    def _response(results: list[tuple], batch_requests: int, t_batch: float) -> dict[str, np.ndarray]:
        if not results:  # named regions only, and no face in the image
            return {**_error_response(""), "error": np.array([[b""]], dtype=object)}
        n = len(results)
        longest = max(1, max(len(d.token_ids) for *_, d in results))
        token_ids = np.full((1, n, longest), -1, np.int64)
        for row, (*_, d) in enumerate(results):
            token_ids[0, row, :len(d.token_ids)] = d.token_ids
        timings = []
        for *_, d in results:
            t = {k: v for k, v in d.timings_ms.items() if k != "decode_steps"}
            t["batch_requests"] = batch_requests
            t["server_ms"] = round((time.perf_counter() - t_batch) * 1e3, 3)
            timings.append(json.dumps(t))
        return {"count": np.array([[n]], np.int64), "text": _bytes_array([d.text for *_, d in results]),
                "token_ids": token_ids,
                "finish_reason": _bytes_array([d.finish_reason for *_, d in results]),
                "region": _bytes_array([name for _, name, _, _ in results]),
                "face_id": np.array([[fid for fid, *_ in results]], np.int64).reshape(1, n),
                "box": np.array([[list(fb) if fb is not None else list(d.box or (0, 0, 0, 0))
                                  for _, _, fb, d in results]],
                                np.int64).reshape(1, n, 4),
                "timings": _bytes_array(timings),
                "state": _bytes_array([json.dumps(d.state_fields()) for *_, d in results]),
                "error": np.array([[b""]], dtype=object)}


def _model_error(e: Exception) -> str:
    if isinstance(e, (ValueError, RequestError)):
        return str(e).replace("shorten --prompt", "shorten the prompt")
    log.error("describe failed: %r", e)
    return f"the model failed on this request ({type(e).__name__}: {e})"


class FacesModel:
    """The `faces` inference callable: detection, landmarks and named-region boxes, no VLM."""

    def __init__(self, faces: FaceAnalyzer, limits: Limits, lock: threading.Lock):
        self.faces = faces
        self.limits = limits
        self.lock = lock

    def __call__(self, requests: list) -> list[dict[str, np.ndarray]]:
        return [self._one(r.data) for r in requests]

    def _one(self, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from focalrt.serve.requests import check_regions

        try:
            image = decode_image(request, self.limits)
            names = check_regions(request, self.limits)
            with self.lock:
                found = self.faces.analyze(image)
        except RequestError as e:
            found, names, error = [], [], str(e)
        else:
            error = ""
        n, rows = len(found), max(1, len(found))  # one placeholder row when no face (see _error_response)
        region_boxes = np.zeros((1, rows, max(1, len(names)), 4), np.int64)
        boxes, scores = np.zeros((1, rows, 4), np.float32), np.zeros((1, rows), np.float32)
        keypoints, landmarks = np.zeros((1, rows, 6, 2), np.float32), np.zeros((1, rows, 468, 3), np.float32)
        for f, face in enumerate(found):
            boxes[0, f], scores[0, f], keypoints[0, f], landmarks[0, f] = (face.box, face.score, face.keypoints,
                                                                           face.landmarks)
            for r, name in enumerate(names):
                region_boxes[0, f, r] = region_box(name, face.landmarks, image.shape)
        return {"count": np.array([[n]], np.int64), "boxes": boxes, "scores": scores, "keypoints": keypoints,
                "landmarks": landmarks, "region": _bytes_array(names or [""]), "region_boxes": region_boxes,
                "error": np.array([[error.encode()]], dtype=object)}


def describe_tensors() -> tuple[list, list]:
    """Inputs and outputs of `describe` (shapes without the batch dimension)."""
    from pytriton.model_config import Tensor

    inputs = [Tensor(name="image", dtype=bytes, shape=(1,), optional=True),  # absent in a video-window request
              Tensor(name="image_shape", dtype=np.int64, shape=(2,), optional=True),
              Tensor(name="video_frames", dtype=bytes, shape=(-1,), optional=True),
              Tensor(name="video_landmarks68", dtype=np.float32, shape=(-1, 68, 2), optional=True),
              Tensor(name="boxes", dtype=np.int64, shape=(-1, 4), optional=True),
              Tensor(name="regions", dtype=bytes, shape=(-1,), optional=True),
              Tensor(name="landmarks68", dtype=np.float32, shape=(68, 2), optional=True),
              Tensor(name="prompt", dtype=bytes, shape=(1,), optional=True),
              Tensor(name="schema", dtype=bytes, shape=(1,), optional=True),
              Tensor(name="max_new_tokens", dtype=np.int64, shape=(1,), optional=True)]
    outputs = [Tensor(name="count", dtype=np.int64, shape=(1,)),
               Tensor(name="text", dtype=bytes, shape=(-1,)),
               Tensor(name="token_ids", dtype=np.int64, shape=(-1, -1)),
               Tensor(name="finish_reason", dtype=bytes, shape=(-1,)),
               Tensor(name="region", dtype=bytes, shape=(-1,)),
               Tensor(name="face_id", dtype=np.int64, shape=(-1,)),
               Tensor(name="box", dtype=np.int64, shape=(-1, 4)),
               Tensor(name="timings", dtype=bytes, shape=(-1,)),
               Tensor(name="state", dtype=bytes, shape=(-1,)),
               Tensor(name="error", dtype=bytes, shape=(1,))]
    return inputs, outputs


def faces_tensors() -> tuple[list, list]:
    from pytriton.model_config import Tensor

    inputs = [Tensor(name="image", dtype=bytes, shape=(1,)),
              Tensor(name="image_shape", dtype=np.int64, shape=(2,), optional=True),
              Tensor(name="regions", dtype=bytes, shape=(-1,), optional=True)]
    outputs = [Tensor(name="count", dtype=np.int64, shape=(1,)),
               Tensor(name="boxes", dtype=np.float32, shape=(-1, 4)),
               Tensor(name="scores", dtype=np.float32, shape=(-1,)),
               Tensor(name="keypoints", dtype=np.float32, shape=(-1, 6, 2)),
               Tensor(name="landmarks", dtype=np.float32, shape=(-1, 468, 3)),
               Tensor(name="region", dtype=bytes, shape=(-1,)),
               Tensor(name="region_boxes", dtype=np.int64, shape=(-1, -1, 4)),
               Tensor(name="error", dtype=bytes, shape=(1,))]
    return inputs, outputs


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 16
    queue_delay_us: int = 2000
    exit_timeout_s: int = 30
    limits: Limits = field(default_factory=Limits)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # the gate's limit on what one request may declare


def warm_up(pipeline: Pipeline, faces: FaceAnalyzer | None) -> float:
    """One short description and one face pass before Triton starts, so `ready` means warm. Returns ms."""
    import focalrt.data

    t0 = time.perf_counter()
    image = cv2.imread(str(Path(focalrt.data.__file__).parent / "astronaut.jpg"))
    h, w = image.shape[:2]
    pipeline.describe_images([(image, [(w // 4, h // 4, w // 2, h // 2)], None)], max_new_tokens=2)
    if faces is not None:
        faces.analyze(image)
    return (time.perf_counter() - t0) * 1e3


def serve(pipeline: Pipeline, faces: FaceAnalyzer | None, options: ServeOptions,
          on_ready: Callable[[Any], None] | None = None, stop: threading.Event | None = None) -> BatchStats:
    """Bind `describe` (and `faces` when the bundle has face models) and serve until Triton stops.

    `stop` set from another thread (the SIGTERM handler) stops Triton, which first stops taking requests and
    waits for the ones in flight (up to exit_timeout_s), then the call returns.
    """
    from pytriton.model_config import DynamicBatcher, ModelConfig
    from pytriton.triton import Triton, TritonConfig

    # HTTP goes through the gate (focalrt/serve/gate.py): Triton's own HTTP endpoint is on a private loopback
    # port, so no request reaches Triton's parser before its declared shapes were checked against its body.
    triton_http_port = free_ports(1)[0]
    gate = start_gate(options.host, options.http_port, triton_http_port, options.max_request_bytes)
    config = TritonConfig(http_address="127.0.0.1", grpc_address=options.host, metrics_address=options.host,
                          http_port=triton_http_port, grpc_port=options.grpc_port,
                          metrics_port=options.metrics_port, allow_metrics=True, allow_cpu_metrics=True,
                          allow_gpu_metrics=pipeline.device == "cuda", strict_readiness=True,
                          exit_timeout_secs=options.exit_timeout_s, allow_sagemaker=False, allow_vertex_ai=False)
    lock, face_lock = threading.Lock(), threading.Lock()
    describe = DescribeModel(pipeline, faces, options.limits, lock, face_lock)
    batcher = DynamicBatcher(max_queue_delay_microseconds=options.queue_delay_us)
    triton = Triton(config=config)
    try:
        inputs, outputs = describe_tensors()
        triton.bind("describe", describe, inputs=inputs, outputs=outputs,
                    config=ModelConfig(max_batch_size=options.max_batch, batcher=batcher), strict=True)
        if faces is not None:
            inputs, outputs = faces_tensors()
            triton.bind("faces", FacesModel(faces, options.limits, face_lock), inputs=inputs, outputs=outputs,
                        config=ModelConfig(max_batch_size=options.max_batch, batcher=batcher), strict=True)
        triton.run()  # returns once the server is up and the models are loaded (ready)
        if on_ready is not None:
            on_ready(triton)
        stop = stop or threading.Event()
        while triton.is_alive() and not stop.wait(0.5):
            pass
    finally:
        try:
            triton.stop()  # SIGINT to tritonserver: no new requests, in-flight ones finish (exit_timeout_s)
        finally:
            gate.shutdown()  # after Triton: the answers of the drained requests still go out through it
            gate.server_close()
    return describe.stats
