"""`focalrt demo`: the main job on the built-in default, from a fresh install.

Exports the tiny-random bundle if it is missing (needs the [export] extra), describes the mouth of the
face photo shipped with focalrt, then runs the real-time pipeline over a clip generated from that photo.
Writes into --out: clip.mp4 (the generated clip), events.jsonl (one event per region and frame),
annotated.mp4 (the clip with boxes and a side panel of descriptions) and first_frame.png (its first frame).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from focalrt.commands.args import add_parser, add_threads, positive_int, require

DEFAULT_BUNDLE = Path.home() / ".cache" / "focalrt" / "bundles" / "tiny-random"
DEMO_FILES = ("clip.mp4", "events.jsonl", "annotated.mp4", "first_frame.png")
DEMO_REGIONS = "mouth,eyes,brows"


def register(sub) -> None:
    p = add_parser(sub, "demo", help="export tiny-random if needed, describe a face photo, run on a generated clip",
                   description=__doc__)
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE),
                   help="bundle to use; exported there (tiny-random preset) if it has no manifest.json")
    p.add_argument("--out", default="focalrt-demo", help=f"folder for {', '.join(DEMO_FILES)}")
    p.add_argument("--frames", type=positive_int, default=12, help="frames in the generated clip")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="most tokens per description (default: the bundle's generation setting)")
    add_threads(p)
    p.set_defaults(func=run)


def ensure_bundle(path: Path) -> Path:
    if (path / "manifest.json").is_file():
        return path
    require("torch", "transformers", "onnx")  # before anything is printed: one line if the extra is missing
    print(f"no bundle at {path}; exporting the tiny-random preset there (about a minute)", file=sys.stderr)
    from focalrt.export.build import export_bundle

    return export_bundle(path, preset="tiny-random")


def panel_annotations(events: list[dict]) -> list[dict]:
    """What the demo pictures show per region: its box, a short label and its description."""
    several = len({e["face_id"] for e in events}) > 1
    return [{"box": e["box"], "label": e["region"] + (f" (face {e['face_id']})" if several else ""),
             "text": e["text"]} for e in events]


def run(args) -> int:
    import cv2

    from focalrt.commands.notices import warn_if_random
    from focalrt.demo import demo_photo, pan_zoom_frames, write_clip
    from focalrt.runtime.pipeline import Pipeline
    from focalrt.runtime.run import RegionRunner
    from focalrt.runtime.sinks import JsonlSink, VideoSink, annotate_with_panel
    from focalrt.runtime.sources import Frame, open_source

    bundle = ensure_bundle(Path(args.bundle))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline.from_bundle(bundle, threads=args.threads)
    warn_if_random(pipeline.bundle)
    title = f"focalrt demo - {Path(bundle).name}" + (" (random weights: gibberish by design)"
                                                      if _random(pipeline) else "")
    photo = demo_photo()
    runner = RegionRunner(pipeline, regions="mouth", max_new_tokens=args.max_new_tokens)
    event = runner.process(Frame(0, 0.0, photo, 0.0))[0]
    print(f"photo, mouth at {event['box']}: {event['text']!r}")
    clip = write_clip(out / "clip.mp4", pan_zoom_frames(photo, args.frames))
    runner = RegionRunner(pipeline, regions=DEMO_REGIONS, max_new_tokens=args.max_new_tokens)
    source = open_source(str(clip))
    latest: dict[tuple, dict] = {}
    video = None
    with source, JsonlSink(out / "events.jsonl") as jsonl:
        try:
            for frame in source:
                for e in runner.process(frame):
                    jsonl.write(e)
                    latest[(e["face_id"], e["region"])] = e
                shown = [e for e in latest.values() if e["frame"] == frame.index]
                picture = annotate_with_panel(frame.image, panel_annotations(shown), title=title)
                if video is None:
                    video = VideoSink(out / "annotated.mp4", source.fps or 10.0, picture.shape[1::-1])
                video.write(picture)
                if frame.index == 0:
                    cv2.imwrite(str(out / "first_frame.png"), picture)
        finally:
            if video is not None:
                video.close()
    print(f"clip: {json.dumps(runner.stats.as_dict())}")
    print(f"wrote {', '.join(str(out / name) for name in DEMO_FILES)}")
    return 0


def _random(pipeline) -> bool:
    from focalrt.bundle import has_random_weights

    return has_random_weights(pipeline.bundle.manifest)
