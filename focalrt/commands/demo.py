"""`focalrt demo`: the main job on the built-in default, from a fresh install.

Exports the tiny-random bundle if it is missing (needs the [export] extra), describes the mouth of the
shipped face photo, then runs the real-time pipeline over a clip generated from that photo.
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_BUNDLE = Path.home() / ".cache" / "focalrt" / "bundles" / "tiny-random"


def register(sub) -> None:
    p = sub.add_parser("demo", help="export tiny-random if needed, describe a face photo, run on a generated clip")
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help=f"bundle to use (default {DEFAULT_BUNDLE})")
    p.add_argument("--out", default="focalrt-demo", help="folder for the clip, events.jsonl and annotated video")
    p.add_argument("--frames", type=int, default=12, help="frames in the generated clip")
    p.set_defaults(func=run)


def ensure_bundle(path: Path) -> Path:
    if (path / "manifest.json").is_file():
        return path
    try:
        from focalrt.export.build import export_bundle
    except ImportError as e:
        raise RuntimeError(f"no bundle at {path}, and exporting one needs the export extra "
                           f"(pip install -e '.[export]'): {e}") from None
    print(f"exporting the tiny-random bundle to {path} (random weights: its text is gibberish)")
    return export_bundle(path, preset="tiny-random")


def run(args) -> int:
    from focalrt.demo import demo_photo, pan_zoom_frames, write_clip
    from focalrt.runtime.pipeline import Pipeline
    from focalrt.runtime.run import RegionRunner
    from focalrt.runtime.sinks import JsonlSink, VideoSink, annotate
    from focalrt.runtime.sources import open_source

    bundle = ensure_bundle(Path(args.bundle))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline.from_bundle(bundle)
    photo = demo_photo()
    runner = RegionRunner(pipeline, regions="mouth")
    from focalrt.runtime.sources import Frame

    event = runner.process(Frame(0, 0.0, photo, 0.0))[0]
    print(f"photo, mouth at {event['box']}: {event['text']!r}")
    clip = write_clip(out / "clip.mp4", pan_zoom_frames(photo, args.frames))
    runner = RegionRunner(pipeline, regions="mouth,eyes,brows")
    source = open_source(str(clip))
    with source, JsonlSink(out / "events.jsonl") as jsonl, VideoSink(out / "annotated.mp4", 10.0, source.size) as video:
        for frame in source:
            events = runner.process(frame)
            for e in events:
                jsonl.write(e)
            video.write(frame.image, [{"box": e["box"], "label": f"face {e['face_id']} - {e['region']}",
                                       "text": e["text"]} for e in events])
            if frame.index == 0:
                import cv2

                cv2.imwrite(str(out / "first_frame.png"), annotate(frame.image, [
                    {"box": e["box"], "label": f"face {e['face_id']} - {e['region']}", "text": e["text"]}
                    for e in events]))
    print(f"clip: {json.dumps(runner.stats.as_dict())}")
    print(f"wrote {out / 'events.jsonl'}, {out / 'annotated.mp4'} and {out / 'first_frame.png'}")
    return 0
