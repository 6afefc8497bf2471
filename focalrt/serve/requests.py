"""Request decoding and checking for the served models, with no Triton in sight (unit-testable, torch-free).

Every check raises RequestError with a message that names the input, the value and the fix; the server turns
it into that request's `error` output while the other requests of the same batch are answered normally.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from focalrt.runtime.faces.regions import REGIONS, parse_regions
from focalrt.runtime.generation.planning import VideoClip


class RequestError(ValueError):
    """A malformed request; its message goes back to the client as the `error` output."""


@dataclass
class Limits:
    """Per-request limits; the server refuses anything larger with a clear error instead of working on it."""
    max_image_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_boxes: int = 16
    max_prompt_chars: int = 2000
    max_new_tokens: int = 256
    max_schema_chars: int = 16384
    # a video window's frames together are bounded by max_image_bytes too, and there must be exactly as many
    # as the bundle's video encoder takes (checked before any frame is read)


@dataclass
class DescribeRequest:
    image: np.ndarray | None               # HxWx3 uint8 BGR (None for a video window)
    boxes: list[tuple[int, int, int, int]]
    regions: list[str]
    landmarks68: np.ndarray | None
    prompt: str | None
    max_new_tokens: int | None
    schema: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    window: VideoClip | None = None  # a video window request (then image is None): its frames and landmarks


def _one(request: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    """The request's `name` input without its batch dimension, or None when absent; one row per request."""
    value = request.get(name)
    if value is None:
        return None
    value = np.asarray(value)
    if value.ndim == 0 or value.shape[0] != 1:
        raise RequestError(f"input {name!r} has batch size {value.shape[0] if value.ndim else 0}; send one image "
                           f"per request (Triton batches requests together)")
    return value[0]


def _integers(value: np.ndarray, name: str) -> np.ndarray:
    """`value` as int64, refused (naming the input) unless it holds integers: floats, strings or booleans are
    not silently truncated into pixel coordinates or token counts."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise RequestError(f"input {name!r} must hold integers (INT64), got {arr.dtype.name} values")
    return arr.astype(np.int64, copy=False)


def _strings(value: np.ndarray, name: str) -> list[str]:
    """A BYTES input's elements as text, refused (naming the input and element) unless each is UTF-8."""
    out = []
    for i, item in enumerate(np.asarray(value, dtype=object).reshape(-1)):
        if isinstance(item, str):
            out.append(item)
            continue
        if not isinstance(item, bytes):
            raise RequestError(f"input {name!r} element {i} is {type(item).__name__}, not a string")
        try:
            out.append(item.decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError(f"input {name!r} element {i} ({item[:16]!r}) is not UTF-8 text") from None
    return out


def _bytes_scalar(request: dict[str, np.ndarray], name: str) -> bytes | None:
    value = _one(request, name)
    if value is None:
        return None
    item = value.reshape(-1)
    if item.size != 1:
        raise RequestError(f"input {name!r} must hold one BYTES element, got {item.size}")
    item = item[0]
    if isinstance(item, str):
        return item.encode()
    if not isinstance(item, bytes):
        raise RequestError(f"input {name!r} must be BYTES, got a {type(item).__name__}")
    return item


def _text(request: dict[str, np.ndarray], name: str, limit: int) -> str | None:
    raw = _bytes_scalar(request, name)
    if raw is None or raw == b"":
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"input {name!r} is not UTF-8 text") from None
    if len(text) > limit:
        raise RequestError(f"input {name!r} has {len(text)} characters; the server accepts at most {limit}")
    return text


def decode_image(request: dict[str, np.ndarray], limits: Limits) -> np.ndarray:
    """`image` as encoded file bytes (JPEG, PNG, ...), or raw BGR pixels when `image_shape` (H, W) is given."""
    data = _bytes_scalar(request, "image")
    if data is None or not data:
        raise RequestError("input 'image' is missing or empty; send the encoded image file bytes (JPEG/PNG) or "
                           "raw BGR pixels with image_shape=[H, W]")
    if len(data) > limits.max_image_bytes:
        raise RequestError(f"input 'image' has {len(data)} bytes; the server accepts at most {limits.max_image_bytes}")
    shape = _one(request, "image_shape")
    if shape is not None:
        shape = _integers(shape, "image_shape").reshape(-1).tolist()
        if len(shape) != 2 or min(shape) < 1:
            raise RequestError(f"input 'image_shape' must be [height, width] with both >= 1, got {shape}")
        h, w = shape
        if h * w > limits.max_pixels:
            raise RequestError(f"input 'image': an image of {w}x{h} pixels; the server accepts at most "
                               f"{limits.max_pixels} pixels")
        if len(data) != h * w * 3:
            raise RequestError(f"input 'image': a raw BGR image of {w}x{h} needs {h * w * 3} bytes, got {len(data)}; "
                               f"send frame.tobytes() of an HxWx3 uint8 array with image_shape=[H, W]")
        return np.frombuffer(data, np.uint8).reshape(h, w, 3)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise RequestError(f"input 'image': its bytes ({len(data)}, starting {data[:8]!r}) are not a decodable image; "
                           f"send a JPEG/PNG file's bytes, or raw BGR pixels with image_shape=[H, W]")
    if image.shape[0] * image.shape[1] > limits.max_pixels:
        raise RequestError(f"input 'image': an image of {image.shape[1]}x{image.shape[0]} pixels; the server "
                           f"accepts at most {limits.max_pixels} pixels")
    return image


