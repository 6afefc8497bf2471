"""Many regions, many faces, one frame: the batched, prefix-shared path against one region at a time.

    python -m benchmarks.regions                       # small preset (exported once to the cache)
    python -m benchmarks.regions --preset tiny-random --runs 2 --max-new-tokens 8
    python -m benchmarks.regions --json regions.json --plot regions.png

For N regions of one face (and for 1-3 faces) it times, in one process on the same weights and frame:
- batched: `Pipeline.describe_images`, the path `focalrt run` takes (encoder once per face, prefix once per
  face, one decode step for every region of every face);
- sequential: `Pipeline.describe` per region (what other runtimes do: one prompt at a time).
Every description generates exactly --max-new-tokens tokens (stop tokens are disabled), so both sides do
the same work. Medians over --runs after one warm-up. Targets (issue 7): 4 regions <= 1.6x one region, 8
regions <= 2.5x.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.harness import ensure_bundle
from focalrt.bench.stats import time_runs
from focalrt.demo import demo_photo
from focalrt.runtime.faces.crops import crop_face
from focalrt.runtime.faces.detection import FaceAnalyzer
from focalrt.runtime.faces.regions import region_box
from focalrt.runtime.pipeline import Pipeline

REGIONS = ["mouth", "left_eye", "right_eye", "brows", "nose", "chin", "left_cheek", "right_cheek"]


def face_views(pipe: Pipeline, faces: int) -> list[tuple[np.ndarray, list[tuple[int, int, int, int]]]]:
    """Face crops at the encoder size with the eight region boxes in crop pixels, as `focalrt run` makes them.

    Extra faces are the same photo mirrored or shifted, so each is a different image to encode."""
    photo = demo_photo()
    if "face_models" in pipe.bundle.manifest:
        analyzer = FaceAnalyzer.from_dir(pipe.bundle.path, pipe.bundle.manifest["face_models"], pipe.providers)
    else:  # a bundle exported with --no-face-models: convert them for this run
        import tempfile

        from focalrt.export.face_models import export_face_models

        out = Path(tempfile.mkdtemp(prefix="focalrt-faces-"))
        analyzer = FaceAnalyzer.from_dir(out, export_face_models(out), pipe.providers)
    face = analyzer.analyze(photo)[0]
    size = pipe.image_size
    face_crop = crop_face(photo, face.box, size, [region_box(r, face.landmarks, photo.shape) for r in REGIONS])
    crop, boxes = face_crop.image, face_crop.boxes
    variants = [crop, np.ascontiguousarray(crop[:, ::-1]), np.roll(crop, 7, axis=0)]
    mirrored = [(size - b[2], b[1], size - b[0], b[3]) for b in boxes]
    return [(variants[i], mirrored if i == 1 else boxes) for i in range(faces)]


def median_ms(fn, runs: int) -> float:
    return time_runs(fn, runs, warmup=1)[0]["p50_ms"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--bundle", type=Path, default=None, help="a bundle (default: the preset's, from the cache)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--region-counts", default="1,2,4,8")
    p.add_argument("--face-counts", default="1,2,3")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args(argv)
    bundle = args.bundle or ensure_bundle(args.preset)
    pipe = Pipeline.from_bundle(bundle)
    pipe.stop_ids = set()  # every description runs the full --max-new-tokens on both sides
    counts = [int(x) for x in args.region_counts.split(",")]
    faces = [int(x) for x in args.face_counts.split(",")]
    views = face_views(pipe, max(faces))
    new = args.max_new_tokens

    rows = []
    for n_faces in faces:
        for n in counts if n_faces == 1 else [3]:
            batch = [(img, boxes[:n], None) for img, boxes in views[:n_faces]]
            batched = median_ms(lambda b=batch: pipe.describe_images(b, max_new_tokens=new), args.runs)
            sequential = median_ms(lambda b=batch: [pipe.describe(img, box=box, max_new_tokens=new)
                                                    for img, boxes, _ in b for box in boxes], args.runs)
            rows.append({"faces": n_faces, "regions_per_face": n, "descriptions": n * n_faces,
                         "batched_ms": batched, "sequential_ms": sequential})
            print(f"faces {n_faces} x regions {n}: batched {batched:.0f} ms, one at a time {sequential:.0f} ms",
                  flush=True)
    one = next(r["batched_ms"] for r in rows if r["faces"] == 1 and r["regions_per_face"] == 1)
    for r in rows:
        r["vs_one_region"] = r["batched_ms"] / one
        r["speedup_vs_sequential"] = r["sequential_ms"] / r["batched_ms"]

    print(f"\n{bundle.name}: {new} new tokens per description, median of {args.runs} runs\n")
    print("| faces | regions/face | batched ms | one-at-a-time ms | batched / 1 region | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['faces']} | {r['regions_per_face']} | {r['batched_ms']:.0f} | {r['sequential_ms']:.0f} | "
              f"{r['vs_one_region']:.2f}x | {r['speedup_vs_sequential']:.2f}x |")
    targets = {4: 1.6, 8: 2.5}
    for r in rows:
        if r["faces"] == 1 and r["regions_per_face"] in targets:
            limit = targets[r["regions_per_face"]]
            verdict = "meets" if r["vs_one_region"] <= limit else "MISSES"
            print(f"target {r['regions_per_face']} regions <= {limit}x one region: {r['vs_one_region']:.2f}x "
                  f"({verdict})")
    from focalrt.bench.environment import environment

    result = {"bundle": str(bundle), "max_new_tokens": new, "runs": args.runs, "rows": rows,
              "environment": environment()}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(rows, args.plot)
    return result


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    one_face = [r for r in rows if r["faces"] == 1]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["regions_per_face"] for r in one_face]
    a.plot(x, [r["batched_ms"] for r in one_face], "o-", label="batched, shared prefix")
    a.plot(x, [r["sequential_ms"] for r in one_face], "s--", label="one region at a time")
    a.set_xlabel("regions of one face")
    a.set_ylabel("ms per frame")
    a.legend()
    a.set_title("regions per frame")
    multi = [r for r in rows if r["regions_per_face"] == 3 or r["faces"] > 1]
    labels = [f"{r['faces']}x{r['regions_per_face']}" for r in multi]
    b.bar(np.arange(len(multi)) - 0.2, [r["batched_ms"] for r in multi], 0.4, label="batched")
    b.bar(np.arange(len(multi)) + 0.2, [r["sequential_ms"] for r in multi], 0.4, label="one at a time")
    b.set_xticks(np.arange(len(multi)), labels)
    b.set_xlabel("faces x regions")
    b.legend()
    b.set_title("faces per frame")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
