"""Stage-by-stage timing of the frame -> faces -> regions -> description pipeline, and its scaling.

Frames go through `focalrt.runtime.stream.runner.RegionRunner`, the loop `focalrt run` uses, so the end-to-end
figures are what a user gets. Its events carry per-stage timings (capture, detect, landmarks, vision,
prefill, decode); a thin recorder around the Pipeline also keeps each Description, for the per-step
decode times. Stages the loop does not split (preprocess vs. vision encoder, detokenizing) are timed on
their own on the very views the loop encoded. The decode-vs-context curve drives `prefill` and
`decode_one_token` directly, with the KV cache filled by a synthetic prompt.

Warm-up frames are processed and thrown away first; every figure records how many runs it covers.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from focalrt.bench.stats import summarize

PEAK_RSS_COVERS = ("the bench process's high-water mark (VmHWM; ru_maxrss where there is no /proc) from its "
                   "start to the end of the run: imports, bundle load, warm-up, timed frames and scaling curves; "
                   "the memory-bandwidth probe runs in a child process and is not in it")

# Per-stage figures, in pipeline order. `vision` is preprocess + encoder as the pipeline times it;
# `preprocess` and `vision_encoder` split it, measured separately on the same views.
STAGES = ("source_decode", "face_detect", "landmarks", "preprocess", "vision_encoder", "vision", "prefill",
          "decode_step", "detokenize", "ttft", "region_end_to_end", "frame_end_to_end")


@dataclass
class Settings:
    runs: int = 20
    warmup: int = 2
    max_new_tokens: int | None = None  # None: the bundle's generation default
    regions: list[str] = field(default_factory=list)
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    contexts: list[int] = field(default_factory=lambda: [64, 256, 1024, 2048])
    context_steps: int = 16  # decode steps timed per context length, per repeat
    region_counts: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    face_counts: list[int] = field(default_factory=lambda: [1, 2, 4])
    scaling_runs: int = 3  # runs per point of the region/face/context curves (they are long)
    scaling_tokens: int = 16  # tokens per region description in the region/face curves
    provider: str | None = None
    threads: int | None = None
    seed: int = 0
    draft: str = "off"  # draft decoding mode (runtime/generation/drafts.py)

    def check(self) -> None:
        if self.runs < 1 or self.warmup < 0:
            raise ValueError(f"--runs must be >= 1 and --warmup >= 0, got {self.runs} and {self.warmup}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("contexts", "region_counts", "face_counts"):
            bad = [v for v in getattr(self, name) if v < 1]
            if bad:
                raise ValueError(f"--{name.replace('_', '-')} values must be >= 1, got {bad}")
        if self.scaling_runs < 1 or self.context_steps < 1 or self.scaling_tokens < 1:
            raise ValueError("--scaling-runs, --context-steps and --scaling-tokens must be >= 1")


# ---------------------------------------------------------------- source


def default_image(tmp_dir: Path) -> tuple[Path, str]:
    """The face photo shipped in the package (focalrt/data/astronaut.jpg) as a PNG; (path, what it is)."""
    from focalrt.demo import PHOTO, demo_photo

    image = demo_photo()
    path = tmp_dir / "bench_source.png"
    cv2.imwrite(str(path), image)
    return path, f"focalrt/data/{PHOTO} ({image.shape[1]}x{image.shape[0]}, shipped with focalrt)"


def read_source(spec: str, count: int) -> tuple[list[Any], str]:
    """`count` Frames, each with its read+decode time; a clip shorter than that is replayed from the start.

    A still image is opened anew for every frame, since the image source decodes it once at open.
    """
    from focalrt.runtime.stream.sources import Frame, classify, open_source

    frames: list[Any] = []
    name = spec
    still = classify(spec)[0] == "image"
    while len(frames) < count:
        got = 0
        t0 = time.perf_counter()
        with open_source(spec, live=False) as src:
            name = src.name
            for frame in src:
                got += 1
                if still:
                    frame = Frame(len(frames), frame.timestamp, frame.image, (time.perf_counter() - t0) * 1e3)
                else:
                    frame = Frame(len(frames), frame.timestamp, frame.image, frame.capture_ms)
                frames.append(frame)
                if len(frames) >= count or still:
                    break
        if got == 0:
            raise ValueError(f"source {spec!r} yielded no frames; check that OpenCV can decode it")
    return frames, name


# ---------------------------------------------------------------- faces


def load_face_analyzer(bundle, providers: list[str]) -> tuple[Any, str | None]:
    """The bundle's face models; else converted now (needs the export extra); else none, with a note."""
    from focalrt.runtime.faces.detection import FaceAnalyzer

    entry = bundle.manifest.get("face_models")
    if entry:
        return FaceAnalyzer.from_dir(bundle.path, entry, providers), None
    try:
        from focalrt.export.face_models import export_face_models
    except ImportError:
        return None, ("the bundle has no face models and the export extra is missing: face stages skipped; "
                      "re-export the bundle without --no-face-models")
    out = Path(tempfile.mkdtemp(prefix="focalrt-bench-faces-"))
    entry = export_face_models(out, full_range=False)
    return FaceAnalyzer.from_dir(out, entry, providers), "the bundle has no face models; converted them for this run"


