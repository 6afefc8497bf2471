"""Per-frame latency of the face front end: detector, FaceMesh, the fast state heads, and all together.

    python -m benchmarks.faces                      # converts the face models into a temp dir first
    python -m benchmarks.faces --bundle DIR         # the face models of an exported bundle
    python -m benchmarks.faces --runs 500 --json out.json
    python -m benchmarks.faces --bundle DIR --e2e   # plus end-to-end `focalrt run` fps on a synthetic clip

The frame is scikit-image's astronaut (512x512, one face), optionally resized with --size. Each stage is
timed on its own after a warm-up, so the table says where the time goes; p99 shows the jitter a real-time
loop must absorb. The state rows (emotion head, age head, FaceMesh geometry and head pose) are per face;
"state stream frame" is everything the `type: state` event of one face costs per frame, detection included,
and its fps is compared with a 30 fps camera.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from focalrt.bench.stats import time_runs
from focalrt.runtime.backends.sessions import resolve_providers
from focalrt.runtime.faces.detection import FaceAnalyzer
from focalrt.runtime.faces.state import FaceStateEstimator, face_geometry, head_pose


def end_to_end(bundle_dir: Path, frames: int, regions: str, max_new_tokens: int, provider: str) -> dict:
    """Frames per second of the run loop on the synthetic clip, and each stage's share of the time."""
    from focalrt.demo import demo_photo, pan_zoom_frames, write_clip
    from focalrt.runtime.pipeline import Pipeline
    from focalrt.runtime.stream.runner import RegionRunner
    from focalrt.runtime.stream.sources import open_source

    clip = write_clip(Path(tempfile.mkdtemp(prefix="focalrt-clip-")) / "clip.mp4",
                      pan_zoom_frames(demo_photo(), frames))
    runner = RegionRunner(Pipeline.from_bundle(bundle_dir, provider=provider), regions=regions,
                          max_new_tokens=max_new_tokens)
    per_frame: list[dict[str, float]] = []
    start = time.perf_counter()
    with open_source(str(clip)) as source:
        for frame in source:
            events = runner.process(frame)
            stage = dict(events[0]["timings_ms"]) if events else {}
            per_frame.append({k: float(v) for k, v in stage.items() if k != "batch"})
    seconds = time.perf_counter() - start
    stages = sorted({k for f in per_frame for k in f} - {"total"})
    medians = {k: float(np.median([f.get(k, 0.0) for f in per_frame])) for k in stages}
    frame_ms = seconds / len(per_frame) * 1e3
    return {"frames": len(per_frame), "regions": regions, "max_new_tokens": max_new_tokens,
            "fps": len(per_frame) / seconds, "frame_ms": frame_ms, "stage_p50_ms": medians,
            "stage_share": {k: v / frame_ms for k, v in medians.items()}}