def check_boxes(raw: np.ndarray | None, width: int, height: int, limits: Limits) -> list[tuple[int, int, int, int]]:
    """Boxes x1, y1, x2, y2 in image pixels. A box must overlap the image and have positive size; the part
    outside the frame is clipped later, as a local run does."""
    if raw is None:
        return []
    arr = np.asarray(raw)
    if arr.size == 0:
        return []
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise RequestError(f"input 'boxes' must have shape [N, 4] (x1, y1, x2, y2), got {list(arr.shape)}")
    arr = _integers(arr, "boxes")
    if arr.shape[0] > limits.max_boxes:
        raise RequestError(f"input 'boxes' has {arr.shape[0]} boxes; the server accepts at most {limits.max_boxes} "
                           f"per request")
    boxes = []
    for i, row in enumerate(arr.tolist()):
        x1, y1, x2, y2 = (int(v) for v in row)
        if x2 <= x1 or y2 <= y1:
            raise RequestError(f"input 'boxes': box {i} {[x1, y1, x2, y2]} is empty: need x1 < x2 and y1 < y2")
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            raise RequestError(f"input 'boxes': box {i} {[x1, y1, x2, y2]} lies outside the {width}x{height} image")
        boxes.append((x1, y1, x2, y2))
    return boxes


def check_regions(request: dict[str, np.ndarray], limits: Limits) -> list[str]:
    value = _one(request, "regions")
    if value is None:
        return []
    names = [n for n in _strings(value, "regions") if n]
    if not names:
        return []
    if len(names) > limits.max_boxes:
        raise RequestError(f"input 'regions' has {len(names)} regions; the server accepts at most "
                           f"{limits.max_boxes} per request")
    try:
        return parse_regions(",".join(names))
    except ValueError as e:
        raise RequestError(f"input 'regions': {e} (known regions: {', '.join(REGIONS)})") from None


def check_schema(request: dict[str, np.ndarray], limits: Limits, supported: bool) -> dict[str, Any] | None:
    text = _text(request, "schema", limits.max_schema_chars)
    if text is None:
        return None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"input 'schema': schema does not compile: not JSON ({e.msg} at line {e.lineno} "
                           f"column {e.colno})") from None
    if not isinstance(schema, dict):
        raise RequestError(f"input 'schema': schema does not compile: a JSON Schema is an object, got "
                           f"{type(schema).__name__}")
    if not supported:
        raise RequestError("input 'schema': schema-constrained descriptions are not supported by this server's "
                           "runtime yet; send the request without `schema`")
    return schema


def decode_describe(request: dict[str, np.ndarray], limits: Limits, schema_supported: bool = False,
                    has_faces: bool = True) -> DescribeRequest:
    image = decode_image(request, limits)
    h, w = image.shape[:2]
    boxes = check_boxes(_one(request, "boxes"), w, h, limits)
    regions = check_regions(request, limits)
    if regions and not has_faces:
        raise RequestError("input 'regions': this bundle has no face models, so named regions cannot be found; "
                           "send boxes")
    if not boxes and not regions:
        raise RequestError("nothing to describe: send input 'boxes' [N, 4] and/or input 'regions' (e.g. "
                           "['mouth', 'left_eye'])")
    if len(boxes) + len(regions) > limits.max_boxes:
        raise RequestError(f"inputs 'boxes' and 'regions': {len(boxes)} boxes + {len(regions)} regions; at most "
                           f"{limits.max_boxes} per request")
    lm = _one(request, "landmarks68")
    if lm is not None:
        lm = np.asarray(lm)
        if lm.dtype.kind not in "fiu":
            raise RequestError(f"input 'landmarks68' must hold numbers (FP32), got {lm.dtype.name} values")
        lm = lm.astype(np.float32)
        if lm.shape != (68, 2) or not np.isfinite(lm).all():
            raise RequestError(f"input 'landmarks68' must be 68 finite (x, y) points, got shape {list(lm.shape)}")
    prompt = _text(request, "prompt", limits.max_prompt_chars)
    max_new = _one(request, "max_new_tokens")
    max_new_tokens = None
    if max_new is not None:
        values = _integers(max_new, "max_new_tokens").reshape(-1)
        if values.size != 1:
            raise RequestError(f"input 'max_new_tokens' must hold one integer, got {values.size}")
        max_new_tokens = int(values[0])
        if not 1 <= max_new_tokens <= limits.max_new_tokens:
            raise RequestError(f"input 'max_new_tokens': max_new_tokens={max_new_tokens}; the server accepts "
                               f"1..{limits.max_new_tokens}")
    schema = check_schema(request, limits, schema_supported)
    return DescribeRequest(image, boxes, regions, lm, prompt, max_new_tokens, schema)