def fallback_box(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The centre half of the frame, for a source where no face (and no --box) gives a region."""
    h, w = shape[:2]
    return w // 4, h // 4, w - w // 4, h - h // 4


# ---------------------------------------------------------------- model stages


class RecordingPipeline:
    """The Pipeline, unchanged, except that its describe calls also keep what they saw and returned.

    RegionRunner's events carry only stage totals; the Descriptions have the per-step decode times,
    and the views are what the encoder really received (face crops), for the split stage timings.
    """

    def __init__(self, pipeline):
        self._pipeline = pipeline
        self.calls: list[list[Any]] = []  # the Descriptions of each describe call
        self.views: list[tuple[np.ndarray, Any]] = []  # the latest (image, landmarks68) the encoder saw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)

    def describe_regions(self, image, boxes, *args, **kwargs):
        out = self._pipeline.describe_regions(image, boxes, *args, **kwargs)
        self._record([(image, kwargs.get("landmarks68"))], out)
        return out

    def describe_images(self, views, *args, **kwargs):
        out = self._pipeline.describe_images(views, *args, **kwargs)
        self._record([(image, landmarks68) for image, _, landmarks68 in views], [d for group in out for d in group])
        return out

    def _record(self, views: list[tuple[np.ndarray, Any]], descriptions: list[Any]) -> None:
        self.calls.append(descriptions)
        self.views = (self.views + views)[-4:]

    def take(self) -> list[list[Any]]:
        out, self.calls = self.calls, []
        return out


def encode_timed(pipe, view: np.ndarray, landmarks68: np.ndarray | None = None) -> tuple[float, float]:
    """(preprocess ms, vision encoder ms): Pipeline.encode_image split in its two halves."""
    t0 = time.perf_counter()
    inputs = pipe.adapter.vision_inputs(view, landmarks68)
    t1 = time.perf_counter()
    io = pipe.vision.io_binding()
    for name, value in inputs.items():
        io.bind_cpu_input(name, value)
    io.bind_output(pipe.vision.get_outputs()[0].name, pipe.device)
    pipe.vision.run_with_iobinding(io)
    io.get_outputs()
    return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3


def detokenize_ms(tokenizer, token_ids: list[int]) -> float:
    """The streaming detokenizer's cost for one description, replayed on its tokens."""
    from focalrt.runtime.generation.generate import TextStream

    stream = TextStream(tokenizer)
    t0 = time.perf_counter()
    for t in token_ids:
        stream.push(t)
    return (time.perf_counter() - t0) * 1e3


@dataclass
class Bench:
    """A loaded pipeline and face front end: what one `focalrt bench` run measures."""

    pipe: Any  # RecordingPipeline
    analyzer: Any
    settings: Settings
    max_new_tokens: int
    notes: list[str] = field(default_factory=list)
    frames_seen: int = 0

    def runner(self, regions: list[str], boxes: list, max_new_tokens: int):
        from focalrt.runtime.stream.runner import RegionRunner

        return RegionRunner(self.pipe, regions=regions or None, boxes=boxes or None,
                            max_new_tokens=max_new_tokens, faces=self.analyzer, draft=self.settings.draft)

    def process_frame(self, runner, frame, samples: dict[str, list[float]]) -> dict[str, Any]:
        """One frame through RegionRunner, its stage timings added to `samples`.

        Frames are renumbered as they come, so a replayed frame is due for description like a new one.
        """
        from focalrt.runtime.stream.sources import Frame

        self.frames_seen += 1
        frame = Frame(self.frames_seen, float(self.frames_seen), frame.image, frame.capture_ms)
        t0 = time.perf_counter()
        events = runner.process(frame)
        frame_ms = (time.perf_counter() - t0) * 1e3 + frame.capture_ms
        calls = self.pipe.take()
        described = [d for call in calls for d in call]
        samples["source_decode"].append(frame.capture_ms)
        # Face events carry the detector and landmark times (fixed-box events, listed first, do not).
        stage = next((e["timings_ms"] for e in events if "detect" in e.get("timings_ms", {})),
                     events[0]["timings_ms"] if events else {})
        if "detect" in stage:
            samples["face_detect"].append(stage["detect"])
            samples["landmarks"].append(stage["landmarks"])
        for call in calls:
            # A batched call decodes all its regions in shared steps: count those steps once.
            batched = bool(call) and "batch" in call[0].timings_ms
            for i, d in enumerate(call):
                t = d.timings_ms
                if t["preprocess_and_vision"] > 0:
                    samples["vision"].append(t["preprocess_and_vision"])
                samples["prefill"].append(t["prefill"])
                if not batched or i == 0:
                    samples["decode_step"].extend(t["decode_steps"])
                    samples.setdefault("_decode_ms", []).append(t["decode"])
                    samples.setdefault("_decode_calls", []).append(t["decode_calls"])
                samples["region_end_to_end"].append(t["total"])
                samples["detokenize"].append(detokenize_ms(self.pipe.tokenizer, d.token_ids))
        if described:  # frame in hand -> first token of its first region
            samples["ttft"].append(frame.capture_ms + stage.get("detect", 0.0) + stage.get("landmarks", 0.0)
                                   + described[0].timings_ms["ttft"])
        samples["frame_end_to_end"].append(frame_ms)
        samples.setdefault("_tokens", []).extend(len(d.token_ids) for d in described)
        samples.setdefault("_prompt_tokens", []).extend(len(d.prompt_token_ids) for d in described)
        return {"frame_ms": frame_ms, "regions": len(described), "events": len(events),
                "faces": len({e["face_id"] for e in events if e["region"] in (runner.regions or [])})}


def open_bench(bundle_path: str | os.PathLike, settings: Settings) -> Bench:
    from focalrt.runtime.pipeline import Pipeline

    settings.check()
    pipe = Pipeline.from_bundle(bundle_path, provider=settings.provider, threads=settings.threads)
    max_new = settings.max_new_tokens or int(pipe.generation["max_new_tokens"])
    analyzer, note = load_face_analyzer(pipe.bundle, pipe.providers)
    bench = Bench(RecordingPipeline(pipe), analyzer, settings, max_new)
    if note:
        bench.notes.append(note)
    return bench


def choose_regions(bench: Bench, first_frame: np.ndarray) -> tuple[list[str], list]:
    """The user's regions and boxes; without either, `mouth` of each face, or the frame centre if no face."""
    st = bench.settings
    regions = list(st.regions) if bench.analyzer is not None else []
    if st.regions and bench.analyzer is None:
        bench.notes.append(f"--regions {','.join(st.regions)} need face models; ignored")
    if not regions and not st.boxes and bench.analyzer is not None:
        regions = ["mouth"]
    faces = bench.analyzer.analyze(first_frame) if bench.analyzer is not None else []
    boxes = list(st.boxes)
    if regions and not faces and not boxes:
        boxes = [fallback_box(first_frame.shape)]
        bench.notes.append(f"no face in the first source frame: described the frame centre {boxes[0]} as well")
    if not regions and not boxes:
        boxes = [fallback_box(first_frame.shape)]
        bench.notes.append(f"no face models and no --box: described the frame centre {boxes[0]}")
    return regions, boxes


def measure_frames(bench: Bench, frames: list[Any]) -> dict[str, Any]:
    """Warm-up frames, then `runs` frames through every stage; stage percentiles and throughput."""
    st = bench.settings
    regions, boxes = choose_regions(bench, frames[0].image)
    runner = bench.runner(regions, boxes, bench.max_new_tokens)
    for frame in frames[:st.warmup]:
        bench.process_frame(runner, frame, {k: [] for k in STAGES})
    samples: dict[str, list[float]] = {k: [] for k in STAGES}
    per_frame = [bench.process_frame(runner, frame, samples) for frame in frames[st.warmup:st.warmup + st.runs]]
    for view, landmarks68 in bench.pipe.views:  # split the encoder stage on the views the loop used
        for i in range(st.warmup + st.runs):
            pre, enc = encode_timed(bench.pipe, view, landmarks68)
            if i >= st.warmup:
                samples["preprocess"].append(pre)
                samples["vision_encoder"].append(enc)
        break
    tokens = samples.pop("_tokens", [])
    prompt_tokens = samples.pop("_prompt_tokens", [])
    decode_ms = samples.pop("_decode_ms", [])
    decode_calls = samples.pop("_decode_calls", [])
    stages = {k: (summarize(v, st.warmup) if v else None) for k, v in samples.items()}
    frame_p50 = stages["frame_end_to_end"]["p50_ms"]
    regions_per_frame = float(np.mean([f["regions"] for f in per_frame]))
    decode, prefill = stages["decode_step"], stages["prefill"]
    if not prefill:
        raise ValueError("no region was described in any frame; give --box x1,y1,x2,y2 or a source with a face")
    throughput = {
        "decode_tokens_per_s": 1e3 / decode["p50_ms"] if decode else None,  # per region (sequence)
        # All regions of a frame decode together: tokens generated over time spent decoding.
        "decode_tokens_per_s_aggregate": (sum(max(n - 1, 0) for n in tokens) * 1e3 / sum(decode_ms)
                                          if sum(decode_ms) else None),
        "prefill_tokens_per_s": float(np.median(prompt_tokens)) * 1e3 / prefill["p50_ms"],
        "ttft_ms": stages["ttft"]["p50_ms"],
        "frames_per_s": 1e3 / frame_p50,
        "region_descriptions_per_s": regions_per_frame * 1e3 / frame_p50,
        "tokens_per_region": float(np.mean(tokens)),
        "prompt_tokens": int(np.median(prompt_tokens)),
        "regions_per_frame": regions_per_frame,
        "faces_per_frame": float(np.mean([f["faces"] for f in per_frame])),
        "decode_steps_per_call": float(np.mean(decode_calls)) if decode_calls else None,
    }
    return {"stages": stages, "throughput": throughput, "regions": regions, "boxes": [list(b) for b in boxes],
            "drafts": runner.drafts.stats(),  # over warm-up and timed frames
            "samples_ms": {k: samples[k] for k in ("decode_step", "prefill", "vision", "region_end_to_end",
                                                   "frame_end_to_end", "face_detect")}}


# ---------------------------------------------------------------- scaling


def synthetic_prompt(length: int, vocab: int, seed: int) -> np.ndarray:
    """Ordinary (non-special) token ids: enough to fill the KV cache to a given length."""
    rng = np.random.default_rng(seed)
    return rng.integers(100, min(vocab, 151643), size=length, dtype=np.int64)


def text_positions(length: int, rope_axes: int, start: int = 0) -> np.ndarray:
    """Position ids [axes, S] of a text-only prompt: every M-RoPE axis counts the same."""
    pos = np.arange(start, start + length, dtype=np.int64)[None]
    return np.repeat(pos, rope_axes, axis=0) if rope_axes > 1 else pos


def context_scaling(bench: Bench) -> list[dict[str, Any]]:
    """Decode speed with the KV cache already holding `past` tokens (a synthetic text prompt).

    Every length is warmed before it is timed: one untimed prefill and one untimed round of decode steps at
    that length (the first call at a new shape pays for ONNX Runtime's allocations and kernel choice), then
    `scaling_runs` timed prefills and rounds of `context_steps` decode steps. Each round rewinds the cache to
    `past` and decodes again, writing the same positions, so every round sees the same context.
    """
    from focalrt.runtime.generation.generate import batch_positions, decode_one_token, prefill

    pipe, st = bench.pipe, bench.settings
    out = []
    for past in st.contexts:
        if past + st.context_steps >= pipe.cache.max_context:
            bench.notes.append(f"context {past} skipped: with {st.context_steps} decode steps it exceeds the "
                               f"KV cache ({pipe.cache.max_context} tokens)")
            continue
        ids = synthetic_prompt(past, int(pipe.text_cfg["vocab_size"]), st.seed)
        positions = batch_positions(text_positions(past, pipe.model.rope_axes), 1)
        cache = pipe.cache.view(0, 1)  # one sequence, whatever batch the cache has grown to
        prefills: list[float] = []
        first = None
        for rep in range(st.scaling_runs + 1):  # round 0 warms this length up
            cache.lengths[:] = 0
            t0 = time.perf_counter()
            first = prefill(pipe.model, cache, ids[None], positions).argmax(-1)
            if rep:
                prefills.append((time.perf_counter() - t0) * 1e3)
        steps: list[float] = []
        for rep in range(st.scaling_runs + 1):  # round 0 warms the decode steps at this length up
            cache.lengths[:] = past
            token = first
            for _ in range(st.context_steps):
                s0 = time.perf_counter()
                token = decode_one_token(pipe.model, cache, token, np.zeros(1, np.int64)).argmax(-1)
                if rep:
                    steps.append((time.perf_counter() - s0) * 1e3)
        stats = summarize(steps, warmup=st.context_steps)
        prefill_ms = float(np.median(prefills))
        out.append({"past": past, "decode_step_ms": stats, "decode_tokens_per_s": 1e3 / stats["p50_ms"],
                    "prefill_ms": prefill_ms, "prefill_runs": len(prefills), "prefill_warmup": 1,
                    "prefill_tokens_per_s": past * 1e3 / prefill_ms})
    return out


def _time_runner(bench: Bench, runner, frame, runs: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(frame-time stats, last frame's result with the mean tokens per region over the timed runs)."""
    bench.process_frame(runner, frame, {k: [] for k in STAGES})  # warm-up
    scratch: dict[str, list[float]] = {k: [] for k in STAGES}
    results = [bench.process_frame(runner, frame, scratch) for _ in range(runs)]
    tokens = scratch.get("_tokens") or [0]
    return summarize([r["frame_ms"] for r in results], warmup=1), {**results[-1], "tokens": float(np.mean(tokens))}


def region_scaling(bench: Bench, frame) -> list[dict[str, Any]]:
    """Frame time against regions per frame: one face's named regions, or distinct boxes without a face."""
    from focalrt.runtime.faces.regions import REGIONS

    st = bench.settings
    has_face = bench.analyzer is not None and bool(bench.analyzer.analyze(frame.image))
    names = [n for n in REGIONS if n != "face"]
    out = []
    for k in st.region_counts:
        if has_face and k <= len(names):
            runner = bench.runner(names[:k], [], st.scaling_tokens)
        else:
            runner = bench.runner([], distinct_boxes(fallback_box(frame.image.shape), k), st.scaling_tokens)
        stats, last = _time_runner(bench, runner, frame, st.scaling_runs)
        n = last["regions"]
        out.append({"regions": n, "frame_ms": stats, "region_descriptions_per_s": n * 1e3 / stats["p50_ms"],
                    "tokens_per_region": last["tokens"], "tokens_per_region_max": st.scaling_tokens,
                    "named_regions": bool(runner.regions)})
    return out


def distinct_boxes(box: tuple[int, int, int, int], k: int) -> list[tuple[int, int, int, int]]:
    """k boxes that differ by a few pixels, so k prompts differ the way k real regions do."""
    x1, y1, x2, y2 = box
    return [(x1 + i, y1 + i, x2 - i, y2 - i) for i in range(k)]


def tiled_faces(image: np.ndarray, face_box: np.ndarray, n: int) -> np.ndarray:
    """n copies of the face (cropped with margin) in a grid, each tile the size of the crop."""
    x1, y1, x2, y2 = (float(v) for v in face_box)
    cx, cy, side = (x1 + x2) / 2, (y1 + y2) / 2, 2.2 * max(x2 - x1, y2 - y1)
    h, w = image.shape[:2]
    a, b = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    crop = image[b:min(h, int(b + side)), a:min(w, int(a + side))]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    ch, cw = crop.shape[:2]
    grid = np.zeros((rows * ch, cols * cw, 3), np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * ch:(r + 1) * ch, c * cw:(c + 1) * cw] = crop
    return grid


def face_scaling(bench: Bench, frame) -> list[dict[str, Any]]:
    """Front-end and whole-frame time against faces per frame (tiled copies of the source face)."""
    from focalrt.runtime.frames import check_frame
    from focalrt.runtime.stream.sources import Frame

    st = bench.settings
    if bench.analyzer is None:
        bench.notes.append("face scaling skipped: no face models")
        return []
    faces = bench.analyzer.analyze(frame.image)
    if not faces:
        bench.notes.append("face scaling skipped: no face found in the source frame")
        return []
    region = (st.regions or ["mouth"])[0]
    out = []
    for n in st.face_counts:
        grid = check_frame(tiled_faces(frame.image, faces[0].box, n))
        front = []
        for i in range(st.scaling_runs + 1):
            t0 = time.perf_counter()
            found = bench.analyzer.analyze(grid)
            if i:
                front.append((time.perf_counter() - t0) * 1e3)
        runner = bench.runner([region], [], st.scaling_tokens)
        stats, last = _time_runner(bench, runner, Frame(0, 0.0, grid, 0.0), st.scaling_runs)
        out.append({"faces_requested": n, "faces_found": len(found), "front_end_ms": summarize(front, warmup=1),
                    "frame_ms": stats, "regions": last["regions"], "tokens_per_region": last["tokens"],
                    "tokens_per_region_max": st.scaling_tokens})
    return out


# ---------------------------------------------------------------- one whole run


def run_bench(bundle_path: str | os.PathLike, source: str | None, settings: Settings,
              bandwidth: dict[str, Any] | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Everything `focalrt bench` reports, as one JSON-ready dict (schema in docs/benchmarks.md).

    `progress` gets one short line as each phase starts (the command prints them to stderr)."""
    from focalrt.bench import memory, roofline
    from focalrt.bench.environment import environment

    say = progress or (lambda _line: None)
    say(f"loading {bundle_path}")
    t_load = time.perf_counter()
    bench = open_bench(bundle_path, settings)
    load_ms = (time.perf_counter() - t_load) * 1e3
    rss_after_load = memory.current_rss_bytes()
    pipe = bench.pipe
    with tempfile.TemporaryDirectory(prefix="focalrt-bench-") as tmp:
        source_name = source
        if source is None:
            path, source_name = default_image(Path(tmp))
            source = str(path)
        frames, opened = read_source(source, settings.runs + settings.warmup)
    say(f"timing {settings.warmup} warm-up and {settings.runs} timed frames of {source_name}")
    frames_result = measure_frames(bench, frames)
    say(f"decode speed at KV cache fill levels {settings.contexts}")
    context = context_scaling(bench)
    say(f"regions per frame {settings.region_counts}")
    regions = region_scaling(bench, frames[0])
    say(f"faces per frame {settings.face_counts}")
    scaling = {"context": context, "regions": regions, "faces": face_scaling(bench, frames[0])}
    say("memory bandwidth for the roofline (in a child process)")
    tps = frames_result["throughput"]["decode_tokens_per_s"]
    roof = roofline.roofline(pipe.bundle.path, pipe.bundle.manifest, tps,
                             past=frames_result["throughput"]["prompt_tokens"], bandwidth=bandwidth)
    # Last, so the high-water mark covers everything this process did: imports, load, every timed run.
    mem = memory.memory_record()
    mem["rss_after_load_bytes"] = rss_after_load
    mem["peak_rss_covers"] = PEAK_RSS_COVERS
    if roof["weights_exceed_l3"] is False:
        bench.notes.append("the decoder weights fit in the L3 cache, so the roofline (a DRAM bound) does not "
                           "apply to this bundle; measure the small preset or a real checkpoint")
    m = pipe.bundle.manifest
    return {
        "schema": "focalrt.bench/1",
        "created_unix": int(time.time()),
        "bundle": {"path": str(pipe.bundle.path), "family": m["family"], "source": m.get("source", {}),
                   "precision": {k: v.get("precision") for k, v in m["components"].items()},
                   "image_size": pipe.image_size, "max_context": pipe.cache.max_context,
                   "region_mode": pipe.profile.get("region_mode", "text")},
        "settings": {"source": source_name, "source_opened": opened, "runs": settings.runs,
                     "warmup": settings.warmup, "max_new_tokens": bench.max_new_tokens,
                     "regions": frames_result.pop("regions"), "boxes": frames_result.pop("boxes"),
                     "contexts": settings.contexts, "context_steps": settings.context_steps,
                     "region_counts": settings.region_counts, "face_counts": settings.face_counts,
                     "scaling_runs": settings.scaling_runs, "scaling_tokens": settings.scaling_tokens,
                     "provider": settings.provider, "threads": settings.threads,
                     "frame_pipeline": "focalrt.runtime.stream.runner.RegionRunner"},
        "environment": environment(pipe.providers, settings.threads),
        "model_bytes": roofline.model_bytes(pipe.bundle.path, m),
        "load_ms": load_ms,
        **frames_result,
        "memory": mem,
        "scaling": scaling,
        "roofline": roof,
        "notes": bench.notes,
    }
