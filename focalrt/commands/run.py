"""`focalrt run`: a camera, stream, video, folder or image in; region descriptions out, live.

Exit status: 0 done; 2 bad input (nothing written); 3 source lost; 4 an output could not be written (the
message says what was kept); 5 the input had unreadable frames or ended before its declared length (see
corrupt_frames and frames_missing in the summary); 130 Ctrl-C; 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from focalrt.commands.args import (
    add_parser,
    add_provider,
    add_schema,
    add_stream_timeouts,
    add_threads,
    non_negative_float,
    positive_int,
    schema_choice,
    unlimited_int,
)
from focalrt.runtime.generation.drafts import DEFAULT_DRAFT, DRAFT_HELP, MODES


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
    p.add_argument("--state-every", type=int, default=1,
                   help="with --regions, a `state` event (emotion, age, face geometry, head pose) per face "
                        "every N processed frames; 0 turns the state stream off (default 1)")
    p.add_argument("--smooth", type=float, nargs="?", const=0.6, default=0.0,
                   help="smooth the state stream over time: weight of the previous value in an EMA (default "
                        "off; 0.6 if given without a value)")
    p.add_argument("--max-frames", type=unlimited_int, default=None,
                   help="stop after this many frames; -1 = no limit (default: no limit, run until the source ends)")
    p.add_argument("--out", help="JSONL file: one event per line, flushed line by line; or *.mcap: typed events "
                                 "and annotated frames for Foxglove / ROS 2 tools (needs the [robotics] extra)")
    p.add_argument("--foxglove", type=int, nargs="?", const=8765, default=None, metavar="PORT",
                   help="stream events and annotated frames live to the Foxglove app over WebSocket "
                        "(default port 8765; needs the [robotics] extra)")
    p.add_argument("--host", default="127.0.0.1", help="address --foxglove binds to")
    p.add_argument("--write-video", help="annotated video (.mkv or .avi: MJPEG, playable after a kill)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out / --write-video files")
    p.add_argument("--append", action="store_true", help="add to an existing --out JSONL instead of refusing it")
    p.add_argument("--loop", action="store_true", help="start a video file, image or folder again at its end")
    add_stream_timeouts(p)
    p.add_argument("--show", action="store_true", help="live window (needs a display and GUI OpenCV)")
    add_provider(p)
    add_threads(p)
    p.add_argument("--quiet", action="store_true",
                   help="no progress line; without --out, print only fresh events")
    p.add_argument("--server", help="describe on a `focalrt serve` at this URL (http://HOST:8000); faces stay local")
    p.add_argument("--draft", choices=MODES, default=DEFAULT_DRAFT, help=DRAFT_HELP)
    add_schema(p)
    p.add_argument("--video-window", action="store_true",
                   help="also describe each tracked face's last F face crops together as a video (region "
                        "\"window\"; F = the bundle's video frames, 8 for Face-LLaVA); needs a bundle with a "
                        "video encoder. Without --prompt it asks the bundle's emotion question")
    p.add_argument("--window-stride", type=positive_int, default=1,
                   help="with --video-window, keep one crop every N processed frames, so a window spans "
                        "F x N frames (default 1)")
    p.set_defaults(func=run)


RUN_EXAMPLES = """
examples:
  focalrt run BUNDLE --source 0 --regions mouth,eyes --out events.jsonl
  focalrt run BUNDLE --source clip.mp4 --regions mouth --write-video annotated.mkv
  focalrt run BUNDLE --source 0 --video-window --window-stride 4   # Face-LLaVA video bundle: last 8 crops