def load_analyzer(bundle_dir: Path | None, providers: list[str],
                  full_range: bool) -> tuple[FaceAnalyzer, FaceStateEstimator]:
    """From a bundle's manifest (file names relative to the bundle), or freshly converted with the heads."""
    if bundle_dir is not None:
        from focalrt.bundle import load

        bundle = load(bundle_dir)
        if "face_models" not in bundle.manifest:
            sys.exit(f"{bundle_dir} was exported without face models; re-export it without --no-face-models")
        entry = bundle.manifest["face_models"]
        return (FaceAnalyzer.from_dir(bundle.path, entry, providers, full_range),
                FaceStateEstimator.from_bundle_entry(bundle.path, entry, providers))
    from focalrt.export.face_heads import export_face_heads  # needs the export extra and the head packages
    from focalrt.export.face_models import export_face_models

    out = Path(tempfile.mkdtemp(prefix="focalrt-faces-"))
    entry = {**export_face_models(out), **export_face_heads(out)}
    return (FaceAnalyzer.from_dir(out, entry, providers, full_range),
            FaceStateEstimator.from_bundle_entry(out, entry, providers))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=None, help="bundle directory (default: convert anew)")
    p.add_argument("--provider", default="cpu", help="cpu (default), cuda, tensorrt or auto")
    p.add_argument("--full-range", action="store_true", help="time the 192 px full-range detector")
    p.add_argument("--size", type=int, default=512, help="frame side in pixels (astronaut resized)")
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--e2e", action="store_true", help="also time `focalrt run` on a synthetic clip (needs --bundle)")
    p.add_argument("--frames", type=int, default=20, help="frames in the synthetic clip (--e2e)")
    p.add_argument("--regions", default="mouth,eyes,brows", help="regions described per frame (--e2e)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per description (--e2e)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.size < 32:
        p.error("--runs must be >= 1, --warmup >= 0 and --size >= 32")
    if args.e2e and args.bundle is None:
        p.error("--e2e needs --bundle (a model bundle with face models)")

    from focalrt.demo import demo_photo

    frame = cv2.resize(demo_photo(), (args.size, args.size))
    providers = resolve_providers(args.provider)
    analyzer, state = load_analyzer(args.bundle, providers, args.full_range)
    detections = analyzer.detector.detect(frame)
    if not detections:
        sys.exit(f"no face found in the {args.size}px astronaut frame; try a larger --size")
    face = analyzer.analyze(frame)[0]

    def state_frame() -> None:
        faces = analyzer.analyze(frame)
        state.estimate(frame, [f.box for f in faces], [f.landmarks for f in faces], list(range(1, len(faces) + 1)))

    stages = {
        "detector": lambda: analyzer.detector.detect(frame),
        "landmarks (1 face)": lambda: analyzer.landmarker.landmarks(frame, detections[0]),
        "detect + landmarks": lambda: analyzer.analyze(frame),
    }
    if state.emotion is not None:
        stages["emotion head (1 face)"] = lambda: state.emotion.probabilities(frame, [face.box])
    if state.age is not None:
        stages["age head (1 face)"] = lambda: state.age.expected_ages(frame, [face.landmarks])
    stages["geometry + pose (1 face)"] = lambda: (face_geometry(face.landmarks), head_pose(face.landmarks))
    stages["state, all (1 face)"] = lambda: state.estimate(frame, [face.box], [face.landmarks], [1])
    stages["state stream frame"] = state_frame
    results = {name: time_runs(fn, args.runs, args.warmup)[0] for name, fn in stages.items()}
    stream_fps = 1e3 / results["state stream frame"]["p50_ms"]
    report = {"frame": f"astronaut {args.size}x{args.size}", "faces": len(detections),
              "providers": providers, "full_range": args.full_range, "machine": platform.machine(),
              "stages": results, "state_stream_fps_p50": stream_fps, "camera_rate_30fps": stream_fps >= 30.0}

    print(f"{report['frame']}, {len(detections)} face(s), {providers[0]}, {args.runs} runs")
    print(f"{'stage':<26}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}")
    for name, r in results.items():
        print(f"{name:<26}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['mean_ms']:>9.2f}")
    print(f"state stream: {stream_fps:.1f} fps at p50 for one face "
          f"({'reaches' if stream_fps >= 30 else 'misses'} a 30 fps camera)")
    if args.e2e:
        e2e = end_to_end(args.bundle, args.frames, args.regions, args.max_new_tokens, args.provider)
        report["end_to_end"] = e2e
        print(f"\nfocalrt run on a {e2e['frames']}-frame synthetic clip, regions {e2e['regions']}, "
              f"{e2e['max_new_tokens']} new tokens: {e2e['fps']:.2f} fps ({e2e['frame_ms']:.0f} ms/frame)")
        print(f"{'stage':<12}{'p50 ms':>9}{'share':>8}")
        for name, ms in e2e["stage_p50_ms"].items():
            print(f"{name:<12}{ms:>9.2f}{e2e['stage_share'][name]:>8.1%}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
