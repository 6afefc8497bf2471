"""Calibration data taken from the real pipeline: frames -> faces/regions -> prompt -> tensors per component.

The fp32 bundle's own `Pipeline.describe` runs over the given images, folders or videos, and observers
registered on the pipeline (`Pipeline.vision_observers`, `TextModel.observers`) copy what really reaches
each component: the vision encoder's `pixel_values`, and the decoder's inputs at prefill and at chosen
decode steps, with the KV cache contents of that moment. Nothing is synthesised or patched, so the
quantizer sees the activations it will meet.

The decoder's KV inputs are shared [B, kv_heads, max_context, head_dim] buffers. A recorded feed keeps
only the positions in use: its buffers are cut to `total = past + new` positions (zeros beyond the valid
past), which GroupQueryAttention accepts as a buffer of that length. Feeds stay small and valid.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from focalrt.runtime.generation.generate import DecoderInputs

log = logging.getLogger(__name__)

# Decode steps (1 = the first call after prefill) whose decoder inputs are kept per request.
DEFAULT_DECODE_STEPS = (1, 3, 7, 15)
DEFAULT_REGIONS = ("mouth", "left_eye", "right_eye", "brows", "nose", "face")


@dataclass
class Request:
    """One describe call: a frame, the region box in its pixels (None = whole frame) and landmarks."""

    frame_index: int
    image: np.ndarray
    box: tuple[int, int, int, int] | None
    region: str  # a named region, "box" for a sampled box, "frame" for the whole frame, "prompt" (text-only)
    landmarks68: np.ndarray | None = None
    prompt: str | None = None  # text-only bundles: the user prompt (image is None)


@dataclass
class Frames:
    calibration: list[np.ndarray]
    holdout: list[np.ndarray]
    source: str
    frames_read: int
    calibration_sha256: str
    holdout_sha256: str


@dataclass
class Recording:
    vision: list[dict[str, np.ndarray]] = field(default_factory=list)
    decoder: list[dict[str, np.ndarray]] = field(default_factory=list)
    decoder_kind: list[str] = field(default_factory=list)  # "prefill" or "decode:<step>"
    prompt_lengths: list[int] = field(default_factory=list)  # per request, the real prompt's token count
    requests: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        prefill = sum(k == "prefill" for k in self.decoder_kind)
        return {"requests": len(self.requests), "vision_samples": len(self.vision),
                "decoder_samples": len(self.decoder), "decoder_prefill_samples": prefill,
                "decoder_decode_samples": len(self.decoder) - prefill,
                "prompt_tokens": {"min": min(self.prompt_lengths, default=0),
                                  "max": max(self.prompt_lengths, default=0)}}


def frames_sha256(frames: list[np.ndarray]) -> str:
    """Hash of the decoded pixels actually used, in order (the same frames give the same hash)."""
    h = hashlib.sha256()
    for f in frames:
        h.update(str(f.shape).encode())
        h.update(np.ascontiguousarray(f).tobytes())
    return h.hexdigest()


def read_frames(data: str | os.PathLike | int, samples: int, holdout: int, seed: int,
                max_frames: int = 5000, every: int = 1) -> Frames:
    """A seeded, uniform sample of `samples + holdout` frames from any source, split into two sets.

    Frames are drawn by reservoir sampling over the first `max_frames` frames the source gives, so a long
    video is covered end to end and not just its opening seconds. The held-out frames are never used for
    calibration.
    """
    from focalrt.runtime.stream.sources import open_source

    if samples < 1 or holdout < 1:
        raise ValueError(f"--samples and --holdout must both be >= 1 (got {samples} and {holdout}); the gate "
                         f"needs held-out frames and calibration needs at least one frame")
    want = samples + holdout
    rng = np.random.default_rng(seed)
    kept: list[tuple[int, np.ndarray]] = []
    seen = 0
    with open_source(data, every=every) as source:
        name = source.name
        for frame in source:
            if seen >= max_frames:
                break
            if len(kept) < want:
                kept.append((seen, frame.image))
            else:
                j = int(rng.integers(0, seen + 1))
                if j < want:
                    kept[j] = (seen, frame.image)
            seen += 1
    if seen < holdout + 1:
        raise ValueError(f"{name} gave {seen} frame(s); calibration needs at least --holdout {holdout} "
                         f"held-out frames plus one calibration frame. Give more images, a longer video, "
                         f"or a smaller --holdout")
    kept.sort(key=lambda item: item[0])
    order = rng.permutation(len(kept))
    held = sorted(order[:holdout].tolist())
    calib = sorted(order[holdout:].tolist())
    if len(calib) < samples:
        log.warning("%s gave %d frames: calibrating on %d frames instead of --samples %d",
                    name, seen, len(calib), samples)
    calibration = [kept[i][1] for i in calib]
    held_out = [kept[i][1] for i in held]
    return Frames(calibration, held_out, name, seen, frames_sha256(calibration), frames_sha256(held_out))


def read_prompts(path: str | os.PathLike, samples: int, holdout: int, seed: int) -> Frames:
    """Calibration data of a text-only bundle: a UTF-8 text file of prompts, one per paragraph (blank-line
    separated) or, without blank lines, one per line. A seeded split keeps `holdout` of them for the gate."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--data {p}: a text-only bundle calibrates on a UTF-8 text file of prompts ({e})") from None
    blocks = [b.strip() for b in text.split("\n\n")] if "\n\n" in text else [ln.strip() for ln in text.splitlines()]
    prompts = [" ".join(b.split())[:2000] for b in blocks if b.strip()]
    if samples < 1 or holdout < 1 or len(prompts) < holdout + 1:
        raise ValueError(f"--data {p} has {len(prompts)} prompt(s); calibration needs --holdout {holdout} held-out "
                         f"prompts plus at least one (--samples {samples}) to calibrate on")
    order = np.random.default_rng(seed).permutation(len(prompts))
    held = [prompts[i] for i in sorted(order[:holdout].tolist())]
    calib = [prompts[i] for i in sorted(order[holdout:holdout + samples].tolist())]

    def digest(items: list[str]) -> str:
        return hashlib.sha256("\x00".join(items).encode()).hexdigest()

    return Frames(calib, held, str(p), len(prompts), digest(calib), digest(held))


