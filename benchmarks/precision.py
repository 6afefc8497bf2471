"""Per precision, side by side on the CPU: size on disk, vision latency, prefill ms, decode tokens/s, peak RSS.

    python -m benchmarks.precision                         # preset small: fp32, int8, int4, fp16
    python -m benchmarks.precision --preset tiny-random --runs 3 --new-tokens 16
    python -m benchmarks.precision --data frames/ --json precision.json

The fp32 bundle is exported once into the cache (~/.cache/focalrt/bundles/<preset>, or $FOCALRT_CACHE);
the int8 bundle is calibrated on `--data` (default: shifted, scaled and re-lit crops of scikit-image's
astronaut photo), and int4/fp16 are converted; each is kept in the cache (bundles/precision/) and remade
when the fp32 bundle changes. Conversions run with --force: the table reports each gate's verdict instead of
stopping. FP8 is not measured: the CPU can only emulate it.

Each precision runs in its own subprocess (its peak RSS is its own), `--warmup` untimed descriptions then
`--runs` timed ones of the same region; medians per run. `--rounds` repeats all subprocesses in turn and
keeps, per precision, the best round, which damps other load on the machine. Decode tokens/s = decode steps
/ their summed time (the step that produced the first token belongs to prefill).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import harness

CACHE = harness.CACHE
PRECISIONS = ("fp32", "int8", "int4", "fp16")
BOX = (170, 80, 290, 210)  # the astronaut's face in the 512x512 photo


def fp32_bundle(preset: str, bundle: Path | None) -> Path:
    path = bundle or CACHE / "bundles" / preset
    if (path / "manifest.json").is_file():
        return path
    print(f"exporting the {preset} bundle to {path} (once) ...", file=sys.stderr, flush=True)
    from focalrt.export.build import export_bundle

    path.parent.mkdir(parents=True, exist_ok=True)
    return export_bundle(path, preset=preset, face_models=False)


def default_frames(out: Path, count: int = 24) -> Path:
    """Crops of a real face photo: shifted, scaled, mirrored and re-lit, as a camera would vary them."""
    import cv2
    from skimage import data

    image = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    rng = np.random.default_rng(1)
    h, w = image.shape[:2]
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        s = rng.uniform(0.5, 1.0)
        cw, ch = int(w * s), int(h * s)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = image[y:y + ch, x:x + cw]
        if rng.random() < 0.3:
            crop = cv2.flip(crop, 1)
        crop = cv2.convertScaleAbs(crop, alpha=rng.uniform(0.8, 1.2), beta=rng.uniform(-20, 20))
        cv2.imwrite(str(out / f"frame{i:02d}.jpg"), crop)
    return out


def converted_bundle(fp32: Path, precision: str, data: Path, samples: int, block: int) -> Path:
    """The cached bundle of `precision` made from `fp32`, remade when fp32's decoder changed."""
    from focalrt.calibration.make_bundle import Options, make_bundle

    suffix = f"-b{block}" if precision == "int4" else ""
    path = CACHE / "bundles" / "precision" / f"{fp32.name}-{precision}{suffix}"
    decoder_sha = json.loads((fp32 / "manifest.json").read_text())["components"]["decoder"]["sha256"]
    manifest = path / "manifest.json"
    if manifest.is_file():
        made_from = json.loads(manifest.read_text()).get("calibration", {}).get("source_bundle", {})
        if made_from.get("decoder_sha256") == decoder_sha:
            return path
    print(f"making the {precision} bundle at {path} ...", file=sys.stderr, flush=True)
    opts = Options(precision=precision, samples=samples, holdout=4, force=True, overwrite=True, fallback=False,
                   int4_block_size=block)
    make_bundle(fp32, path, data, opts)
    return path


def label(precision: str, block: int) -> str:
    return f"int4 (block {block})" if precision == "int4" else precision


def disk_bytes(bundle: Path) -> dict[str, int]:
    comps = json.loads((bundle / "manifest.json").read_text())["components"]
    return {name: c["bytes"] + c.get("external_data", {}).get("bytes", 0) for name, c in comps.items()}