"""


def run(args) -> int:
    from focalrt.commands.notices import warn_if_random
    from focalrt.commands.progress import ProgressLine
    from focalrt.runtime.faces.regions import parse_box
    from focalrt.runtime.stream.annotate import annotate
    from focalrt.runtime.stream.runner import RegionRunner, bundle_face_state, frame_loop
    from focalrt.runtime.stream.sinks import JsonlSink, ShowSink, VideoSink, WriteError
    from focalrt.runtime.stream.sources import SourceError, open_source
    from focalrt.serve.client import open_pipeline

    if args.state_every < 0:
        raise ValueError(f"--state-every must be >= 0 (0 = no state events), got {args.state_every}")
    boxes = [parse_box(b) for b in args.box]
    schema = schema_choice(args)
    if schema is not None and args.server:
        raise ValueError("--schema/--format json are not sent to --server yet; describe locally to constrain answers")
    if args.video_window and args.server:
        raise ValueError("--video-window is not sent to --server yet; describe video windows locally")
    locks = claim_outputs(args)  # before any model loads: refused outputs cost nothing
    try:
        show = ShowSink() if args.show else None  # fails early and clearly when there is no display
        pipeline = open_pipeline(args.bundle, args.provider, args.server, threads=args.threads)
        warn_if_random(pipeline.bundle)
        state = bundle_face_state(pipeline, args.smooth) \
            if args.state_every and (args.regions or args.video_window) else None
        runner = RegionRunner(pipeline, regions=args.regions, boxes=boxes, every=args.every,
                              min_interval_s=args.min_interval, change_threshold=args.change_threshold,
                              prompt=args.prompt, max_new_tokens=args.max_new_tokens, state=state,
                              state_every=max(1, args.state_every), draft=args.draft, schema=schema,
                              video_window=args.video_window, window_stride=args.window_stride)
        source = open_source(args.source, every=args.every, loop=args.loop, open_timeout_s=args.open_timeout,
                             read_timeout_s=args.read_timeout)
        mcap_out = bool(args.out) and args.out.lower().endswith(".mcap")
        robot = None
        if mcap_out or args.foxglove is not None:
            from focalrt.runtime.stream.robotics import FoxgloveSink

            # claim_outputs already refused an existing --out without --overwrite and locked (created) the file
            robot = FoxgloveSink(args.out if mcap_out else None, port=args.foxglove, host=args.host, overwrite=True)
            if robot.port is not None:
                print(f"Foxglove WebSocket on ws://{args.host}:{robot.port}", file=sys.stderr, flush=True)
        jsonl = JsonlSink(args.out, append=args.append) if args.out and not mcap_out else None
    except BaseException:
        for lock in locks:
            lock.release(remove_if_new_and_empty=True)
        raise
    video = None
    progress = ProgressLine(enabled=not args.quiet and bool(jsonl or args.write_video or robot))
    code = 0
    terminated: list[int] = []

    def on_sigterm(signum, _frame):  # a service manager or `docker stop`: end as Ctrl-C does, outputs closed
        terminated.append(signum)
        raise KeyboardInterrupt

    previous_sigterm = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for result in frame_loop(runner, source, args.max_frames):
            frame = result.frame
            for event in result.events:
                if robot:
                    robot.write(event)
                if jsonl:
                    jsonl.write(event)
                elif not mcap_out and (not args.quiet or event.get("fresh")):
                    print(json.dumps(event), flush=True)
            if args.write_video or show or robot:
                annotations = result.annotations()
                if args.write_video:
                    if video is None:
                        h, w = frame.image.shape[:2]
                        video = VideoSink(args.write_video, source.fps or 10.0, (w, h))
                    video.write(frame.image, annotations)
                if robot:
                    robot.write_frame(annotate(frame.image, annotations), frame.timestamp)
                if show and show.write(frame.image, annotations) is False:
                    break
            s = runner.stats.as_dict()
            progress.update(f"frames {s['frames']}  {s['fps']:.2f} fps  events {s['events']}  "
                            f"(fresh {s['fresh_descriptions']})  no face {s['frames_without_face']}")
    except SourceError as e:
        progress.end()
        print(f"focalrt run: source lost: {e}", file=sys.stderr)
        code = 3
    except WriteError as e:
        progress.end()
        print(f"focalrt run: {e}", file=sys.stderr)
        code = 4
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
        if robot:
            robot.close()
        if show:
            show.close()
        try:
            if video:
                video.close(check=code == 0)
        except WriteError as e:
            progress.end()
            print(f"focalrt run: {e}", file=sys.stderr)
            code = 4
        for lock in locks:  # a video that never got a frame is not left behind as an empty file
            lock.release(remove_if_new_and_empty=lock.flag == "--write-video" and video is None)
    summary = {**runner.stats.as_dict(), "source": source.stats, "drafts": runner.drafts.stats()}
    progress.end()
    print("summary " + json.dumps(summary), file=sys.stderr)
    bad = {k: source.stats[k] for k in ("corrupt_frames", "frames_missing") if source.stats.get(k)}
    if bad and code == 0:
        print(f"focalrt run: warning: the input was incomplete ({', '.join(f'{k} {v}' for k, v in bad.items())}); "
              f"exit status 5", file=sys.stderr)
        code = 5
    return code


def claim_outputs(args) -> list:
    """Check --out and --write-video before any model loads, and hold an exclusive lock on each."""
    from pathlib import Path

    from focalrt.outputs import FileLock, OutputError, check_distinct, check_file
    from focalrt.runtime.stream.sinks import KILL_SAFE_SUFFIXES

    if args.overwrite and args.append:
        raise OutputError("--overwrite and --append contradict each other; give one")
    if args.write_video and Path(args.write_video).suffix.lower() not in KILL_SAFE_SUFFIXES:
        raise OutputError(f"--write-video {args.write_video}: use a .mkv or .avi path (MJPEG), which stays "
                          f"playable if the run is killed; an .mp4 written by OpenCV does not")
    source = args.source if Path(args.source).is_file() else None
    check_distinct({"--source": source, "--out": args.out, "--write-video": args.write_video})
    if args.out:
        check_file(args.out, "--out", overwrite=args.overwrite, append=args.append, can_append=True)
    if args.write_video:
        check_file(args.write_video, "--write-video", overwrite=args.overwrite)
        if not Path(args.write_video).resolve().is_file() and Path(args.write_video).exists():
            raise OutputError(f"--write-video {args.write_video} is not a regular file; give a file path")
    locks: list[FileLock] = []
    try:
        for flag, path in (("--out", args.out), ("--write-video", args.write_video)):
            if path:
                locks.append(FileLock(path, flag))
    except OutputError:
        for lock in locks:
            lock.release(remove_if_new_and_empty=True)
        raise
    return locks

