"""`focalrt run`: a camera, stream, video, folder or image in; region descriptions out, live."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from focalrt.commands.args import add_parser, add_provider, add_threads, non_negative_float, positive_int, unlimited_int


def signature_distance(text: str) -> float:
    """A change threshold: an appearance-signature distance in (0, 2]."""
    value = non_negative_float(text)
    if not 0 < value <= 2:
        raise argparse.ArgumentTypeError(f"{text} must be in (0, 2]")
    return value


def register(sub) -> None:
    p = add_parser(sub, "run", help="describe face regions in a camera, stream, video, folder or image",
                   description=__doc__ + RUN_EXAMPLES)
    p.add_argument("bundle", help="bundle directory written by `focalrt export`")
    p.add_argument("--source", required=True,
                   help="camera index (0), video file, image or folder, rtsp://... or http(s)://... URL, "
                        "or a GStreamer pipeline ending in appsink")
    p.add_argument("--regions", help="named regions, comma separated (e.g. mouth,left_eye,brows); "
                                     "see `focalrt regions`")
    p.add_argument("--box", action="append", default=[], help="x1,y1,x2,y2 in frame pixels (repeatable)")
    p.add_argument("--prompt", help="instruction (default: the bundle's)")
    p.add_argument("--every", type=positive_int, default=1,
                   help="process every N-th frame of a file; describe a region again every N frames")
    p.add_argument("--min-interval", type=non_negative_float, default=0.0,
                   help="seconds before a region is described again")
    p.add_argument("--change-threshold", type=signature_distance, default=None,
                   help="also describe a region again when its appearance changed by more than this "
                        "(signature distance in (0, 2], e.g. 0.1)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="most tokens per description (default: the bundle's generation setting)")
    p.add_argument("--max-frames", type=unlimited_int, default=None,
                   help="stop after this many frames; -1 = no limit (default: no limit, run until the source ends)")
    p.add_argument("--out", help="JSONL file: one event per line, flushed line by line")
    p.add_argument("--write-video", help="annotated video file (.mp4 or .avi)")
    p.add_argument("--show", action="store_true", help="live window (needs a display and GUI OpenCV)")
    add_provider(p)
    add_threads(p)
    p.add_argument("--quiet", action="store_true",
                   help="no progress line; without --out, print only fresh events")
    p.add_argument("--server", help="describe on a `focalrt serve` at this URL (http://HOST:8000); faces stay local")
    p.set_defaults(func=run)


RUN_EXAMPLES = """
examples:
  focalrt run BUNDLE --source 0 --regions mouth,eyes --out events.jsonl
  focalrt run BUNDLE --source clip.mp4 --regions mouth --write-video annotated.mp4
"""


def run(args) -> int:
    from focalrt.commands.notices import warn_if_random
    from focalrt.commands.progress import ProgressLine
    from focalrt.runtime.client import open_pipeline
    from focalrt.runtime.regions import parse_box
    from focalrt.runtime.run import RegionRunner
    from focalrt.runtime.sinks import JsonlSink, ShowSink, VideoSink
    from focalrt.runtime.sources import SourceError, open_source

    boxes = [parse_box(b) for b in args.box]
    show = ShowSink() if args.show else None  # fails early and clearly when there is no display
    pipeline = open_pipeline(args.bundle, args.provider, args.server, threads=args.threads)
    warn_if_random(pipeline.bundle)
    runner = RegionRunner(pipeline, regions=args.regions, boxes=boxes, every=args.every,
                          min_interval_s=args.min_interval, change_threshold=args.change_threshold,
                          prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    source = open_source(args.source, every=args.every)
    jsonl = JsonlSink(args.out) if args.out else None
    video = None
    latest: dict[tuple, dict] = {}
    progress = ProgressLine(enabled=not args.quiet and bool(jsonl or args.write_video))
    code = 0
    terminated: list[int] = []

    def on_sigterm(signum, _frame):  # a service manager or `docker stop`: end as Ctrl-C does, outputs closed
        terminated.append(signum)
        raise KeyboardInterrupt

    previous_sigterm = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for frame in source:
            events = runner.process(frame)
            for event in events:
                if jsonl:
                    jsonl.write(event)
                elif not args.quiet or event["fresh"]:
                    print(json.dumps(event), flush=True)
                latest[(event["face_id"], event["region"])] = event
            if args.write_video or show:
                annotations = [{"box": e["box"], "label": f"face {e['face_id']} - {e['region']}", "text": e["text"]}
                               for e in latest.values() if e["frame"] == frame.index]
                if args.write_video:
                    if video is None:
                        h, w = frame.image.shape[:2]
                        video = VideoSink(args.write_video, source.fps or 10.0, (w, h))
                    video.write(frame.image, annotations)
                if show and show.write(frame.image, annotations) is False:
                    break
            s = runner.stats.as_dict()
            progress.update(f"frames {s['frames']}  {s['fps']:.2f} fps  events {s['events']}  "
                            f"(fresh {s['fresh_descriptions']})  no face {s['frames_without_face']}")
            if args.max_frames and runner.stats.frames >= args.max_frames:
                break
    except SourceError as e:
        progress.end()
        print(f"focalrt run: source lost: {e}", file=sys.stderr)
        code = 3
    except KeyboardInterrupt:
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        progress.end()
        print(f"focalrt run: {how}; closing outputs", file=sys.stderr)
        code = 128 + (terminated[0] if terminated else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        source.close()
        if jsonl:
            jsonl.close()
        if video:
            video.close()
        if show:
            show.close()
    summary = {**runner.stats.as_dict(), "source": source.stats}
    progress.end()
    print("summary " + json.dumps(summary), file=sys.stderr)
    return code