def worker(bundle: Path, image: Path, runs: int, warmup: int, new_tokens: int, threads: int | None) -> dict:
    """Runs in its own process: load the bundle, time `runs` descriptions of one region."""
    import cv2

    from focalrt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle, provider="cpu", threads=threads)
    frame = cv2.imread(str(image))
    vision, prefill, tok_s = [], [], []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        pipe.encode_image(frame)
        vision_ms = (time.perf_counter() - t0) * 1e3
        d = pipe.describe(frame, box=BOX, max_new_tokens=new_tokens, temperature=0.0)
        steps = d.timings_ms["decode_steps"]
        if i >= warmup:
            vision.append(vision_ms)
            prefill.append(d.timings_ms["prefill"])
            if steps:
                tok_s.append(len(steps) / (sum(steps) / 1e3))
    return {"vision_ms": float(np.median(vision)), "prefill_ms": float(np.median(prefill)),
            "decode_tokens_per_s": float(np.median(tok_s)) if tok_s else None,
            "decode_steps": len(steps), "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM starts afresh at exec; ru_maxrss can carry the forking parent's peak."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gate_summary(bundle: Path) -> dict[str, Any] | None:
    report = bundle / "calibration" / "report.json"
    if not report.is_file():
        return None
    gate = json.loads(report.read_text())["gate"]
    m = gate["metrics"]
    return {"passed": gate["passed"], "logit_cosine_mean": m["logit_cosine_mean"],
            "top1_agreement": m["top1_agreement"], "greedy_agreement_mean": m["greedy_agreement_mean"],
            "vision_cosine_min": m["vision_cosine_min"]}


def table(results: dict[str, dict[str, Any]]) -> str:
    base = results.get("fp32", {}).get("decode_tokens_per_s")
    lines = ["| precision | size on disk (MB) | decoder (MB) | vision ms | prefill ms | decode tok/s | "
             "decode vs fp32 | peak RSS (MB) | gate (logit cos / top-1) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p, r in results.items():
        speed = f"{r['decode_tokens_per_s'] / base:.2f}x" if base and r["decode_tokens_per_s"] else "-"
        g = r.get("gate")
        gate = "fp32 reference" if g is None else (f"{'pass' if g['passed'] else 'FAIL'} "
                                                   f"({g['logit_cosine_mean']:.3f} / {g['top1_agreement']:.2f})")
        lines.append(f"| {p} | {sum(r['disk_bytes'].values()) / 1e6:.0f} | {r['disk_bytes']['decoder'] / 1e6:.0f} | "
                     f"{r['vision_ms']:.1f} | {r['prefill_ms']:.1f} | {r['decode_tokens_per_s']:.1f} | {speed} | "
                     f"{r['peak_rss_mb']:.0f} | {gate} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--bundle", type=Path, help="fp32 bundle to start from (default: the preset's, cached)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--data", type=Path, help="calibration frames (default: crops of the astronaut photo)")
    ap.add_argument("--samples", type=int, default=16, help="calibration frames for int8 (default 16)")
    ap.add_argument("--int4-block-size", type=int, default=None,
                    help="int4 weights per scale (default: focalrt's, 128)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.image, args.runs, args.warmup, args.new_tokens, args.threads)))
        return 0

    if args.int4_block_size is None:
        from focalrt.calibration.quantize import INT4_BLOCK_SIZE

        args.int4_block_size = INT4_BLOCK_SIZE
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise SystemExit(f"--precisions: {sorted(unknown)} not measurable here; choose from {list(PRECISIONS)} "
                         f"(fp8 needs TensorRT on an Ada/Hopper GPU)")
    fp32 = fp32_bundle(args.preset, args.bundle)
    with tempfile.TemporaryDirectory(prefix="focalrt-precision-") as tmp:
        data = args.data or default_frames(Path(tmp) / "frames")
        bundles = {label(p, args.int4_block_size): fp32 if p == "fp32"
                   else converted_bundle(fp32, p, data, args.samples, args.int4_block_size) for p in precisions}
        image = next(p for p in sorted(Path(data).iterdir()) if p.suffix.lower() in (".jpg", ".png"))
        best: dict[str, dict[str, Any]] = {}
        for round_ in range(args.rounds):
            for p, bundle in bundles.items():
                cmd = [sys.executable, "-m", "benchmarks.precision", "--worker", str(bundle), "--image", str(image),
                       "--runs", str(args.runs), "--warmup", str(args.warmup), "--new-tokens", str(args.new_tokens)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=harness.ROOT).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(f"round {round_ + 1} {p}: {r}", file=sys.stderr, flush=True)
                prev = best.get(p)
                if prev is None or (r["decode_tokens_per_s"] or 0) > (prev["decode_tokens_per_s"] or 0):
                    best[p] = r
    results = {p: {**best[p], "disk_bytes": disk_bytes(b), "gate": gate_summary(b) if p != "fp32" else None,
                   "bundle": str(b)} for p, b in bundles.items()}
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "new_tokens": args.new_tokens, "runs": args.runs,
                                         "rounds": args.rounds, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
