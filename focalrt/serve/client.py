"""A thin client for `focalrt serve` (Triton, KServe v2 over HTTP) built on tritonclient, and a stand-in for
Pipeline that lets `focalrt run --server URL` describe regions remotely while faces are found locally.

tritonclient is imported only when a client is made, so the runtime keeps its lean install.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from focalrt.bundle import load
from focalrt.runtime.backends.sessions import resolve_providers
from focalrt.runtime.models.adapters import adapter_for
from focalrt.runtime.pipeline import Description


class ServeError(RuntimeError):
    """The server answered this request with an error (the message is the server's)."""


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
        """Send every request at once (so the server can batch them); answers in order. With raise_errors=False
        a failed request's entry is its ServeError instead of a list of results."""
        pending = [self.client.async_infer("describe", self.describe_inputs(**r)) for r in requests]
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
    count = int(result.as_numpy("count").reshape(-1)[0])  # rows past count are placeholders
    return [Result(region=names[i].decode(), face_id=int(face_ids[i]), box=tuple(int(v) for v in boxes[i]),
                   text=texts[i].decode(), token_ids=[int(t) for t in tokens[i] if t >= 0],
                   finish_reason=finish[i].decode(), timings_ms=json.loads(timings[i]))
            for i in range(count)]


class RemotePipeline:
    """What RegionRunner needs from a Pipeline, with describe_views sent to a server.

    Only the bundle's manifest and face models are read here (faces, landmarks and tracking stay on the camera
    side, exactly as in a local run); the VLM runs on the server, one request per face crop, all in flight at
    once so the server batches them.
    """

    def __init__(self, bundle_path: str | Path, url: str, provider: str | None = None):
        self.bundle = load(bundle_path)
        self.adapter = adapter_for(self.bundle.manifest)
        self.providers = resolve_providers(provider)
        self.client = ServerClient(url)
        if not self.client.is_ready():
            raise RuntimeError(f"no focalrt server is ready at {url} (GET /v2/models/describe/ready failed); "
                               f"start one with `focalrt serve BUNDLE` or fix --server")

    @property
    def image_size(self) -> int:
        return self.adapter.image_size

    def describe_views(self, views: list[tuple], prompt: str | None = None, max_new_tokens: Any = None,
                       **unsupported: Any) -> list[list[Description]]:
        # RegionRunner passes GenerationOptions; drafts change only how many decoder calls a description takes,
        # never its tokens, so a server that does not draft gives the same events.
        max_new_tokens = getattr(max_new_tokens, "max_new_tokens", max_new_tokens)
        unsupported.pop("drafts", None)
        unsupported.pop("draft_keys", None)
        if unsupported:
            raise ValueError(f"--server does not pass {sorted(unsupported)} yet")
        requests = [dict(image=image, boxes=[tuple(int(v) for v in b) for b in boxes], prompt=prompt,
                         max_new_tokens=max_new_tokens, landmarks68=lm) for image, boxes, lm in views]
        try:
            answers = self.client.describe_many(requests)
        except ServeError:
            raise
        except Exception as e:  # connection lost, server stopped, timeout: one line, not a traceback
            raise RuntimeError(f"server {self.client.url}: {type(e).__name__}: {str(e)[:300]}") from None
        out = []
        for results in answers:
            out.append([Description(text=r.text, token_ids=r.token_ids, prompt_token_ids=[],
                                    finish_reason=r.finish_reason, box=r.box, model_box=None,
                                    timings_ms=r.timings_ms) for r in results])
        return out

    def close(self) -> None:
        self.client.close()


def open_pipeline(bundle: str | Path, provider: str | None = None, server: str | None = None,
                  threads: int | None = None):
    """A local Pipeline, or with `server` a RemotePipeline that describes on that `focalrt serve`."""
    if server:
        return RemotePipeline(bundle, server, provider=provider)
    from focalrt.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(bundle, provider=provider, threads=threads)