def is_window(request: dict[str, np.ndarray]) -> bool:
    """A video-window request: it carries `video_frames` instead of `image`."""
    return request.get("video_frames") is not None


def decode_window(request: dict[str, np.ndarray], limits: Limits, frames: int) -> DescribeRequest:
    """A video window: exactly `frames` raw BGR frames of one size (`video_frames` with `image_shape`), optionally
    `video_landmarks68` [F, 68, 2], and the prompt, schema and max_new_tokens of any request. The frame count
    and the window's total bytes (at most max_image_bytes) are checked before any pixel is read, so a window
    cannot be used to make the server allocate more than one large image would."""
    if frames < 1:
        raise RequestError("input 'video_frames': this bundle has no video encoder, so it cannot describe video "
                           "windows; send an image with boxes or regions")
    if request.get("image") is not None:
        raise RequestError("send either input 'image' or input 'video_frames' (a video window), not both")
    items = np.asarray(_one(request, "video_frames"), dtype=object).reshape(-1)
    if items.size != frames:
        raise RequestError(f"input 'video_frames' has {items.size} frames; this bundle's video encoder takes "
                           f"exactly {frames}")
    if not all(isinstance(item, bytes) for item in items):
        raise RequestError("input 'video_frames' must hold BYTES elements (each frame's raw BGR pixels)")
    total = sum(len(item) for item in items)
    if total > limits.max_image_bytes:
        raise RequestError(f"input 'video_frames' has {total} bytes; the server accepts at most "
                           f"{limits.max_image_bytes} per request (--max-image-bytes)")
    shape = _one(request, "image_shape")
    if shape is None:
        raise RequestError("input 'image_shape' [height, width] is required with 'video_frames' (raw BGR pixels)")
    shape = np.asarray(shape).reshape(-1)
    if shape.dtype.kind not in "iu" or shape.size != 2 or min(shape.tolist()) < 1:
        raise RequestError(f"input 'image_shape' must be [height, width] integers >= 1, got {shape.tolist()}")
    h, w = (int(v) for v in shape)
    if h * w > limits.max_pixels:
        raise RequestError(f"input 'video_frames': frames of {w}x{h} pixels; the server accepts at most "
                           f"{limits.max_pixels} pixels")
    for i, item in enumerate(items):
        if len(item) != h * w * 3:
            raise RequestError(f"input 'video_frames' frame {i}: a raw BGR frame of {w}x{h} needs {h * w * 3} "
                               f"bytes, got {len(item)}; send frame.tobytes() of each HxWx3 uint8 frame")
    pixels = [np.frombuffer(item, np.uint8).reshape(h, w, 3) for item in items]
    landmarks = None
    raw = _one(request, "video_landmarks68")
    if raw is not None:
        lm = np.asarray(raw)
        if lm.dtype.kind not in "fiu" or lm.shape != (frames, 68, 2) or not np.isfinite(lm).all():
            raise RequestError(f"input 'video_landmarks68' must be {frames} x 68 finite (x, y) points, got "
                               f"{lm.dtype.name} {list(lm.shape)}")
        landmarks = list(lm.astype(np.float32))
    prompt = _text(request, "prompt", limits.max_prompt_chars)
    max_new_tokens = check_max_new_tokens(request, limits)
    schema = check_schema(request, limits, supported=True)
    return DescribeRequest(None, [], [], None, prompt, max_new_tokens, schema, window=VideoClip(pixels, landmarks))


def check_max_new_tokens(request: dict[str, np.ndarray], limits: Limits) -> int | None:
    value = _one(request, "max_new_tokens")
    if value is None:
        return None
    values = np.asarray(value).reshape(-1)
    if values.dtype.kind not in "iu" or values.size != 1:
        raise RequestError(f"input 'max_new_tokens' must hold one integer, got {values.tolist()}")
    n = int(values[0])
    if not 1 <= n <= limits.max_new_tokens:
        raise RequestError(f"input 'max_new_tokens': max_new_tokens={n}; the server accepts 1..{limits.max_new_tokens}")
    return n
