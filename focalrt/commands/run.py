"""`focalrt run`: a camera, stream, video, folder or image in; region descriptions out, live."""

from __future__ import annotations

import json
import signal
import sys
import time

from focalrt.runtime.drafts import DEFAULT_DRAFT, DRAFT_HELP, MODES


def register(sub) -> None:
    p = sub.add_parser("run", help="describe face regions in a camera, stream, video, folder or image")
    p.add_argument("bundle")
    p.add_argument("--source", required=True,
                   help="camera index (0), video file, image or folder, rtsp://... or http(s)://... URL, "
                        "or a GStreamer pipeline ending in appsink")
    p.add_argument("--regions", help="named regions, comma separated (e.g. mouth,left_eye,brows); "
                                     "see `focalrt regions`")
    p.add_argument("--box", action="append", default=[], help="x1,y1,x2,y2 in frame pixels (repeatable)")
    p.add_argument("--prompt", help="instruction (default: the bundle's)")
    p.add_argument("--every", type=int, default=1,
                   help="process every N-th frame of a file; describe a region again every N frames")
    p.add_argument("--min-interval", type=float, default=0.0, help="seconds before a region is described again")
    p.add_argument("--change-threshold", type=float, default=None,
                   help="also describe a region again when its appearance changed by more than this "
                        "(signature distance in (0, 2], e.g. 0.1)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    p.add_argument("--out", help="JSONL file: one event per line, flushed line by line")
    p.add_argument("--write-video", help="annotated video file (.mp4 or .avi)")
    p.add_argument("--show", action="store_true", help="live window (needs a display and GUI OpenCV)")
    p.add_argument("--provider", default=None, help="cpu, cuda or tensorrt (default: best available)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--draft", choices=MODES, default=DEFAULT_DRAFT, help=DRAFT_HELP)
    p.set_defaults(func=run)


def run(args) -> int:
    from focalrt.runtime.pipeline import Pipeline
    from focalrt.runtime.regions import parse_box
    from focalrt.runtime.run import RegionRunner
    from focalrt.runtime.sinks import JsonlSink, ShowSink, VideoSink
    from focalrt.runtime.sources import SourceError, open_source

    if args.every < 1:
        raise ValueError(f"--every must be >= 1, got {args.every}")
    boxes = [parse_box(b) for b in args.box]
    show = ShowSink() if args.show else None  # fails early and clearly when there is no display
    pipeline = Pipeline.from_bundle(args.bundle, provider=args.provider)
    runner = RegionRunner(pipeline, regions=args.regions, boxes=boxes, every=args.every,
                          min_interval_s=args.min_interval, change_threshold=args.change_threshold,
                          prompt=args.prompt, max_new_tokens=args.max_new_tokens, draft=args.draft)
    source = open_source(args.source, every=args.every)
    jsonl = JsonlSink(args.out) if args.out else None
    video = None
    latest: dict[tuple, dict] = {}
    last_progress = 0.0
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
            now = time.perf_counter()
            if not args.quiet and (jsonl or args.write_video) and now - last_progress > 0.5:
                s = runner.stats.as_dict()
                print(f"\rframes {s['frames']}  {s['fps']:.2f} fps  events {s['events']}  "
                      f"(fresh {s['fresh_descriptions']})  no face {s['frames_without_face']}",
                      end="", file=sys.stderr, flush=True)
                last_progress = now
            if args.max_frames and runner.stats.frames >= args.max_frames:
                break
    except SourceError as e:
        print(f"\nfocalrt run: source lost: {e}", file=sys.stderr)
        code = 3
    except KeyboardInterrupt:
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"\nfocalrt run: {how}; closing outputs", file=sys.stderr)
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
    summary = {**runner.stats.as_dict(), "source": source.stats, "drafts": runner.drafts.stats()}
    print(("\n" if not args.quiet else "") + "summary " + json.dumps(summary), file=sys.stderr)
    return code