def prompt_requests(prompts: list[str], first_index: int = 0) -> list[Request]:
    return [Request(first_index + i, None, None, "prompt", None, text) for i, text in enumerate(prompts)]


def plan_requests(pipe, frames: list[np.ndarray], seed: int, regions: tuple[str, ...] = DEFAULT_REGIONS,
                  first_index: int = 0) -> list[Request]:
    """One request per frame, as the live pipeline would make it.

    With face models in the bundle: detect faces, take the largest, and describe one named region of it
    (chosen by the seeded generator from `regions`). Without them, or when no face is found: a seeded box
    covering 20-70% of each side of the frame, and every fourth frame the whole frame.
    """
    rng = np.random.default_rng(seed + 1)
    analyzer = _face_analyzer(pipe)
    uses_landmarks = bool(getattr(pipe.adapter, "uses_landmarks", False))
    requests: list[Request] = []
    for i, image in enumerate(frames):
        index = first_index + i
        faces = analyzer.analyze(image) if analyzer is not None else []
        if faces:
            from focalrt.runtime.faces.regions import region_box

            face = max(faces, key=lambda f: float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))
            name = str(regions[int(rng.integers(len(regions)))])
            landmarks68 = None
            if uses_landmarks:
                from focalrt.runtime.faces.landmarks68 import to_68

                landmarks68 = to_68(face.landmarks)
            requests.append(Request(index, image, region_box(name, face.landmarks, image.shape), name,
                                    landmarks68))
            continue
        if uses_landmarks:
            raise ValueError(f"frame {index}: no face found, and this bundle's model needs facial landmarks; "
                             f"calibrate on frames that show a face")
        if i % 4 == 3:
            requests.append(Request(index, image, None, "frame"))
            continue
        h, w = image.shape[:2]
        bw = max(2, int(w * rng.uniform(0.2, 0.7)))
        bh = max(2, int(h * rng.uniform(0.2, 0.7)))
        x1 = int(rng.integers(0, max(1, w - bw)))
        y1 = int(rng.integers(0, max(1, h - bh)))
        requests.append(Request(index, image, (x1, y1, x1 + bw, y1 + bh), "box"))
    return requests


