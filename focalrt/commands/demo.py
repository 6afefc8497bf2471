"""`focalrt demo`: the main job on the built-in default, from a fresh install.

Exports the tiny-random bundle into its cache folder if it is missing there (needs the [export] extra),
describes the mouth of the face photo shipped with focalrt, then runs the real-time pipeline over a 3-second
clip generated from that photo, as `focalrt run --regions mouth,eyes,brows --min-interval 0.5 --smooth 0.9`
would. Writes into --out: clip.mp4 (the generated clip), events.jsonl (a state event per face on every frame,
smoothed over time, and a description event per region on every frame, described afresh twice a second and
carried over in between: what `focalrt run` writes), annotated.mp4 (the clip with boxes and a side panel of
the face's emotion and age and the regions' descriptions) and first_frame.png (its first frame).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from focalrt.commands.args import add_parser, add_threads, positive_int, require

DEFAULT_BUNDLE = Path.home() / ".cache" / "focalrt" / "bundles" / "tiny-random"
DEMO_FILES = ("clip.mp4", "events.jsonl", "annotated.mp4", "first_frame.png")
DEMO_REGIONS = "mouth,eyes,brows"
DEMO_FPS = 12.0
DEMO_FRAMES = 36  # 3 s at DEMO_FPS
DESCRIBE_INTERVAL_S = 0.5  # regions described afresh twice a second (every 6th frame), carried over in between
# The state stream's EMA weight (run --smooth; a time constant of ~10 frames, under a second here): one photo's
# raw age estimate moves with the crop, by up to 15 years from one frame to the next on this clip.
DEMO_SMOOTH = 0.9


def register(sub) -> None:
    p = add_parser(sub, "demo", help="export tiny-random if needed, describe a face photo, run on a generated clip",
                   description=__doc__)
    p.add_argument("--bundle", default=None,
                   help=f"bundle to use (default: {DEFAULT_BUNDLE}, where the tiny-random preset is exported on "
                        f"the first run)")
    p.add_argument("--out", default="focalrt-demo", help=f"folder for {', '.join(DEMO_FILES)}")
    p.add_argument("--frames", type=positive_int, default=DEMO_FRAMES,
                   help=f"frames in the generated clip, at {DEMO_FPS:g} frames per second")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="most tokens per description (default: the bundle's generation setting)")
    add_threads(p)
    p.set_defaults(func=run)


def ensure_bundle(path: Path | None) -> Path:
    """The bundle to use: --bundle as given (it must be one), or the demo's own, exported on the first run."""
    if path is not None:
        if not (path / "manifest.json").is_file():
            what = "no such folder" if not path.exists() else "no manifest.json in it"
            raise ValueError(f"--bundle {path}: no bundle there ({what}); give a folder written by `focalrt "
                             f"export`, or leave --bundle out to use the demo's own in {DEFAULT_BUNDLE}")
        return path
    path = DEFAULT_BUNDLE
    if (path / "manifest.json").is_file():
        return path
    require("torch", "transformers", "onnx")  # before anything is printed: one line if the extra is missing
    print(f"no bundle at {path}; exporting the tiny-random preset there (about a minute)", file=sys.stderr)
    from focalrt.export.build import export_bundle

    return export_bundle(path, preset="tiny-random")


def run(args) -> int:
    import cv2

    from focalrt.commands.notices import warn_if_random
    from focalrt.demo import demo_photo, pan_zoom_frames, write_clip
    from focalrt.runtime.pipeline import Pipeline
    from focalrt.runtime.stream.annotate import annotate_with_panel
    from focalrt.runtime.stream.runner import RegionRunner, bundle_face_state, frame_loop
    from focalrt.runtime.stream.sinks import JsonlSink, VideoSink
    from focalrt.runtime.stream.sources import Frame, open_source

    bundle = ensure_bundle(Path(args.bundle) if args.bundle else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline.from_bundle(bundle, threads=args.threads)
    warn_if_random(pipeline.bundle)
    title = f"focalrt demo - {Path(bundle).name}" + (" (random weights: gibberish by design)"
                                                      if _random(pipeline) else "")
    photo = demo_photo()
    # The same runner settings as `focalrt run --regions ...` (a state per face and frame, every region
    # described on every frame) and the same frame loop, so the demo shows what run writes.
    runner = RegionRunner(pipeline, regions="mouth", max_new_tokens=args.max_new_tokens,
                          state=bundle_face_state(pipeline))
    (result,) = frame_loop(runner, [Frame(0, 0.0, photo, 0.0)])
    for event in result.events:
        print(f"photo, {photo_line(event)}")
    clip = write_clip(out / "clip.mp4", pan_zoom_frames(photo, args.frames), fps=DEMO_FPS)
    runner = RegionRunner(pipeline, regions=DEMO_REGIONS, max_new_tokens=args.max_new_tokens,
                          min_interval_s=DESCRIBE_INTERVAL_S, state=bundle_face_state(pipeline, DEMO_SMOOTH))
    video = None
    with open_source(str(clip)) as source, JsonlSink(out / "events.jsonl") as jsonl:
        try:
            for result in frame_loop(runner, source):
                for event in result.events:
                    jsonl.write(event)
                picture = annotate_with_panel(result.frame.image, result.annotations(), title=title)
                if video is None:
                    video = VideoSink(out / "annotated.mp4", source.fps or DEMO_FPS, picture.shape[1::-1])
                video.write(picture)
                if result.frame.index == 0:
                    cv2.imwrite(str(out / "first_frame.png"), picture)
        finally:
            if video is not None:
                video.close()
    print(f"clip: {json.dumps(runner.stats.as_dict())}")
    print(f"wrote {', '.join(str(out / name) for name in DEMO_FILES)}")
    return 0


def photo_line(event: dict) -> str:
    """One event of the photo as a line: the face's emotion and age, or a region's box and description."""
    if event["type"] == "state":
        from focalrt.runtime.stream.annotate import state_annotation

        return state_annotation(event)["label"]
    return f"{event['region']} at {event['box']}: {event['text']!r}"


def _random(pipeline) -> bool:
    from focalrt.bundle import has_random_weights

    return has_random_weights(pipeline.bundle.manifest)
