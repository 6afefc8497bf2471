"""A thin client for `focalrt serve` (Triton, KServe v2 over HTTP) built on tritonclient, and a stand-in for
Pipeline that lets `focalrt run --server URL` describe regions remotely while faces are found locally.

tritonclient is imported only when a client is made, so the runtime keeps its lean install.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from focalrt.bundle import load
from focalrt.runtime.backends.sessions import resolve_providers
from focalrt.runtime.generation.grammar import load_schema
from focalrt.runtime.generation.planning import VideoClip
from focalrt.runtime.models.adapters import adapter_for
from focalrt.runtime.pipeline import Description
from focalrt.runtime.stream.sources import backoff_delay

SERVER_TIMEOUT_S = 60.0  # how long `run --server` waits for a starting server's models by default


class ServeError(RuntimeError):
    """The server answered this request with an error (the message is the server's)."""


class ServerLost(RuntimeError):
    """The server went away mid-run and did not come back within the reconnect attempts."""


def _tritonclient_http():
    try:
        import tritonclient.http as httpclient
    except ImportError:
        from focalrt.extras import install_hint

        raise RuntimeError(f"talking to a focalrt server needs tritonclient: {install_hint('client')}") from None
    return httpclient


def parse_url(url: str) -> str:
    """'http://host:8000', 'host:8000' or 'host' -> 'host:port' for tritonclient's HTTP client."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", ""):
        raise ValueError(f"server URL {url!r}: only http://HOST:PORT is supported by this client (Triton's HTTP "
                         f"port, 8000 by default)")
    if not parsed.hostname:
        raise ValueError(f"server URL {url!r} has no host; e.g. http://127.0.0.1:8000")
    return f"{parsed.hostname}:{parsed.port or 8000}"


@dataclass
class Result:
    """One described region, as the server returned it."""
    region: str
    face_id: int
    box: tuple[int, int, int, int]
    text: str
    token_ids: list[int]
    finish_reason: str
    timings_ms: dict[str, Any]
    state_fields: dict[str, Any] = field(default_factory=dict)  # under a schema: {"state": ...} (+ state_error)


def _bytes_input(httpclient, name: str, items: list[bytes], shape: list[int]):
    arr = np.array(items, dtype=object).reshape(shape)
    inp = httpclient.InferInput(name, shape, "BYTES")
    inp.set_data_from_numpy(arr, binary_data=True)
    return inp


def _array_input(httpclient, name: str, arr: np.ndarray, datatype: str):
    inp = httpclient.InferInput(name, list(arr.shape), datatype)
    inp.set_data_from_numpy(arr, binary_data=True)
    return inp


class ServerClient:
    """describe / faces requests to a focalrt server. `concurrency` requests may be in flight at once."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout_s: float = 120.0, concurrency: int = 8):
        self.httpclient = _tritonclient_http()
        self.url = parse_url(url)
        self.client = self.httpclient.InferenceServerClient(self.url, concurrency=concurrency,
                                                           connection_timeout=timeout_s, network_timeout=timeout_s)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_ready(self) -> bool:
        try:
            return bool(self.client.is_server_ready() and self.client.is_model_ready("describe"))
        except Exception:
            return False

    def _image_inputs(self, image: np.ndarray | bytes) -> list:
        h = self.httpclient
        if isinstance(image, (bytes, bytearray)):  # an encoded file (JPEG, PNG, ...)
            return [_bytes_input(h, "image", [bytes(image)], [1, 1])]
        image = np.ascontiguousarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be HxWx3 uint8 BGR or encoded bytes, got {image.dtype} {image.shape}")
        return [_bytes_input(h, "image", [image.tobytes()], [1, 1]),
                _array_input(h, "image_shape", np.array([image.shape[:2]], np.int64), "INT64")]

    def describe_inputs(self, image: np.ndarray | bytes, boxes: list | None = None, regions: list[str] | None = None,
                        prompt: str | None = None, max_new_tokens: int | None = None, schema: Any = None,
                        landmarks68: np.ndarray | None = None) -> list:
        """The request's inputs; raw BGR arrays go as pixels (lossless), bytes as an encoded image file."""
        h = self.httpclient
        inputs = self._image_inputs(image)
        if boxes:
            inputs.append(_array_input(h, "boxes", np.array([boxes], np.int64).reshape(1, -1, 4), "INT64"))
        if regions:
            inputs.append(_bytes_input(h, "regions", [r.encode() for r in regions], [1, len(regions)]))
        if landmarks68 is not None:
            inputs.append(_array_input(h, "landmarks68", np.asarray(landmarks68, np.float32).reshape(1, 68, 2),
                                       "FP32"))
        return inputs + self._option_inputs(prompt, max_new_tokens, schema)

    def window_inputs(self, frames: list[np.ndarray], frames_landmarks68: list[np.ndarray] | None = None,
                      prompt: str | None = None, max_new_tokens: int | None = None, schema: Any = None) -> list:
        """A video window's inputs: its frames (BGR, one size, time order) as raw pixels, and optionally each
        frame's 68 landmarks; the server runs the bundle's video encoder on them."""
        h = self.httpclient
        frames = [np.ascontiguousarray(f) for f in frames]
        if not frames or any(f.shape != frames[0].shape or f.dtype != np.uint8 or f.ndim != 3 for f in frames):
            raise ValueError("a video window is a non-empty list of HxWx3 uint8 BGR frames of one size")
        inputs = [_bytes_input(h, "video_frames", [f.tobytes() for f in frames], [1, len(frames)]),
                  _array_input(h, "image_shape", np.array([frames[0].shape[:2]], np.int64), "INT64")]
        if frames_landmarks68 is not None:
            points = np.asarray(frames_landmarks68, np.float32).reshape(1, len(frames), 68, 2)
            inputs.append(_array_input(h, "video_landmarks68", points, "FP32"))
        return inputs + self._option_inputs(prompt, max_new_tokens, schema)

    def _option_inputs(self, prompt: str | None, max_new_tokens: int | None, schema: Any) -> list:
        h = self.httpclient
        inputs = []
        if prompt is not None:
            inputs.append(_bytes_input(h, "prompt", [prompt.encode()], [1, 1]))
        if schema is not None:
            text = schema if isinstance(schema, str) else json.dumps(schema)
            inputs.append(_bytes_input(h, "schema", [text.encode()], [1, 1]))
        if max_new_tokens is not None:
            inputs.append(_array_input(h, "max_new_tokens", np.array([[max_new_tokens]], np.int64), "INT64"))
        return inputs

    def describe(self, image: np.ndarray | bytes, boxes: list | None = None, regions: list[str] | None = None,
                 **kwargs: Any) -> list[Result]:
        """Describe boxes (image pixels) and/or named regions of every face found. Raises ServeError."""
        return self.describe_many([dict(image=image, boxes=boxes, regions=regions, **kwargs)])[0]

    def describe_many(self, requests: list[dict[str, Any]], raise_errors: bool = True) -> list:
        """Send every request at once (so the server can batch them); answers in order. A request with `frames`
        is a video window (see window_inputs). With raise_errors=False a failed request's entry is its
        ServeError instead of a list of results."""
        pending = [self.client.async_infer("describe", self.window_inputs(**r) if "frames" in r
                                          else self.describe_inputs(**r)) for r in requests]
        out = []
        for p in pending:
            try:
                out.append(parse_describe(p.get_result()))
            except ServeError as e:
                if raise_errors:
                    raise
                out.append(e)
        return out

    def faces(self, image: np.ndarray | bytes, regions: list[str] | None = None) -> list[dict[str, Any]]:
        inputs = self._image_inputs(image)
        if regions:
            inputs.append(_bytes_input(self.httpclient, "regions", [r.encode() for r in regions], [1, len(regions)]))
        result = self.client.infer("faces", inputs)
        error = result.as_numpy("error").reshape(-1)[0]
        if error:
            raise ServeError(error.decode())
        count = int(result.as_numpy("count").reshape(-1)[0])  # rows past count are placeholders
        names = [n.decode() for n in result.as_numpy("region").reshape(-1) if n]
        boxes, scores = result.as_numpy("boxes")[0], result.as_numpy("scores")[0]
        keypoints, landmarks = result.as_numpy("keypoints")[0], result.as_numpy("landmarks")[0]
        region_boxes = result.as_numpy("region_boxes")[0]
        return [{"box": boxes[i].tolist(), "score": float(scores[i]), "keypoints": keypoints[i],
                 "landmarks": landmarks[i], "regions": {n: tuple(region_boxes[i, r].tolist())
                                                        for r, n in enumerate(names)}}
                for i in range(count)]


def parse_describe(result) -> list[Result]:
    error = result.as_numpy("error").reshape(-1)[0]
    if error:
        raise ServeError(error.decode() if isinstance(error, bytes) else str(error))
    texts = result.as_numpy("text").reshape(-1)
    tokens = result.as_numpy("token_ids")[0]
    finish = result.as_numpy("finish_reason").reshape(-1)
    names = result.as_numpy("region").reshape(-1)
    face_ids = result.as_numpy("face_id").reshape(-1)
    boxes = result.as_numpy("box")[0]
    timings = result.as_numpy("timings").reshape(-1)
    states = result.as_numpy("state")  # None from a server older than schema decoding
    states = states.reshape(-1) if states is not None else [b"{}"] * len(texts)
    count = int(result.as_numpy("count").reshape(-1)[0])  # rows past count are placeholders
    return [Result(region=names[i].decode(), face_id=int(face_ids[i]), box=tuple(int(v) for v in boxes[i]),
                   text=texts[i].decode(), token_ids=[int(t) for t in tokens[i] if t >= 0],
                   finish_reason=finish[i].decode(), timings_ms=json.loads(timings[i]),
                   state_fields=json.loads(states[i]))
            for i in range(count)]


class RemotePipeline:
    """What RegionRunner needs from a Pipeline, with describe_images sent to a server.

    Only the bundle's manifest and face models are read here (faces, landmarks and tracking stay on the camera
    side, exactly as in a local run); the VLM runs on the server, one request per face crop or video window,
    all in flight at once so the server batches them.

    Starting: waits up to `timeout_s` for the server's `describe` model to be ready (a server started at the
    same time loads its models for a while after its port opens), saying once that it waits.
    Mid-run: a request the server does not answer (connection refused or reset, timeout) is sent again after
    the same backoff as a lost camera's reconnects (`sources.backoff_delay`), up to `reconnect_attempts`
    times; then ServerLost. `stats` counts outages, retries, reconnects and the regions left undescribed.
    """

    def __init__(self, bundle_path: str | Path, url: str, provider: str | None = None,
                 timeout_s: float = SERVER_TIMEOUT_S, reconnect_attempts: int = 5, backoff_s: float = 0.5):
        self.bundle = load(bundle_path)
        self.adapter = adapter_for(self.bundle.manifest)
        self.providers = resolve_providers(provider)
        self.profile = self.bundle.manifest["prompt"]
        self.reconnect_attempts, self.backoff_s = reconnect_attempts, backoff_s
        self.client = ServerClient(url)
        self.schemas: dict[str, str] = {}  # a --schema / --format json choice -> the JSON text sent
        self.stats = {"requests": 0, "outages": 0, "retries": 0, "reconnects": 0, "undescribed": 0,
                      "waited_for_server_s": 0.0}
        self.wait_ready(url, timeout_s)

    def wait_ready(self, url: str, timeout_s: float) -> None:
        """Return once `describe` is ready; raise RuntimeError naming the fix after `timeout_s` seconds."""
        t0 = time.monotonic()
        said = False
        while not self.client.is_ready():
            waited = time.monotonic() - t0
            if waited >= timeout_s:
                self.client.close()
                within = f" within {timeout_s:g} s" if timeout_s > 0 else ""
                raise RuntimeError(f"no focalrt server is ready at {url}{within} (GET /v2/models/describe/ready "
                                   f"failed); start one with `focalrt serve BUNDLE` or fix --server")
            if not said:
                print(f"focalrt run: waiting for the focalrt server at {url} to load its models (up to "
                      f"{timeout_s:g} s, --server-timeout)", file=sys.stderr, flush=True)
                said = True
            time.sleep(min(0.5, max(0.0, timeout_s - waited)))
        self.stats["waited_for_server_s"] = round(time.monotonic() - t0, 3)

    @property
    def image_size(self) -> int:
        return self.adapter.image_size

    def require_video(self) -> None:
        """Raise, naming the fix, unless the bundle (the server's, which must be the same) has a video encoder."""
        if "video" not in self.bundle.manifest["components"]:
            raise ValueError(f"{self.bundle.path} has no video encoder (components.video): video windows need a "
                             f"Face-LLaVA bundle with a video tower, served and read by the camera alike")

    def grammar(self, schema: Any) -> str:
        """The schema's JSON as sent (dict, file, "face_state", or "profile": the bundle profile's own, else the
        default). The server compiles it once; a schema it refuses fails here, before any frame is read."""
        key = json.dumps(schema, sort_keys=True) if isinstance(schema, dict) else str(schema)
        if key not in self.schemas:
            if schema == "profile":
                schema = self.profile.get("json_schema") or "face_state"
            text = json.dumps(load_schema(schema))
            probe = np.zeros((64, 64, 3), np.uint8)
            self.client.describe(probe, boxes=[(0, 0, 64, 64)], max_new_tokens=1, schema=text)  # ServeError: why
            self.schemas[key] = text
        return self.schemas[key]

    def describe_images(self, views: list[tuple], prompt: str | None = None, max_new_tokens: Any = None,
                        **unsupported: Any) -> list[list[Description]]:
        # RegionRunner passes GenerationOptions; drafts change only how many decoder calls a description takes,
        # never its tokens, so a server that does not draft gives the same events.
        schema = getattr(max_new_tokens, "schema", None) or unsupported.pop("schema", None)
        max_new_tokens = getattr(max_new_tokens, "max_new_tokens", max_new_tokens)
        unsupported.pop("drafts", None)
        unsupported.pop("draft_keys", None)
        if unsupported:
            raise ValueError(f"--server does not pass {sorted(unsupported)}")
        text = self.grammar(schema) if schema is not None else None
        requests = []
        for image, boxes, lm in views:
            if isinstance(image, VideoClip):  # one window per view: the whole clip is the region
                requests.append(dict(frames=image.frames, frames_landmarks68=image.landmarks68, prompt=prompt,
                                     max_new_tokens=max_new_tokens, schema=text))
            else:
                requests.append(dict(image=image, boxes=[tuple(int(v) for v in b) for b in boxes], prompt=prompt,
                                     max_new_tokens=max_new_tokens, landmarks68=lm, schema=text))
        answers = self.send(requests, rows=sum(len(boxes) for _, boxes, _ in views))
        out = []
        for (image, _, _), results in zip(views, answers, strict=True):
            clip = isinstance(image, VideoClip)
            out.append([Description(text=r.text, token_ids=r.token_ids, prompt_token_ids=[],
                                    finish_reason=r.finish_reason, box=None if clip else r.box, model_box=None,
                                    timings_ms=r.timings_ms, constrained=bool(r.state_fields),
                                    state=r.state_fields.get("state"), state_error=r.state_fields.get("state_error"))
                        for r in results])
        return out

    def send(self, requests: list[dict[str, Any]], rows: int) -> list[list[Result]]:
        """describe_many, sent again while the server is away (the camera's backoff); ServerLost at the end."""
        failures = 0
        while True:
            try:
                answers = self.client.describe_many(requests)
            except ServeError:
                raise
            except Exception as e:  # connection refused or reset, timeout: the server is away
                if failures == 0:
                    self.stats["outages"] += 1
                    print(f"focalrt run: server {self.client.url} is not answering ({type(e).__name__}); "
                          f"retrying up to {self.reconnect_attempts} times", file=sys.stderr, flush=True)
                if failures >= self.reconnect_attempts:
                    self.stats["undescribed"] += rows
                    raise ServerLost(f"server {self.client.url} stopped answering ({type(e).__name__}: "
                                     f"{str(e)[:200]}) after {self.reconnect_attempts} reconnect attempts; check "
                                     f"that `focalrt serve` is running and reachable") from None
                time.sleep(backoff_delay(self.backoff_s, failures))
                failures += 1
                self.stats["retries"] += 1
                continue
            self.stats["requests"] += len(requests)
            self.stats["reconnects"] += bool(failures)
            return answers

    def close(self) -> None:
        self.client.close()


def open_pipeline(bundle: str | Path, provider: str | None = None, server: str | None = None,
                  threads: int | None = None, spinning: bool = True, server_timeout_s: float = SERVER_TIMEOUT_S):
    """A local Pipeline, or with `server` a RemotePipeline that describes on that `focalrt serve` (waiting up
    to `server_timeout_s` for its models)."""
    if server:
        return RemotePipeline(bundle, server, provider=provider, timeout_s=server_timeout_s)
    from focalrt.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(bundle, provider=provider, threads=threads, spinning=spinning)