def _face_analyzer(pipe):
    entry = pipe.bundle.manifest.get("face_models")
    if not entry:
        return None
    from focalrt.runtime.faces.detection import FaceAnalyzer

    return FaceAnalyzer.from_dir(pipe.bundle.path, entry, ["CPUExecutionProvider"])


class Recorder:
    """Copies the inputs of the vision encoder and of chosen decoder calls while the pipeline runs."""

    def __init__(self, decode_steps: tuple[int, ...]):
        self.decode_steps = set(decode_steps)
        self.recording = Recording()

    def vision(self, feeds: dict[str, np.ndarray]) -> None:
        self.recording.vision.append({k: np.array(v, copy=True) for k, v in feeds.items()})

    def decoder(self, seen: DecoderInputs) -> None:
        if seen.step == 0 or seen.step in self.decode_steps:
            self.recording.decoder.append(decoder_feed(seen))
            self.recording.decoder_kind.append("prefill" if seen.step == 0 else f"decode:{seen.step}")


def decoder_feed(seen: DecoderInputs) -> dict[str, np.ndarray]:
    """The decoder's inputs for this call, with each KV buffer cut to the positions in use."""
    cache, names = seen.cache, seen.names
    if not cache.on_host:
        raise RuntimeError("calibration records the KV cache from host memory; run it with provider='cpu'")
    past = cache.lengths.copy()
    total = int((past + seen.new_tokens).max())
    feeds = {names.attention_mask: np.array(seen.attention_mask, copy=True),
             names.position_ids: np.array(seen.position_ids, np.int64, copy=True)}
    if names.inputs_embeds is not None:  # a bundle with an embedding component: the decoder takes its output
        feeds[names.inputs_embeds] = np.array(seen.inputs_embeds.numpy(), np.float32, copy=True)
    else:
        feeds[names.token_ids] = np.array(seen.token_ids, np.int64, copy=True)
        if names.image_embeds is not None:
            feeds[names.image_embeds] = np.array(seen.image_embeds.numpy(), np.float32, copy=True)
    if names.logits_to_keep is not None:
        feeds[names.logits_to_keep] = np.array([seen.keep], np.int64)
    rows = slice(cache.start, cache.start + cache.batch)
    for name, arr in zip(names.past, cache.arrays, strict=True):
        kv = np.zeros((cache.batch, arr.shape[1], total, arr.shape[3]), arr.dtype)
        for r, n in enumerate(past):
            kv[r, :, :n] = arr[rows][r, :, :n]
        feeds[name] = kv
    return feeds


@contextmanager
def recording(pipe, decode_steps: tuple[int, ...] = DEFAULT_DECODE_STEPS) -> Iterator[Recorder]:
    """Register the recorder's observers on this pipeline, and take them off again afterwards."""
    recorder = Recorder(decode_steps)
    pipe.vision_observers.append(recorder.vision)
    pipe.model.observers.append(recorder.decoder)
    try:
        yield recorder
    finally:
        pipe.vision_observers.remove(recorder.vision)
        pipe.model.observers.remove(recorder.decoder)


def record(pipe, requests: list[Request], max_new_tokens: int = 16,
           decode_steps: tuple[int, ...] = DEFAULT_DECODE_STEPS, progress: bool = True) -> Recording:
    """Describe every request greedily through the fp32 pipeline and keep what each component received."""
    from tqdm import tqdm

    with recording(pipe, decode_steps) as recorder:
        for req in tqdm(requests, desc="recording calibration inputs", unit="frame", disable=not progress):
            d = pipe.describe(req.image, box=req.box, max_new_tokens=max_new_tokens, temperature=0.0,
                              landmarks68=req.landmarks68, prompt=req.prompt)
            recorder.recording.prompt_lengths.append(len(d.prompt_token_ids))
            recorder.recording.requests.append({"frame": req.frame_index, "region": req.region,
                                                "box": list(req.box) if req.box else None,
                                                "prompt_tokens": len(d.prompt_token_ids),
                                                "generated_tokens": len(d.token_ids)})
    return recorder.recording
