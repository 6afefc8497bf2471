"""`focalrt run`: cameras, streams, videos, folders or images in; face states and region descriptions out, live.

Two lanes: the frame lane (capture, faces, ids, states, which regions are due) and the description lane (the
VLM). Live sources run them side by side, so the state stream keeps the camera's rate while descriptions are
written; files run them in lock-step (each frame described before the next is read: complete, reproducible).
--realtime replays a file as a camera would deliver it; --lockstep forces lock-step on a live source.

Exit status: 0 done; 2 bad input (nothing written); 3 a source was lost; 4 an output could not be written (the
message says what was kept); 5 the input had unreadable frames or ended before its declared length (see
corrupt_frames and frames_missing in the summary); 6 the --server went away and did not come back within its
reconnect attempts (summary "server": outages, retries, undescribed); 130 Ctrl-C; 143 SIGTERM.
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
    p.add_argument("--source", action="append", required=True,
                   help="camera index (0), video file, image or folder, rtsp://... or http(s)://... URL, "
                        "or a GStreamer pipeline ending in appsink; repeat it for several cameras in one process "
                        "(one model; every event then names its `source`, 0 for the first)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--realtime", action="store_true",
                      help="run a video file as a camera: replayed at its own frame rate, the state stream never "
                           "waiting for descriptions (live sources run this way by default)")
    mode.add_argument("--lockstep", action="store_true",
                      help="describe each frame's due regions before taking the next frame, also on a live source "
                           "(files run this way by default)")
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
    p.add_argument("--out", help="JSONL file: one event per line, flushed line by line (- for stdout; a FIFO needs "
                                 "its reader within 3 s); or *.mcap: typed events and annotated frames for Foxglove "
                                 "/ ROS 2 tools (needs the [robotics] extra)")
    p.add_argument("--mcap-flush", type=float, default=1.0, metavar="SECONDS",
                   help="with --out *.mcap: close and flush the open chunk this often, the most a kill may cost "
                        "(default 1 s)")
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
    p.add_argument("--threads", type=positive_int, default=None,
                   help="ONNX Runtime intra-op threads of the VLM's sessions (the description lane). Default: in "
                        "real time the cores the frame lane leaves (`focalrt doctor` shows them); in lock-step "
                        "ONNX Runtime's choice, one per core")
    p.add_argument("--face-threads", type=positive_int, default=None,
                   help="ONNX Runtime intra-op threads of the face models (the frame lane). Default: in real time 1 "
                        "on up to 4 cores, else 2; in lock-step ONNX Runtime's choice")
    p.add_argument("--face-provider", default=None,
                   help="execution provider of the face models: cpu, cuda or tensorrt (default: in real time the "
                        "CPU, leaving a GPU to the VLM; in lock-step the same as --provider)")
    p.add_argument("--describe-nice", type=int, default=0, choices=range(0, 20), metavar="N",
                   help="real time on Linux: run the description lane N nice levels below the frame lane (0-19), so "
                        "the state stream wins a contended core; descriptions then slow down, most on a busy machine "
                        "(default 0)")
    p.add_argument("--stop-timeout", type=non_negative_float, default=3.0,
                   help="real time, on Ctrl-C or SIGTERM: seconds the descriptions in flight may take to finish and "
                        "be written; after that they are dropped (dropped_at_stop in the summary)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress line; without --out, print only fresh events")
    p.add_argument("--server", help="describe on a `focalrt serve` at this URL (http://HOST:8000); faces stay local")
    p.add_argument("--server-timeout", type=non_negative_float, default=60.0,
                   help="with --server: seconds to wait at start for the server's models to be ready (a server "
                        "started with the camera loads them for a while); default 60")
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
  focalrt run BUNDLE --source clip.mp4 --realtime --regions mouth    # a file as a camera: states at its rate
  focalrt run BUNDLE --source 0 --source 1 --regions mouth --out events.jsonl   # two cameras, one model
"""

LIVE_KINDS = ("camera", "url", "gstreamer")


def realtime_mode(args) -> bool:
    """Real time for --realtime, or by default when any source is live (a camera, stream or pipeline)."""
    from focalrt.runtime.stream.sources import classify

    if args.realtime or args.lockstep:
        return bool(args.realtime)
    return any(classify(spec)[0] in LIVE_KINDS for spec in args.source)


def video_paths(args) -> list[str]:
    """--write-video's file, or with several sources one per source (NAME-source0.mkv, ...)."""
    from pathlib import Path

    if not args.write_video:
        return []
    if len(args.source) == 1:
        return [args.write_video]
    path = Path(args.write_video)
    return [str(path.with_name(f"{path.stem}-source{i}{path.suffix}")) for i in range(len(args.source))]



def run(args) -> int:
    from focalrt.commands.notices import warn_if_random
    from focalrt.commands.progress import ProgressLine
    from focalrt.outputs import is_stream, open_stream
    from focalrt.runtime.backends.sessions import lane_threads, resolve_providers
    from focalrt.runtime.faces.regions import parse_box
    from focalrt.runtime.stream.annotate import annotate
    from focalrt.runtime.stream.inbox import SourceSet
    from focalrt.runtime.stream.runner import RegionRunner, bundle_face_state, frame_loop
    from focalrt.runtime.stream.sinks import JsonlSink, ShowSink, VideoSink, WriteError
    from focalrt.runtime.stream.sources import SourceError, classify, open_source
    from focalrt.serve.client import ServerLost, open_pipeline

    if args.state_every < 0:
        raise ValueError(f"--state-every must be >= 0 (0 = no state events), got {args.state_every}")
    if not args.mcap_flush > 0:
        raise ValueError(f"--mcap-flush must be > 0 seconds, got {args.mcap_flush}")
    boxes = [parse_box(b) for b in args.box]
    schema = schema_choice(args)
    if args.server and args.threads:
        raise ValueError("--threads sizes the VLM's thread pool, and with --server the VLM runs on the server; drop "
                         "--threads (--face-threads sizes the face models, which stay local)")
    realtime = realtime_mode(args)
    kinds = [classify(spec)[0] for spec in args.source]
    if realtime and {"image", "folder"} & set(kinds):
        spec = args.source[next(i for i, k in enumerate(kinds) if k in ("image", "folder"))]
        raise ValueError(f"--source {spec}: an image or folder has no frame rate to replay in real time; run it "
                         f"with --lockstep (or without --realtime), or give a video file")
    if realtime:  # the two lanes share the cores: a pool each (see `focalrt doctor`)
        face_threads, threads = lane_threads(face=args.face_threads, describe=args.threads)
    else:
        face_threads, threads = args.face_threads, args.threads
    face_provider = args.face_provider or ("cpu" if realtime else None)
    locks = claim_outputs(args)  # before any model loads: refused outputs cost nothing
    opened = []
    out_stream = None
    try:
        if args.out and is_stream(args.out) and not args.out.lower().endswith(".mcap"):
            out_stream = open_stream(args.out, "--out")  # stdout, or a FIFO whose reader must show up now
        show = ShowSink() if args.show else None  # fails early and clearly when there is no display
        pipeline = open_pipeline(args.bundle, args.provider, args.server, threads=threads, spinning=not realtime,
                                 server_timeout_s=args.server_timeout)
        warn_if_random(pipeline.bundle)
        face_providers = resolve_providers(face_provider) if face_provider else None
        state = bundle_face_state(pipeline, args.smooth, face_providers, face_threads, spinning=not realtime) \
            if args.state_every and (args.regions or args.video_window) else None
        runner = RegionRunner(pipeline, regions=args.regions, boxes=boxes, every=args.every,
                              min_interval_s=args.min_interval, change_threshold=args.change_threshold,
                              prompt=args.prompt, max_new_tokens=args.max_new_tokens, state=state,
                              state_every=max(1, args.state_every), draft=args.draft, schema=schema,
                              video_window=args.video_window, window_stride=args.window_stride, realtime=realtime,
                              stop_timeout_s=args.stop_timeout, face_providers=face_providers,
                              face_threads=face_threads, describe_nice=args.describe_nice)
        for spec, kind in zip(args.source, kinds, strict=True):  # real time replays a video file at its rate
            live = {"live": True} if realtime and kind == "video" else {}
            opened.append(open_source(spec, every=args.every, loop=args.loop, open_timeout_s=args.open_timeout,
                                      read_timeout_s=args.read_timeout, **live))
        sources = SourceSet(opened)
        mcap_out = bool(args.out) and args.out.lower().endswith(".mcap")
        robot = None
        if mcap_out or args.foxglove is not None:
            from focalrt.runtime.stream.robotics import FoxgloveSink

            # claim_outputs already refused an existing --out without --overwrite and locked (created) the file
            robot = FoxgloveSink(args.out if mcap_out else None, port=args.foxglove, host=args.host, overwrite=True,
                                 flush_interval_s=args.mcap_flush)
            if robot.port is not None:
                print(f"Foxglove WebSocket on ws://{args.host}:{robot.port}", file=sys.stderr, flush=True)
        jsonl = JsonlSink(args.out, append=args.append, stream=out_stream) if args.out and not mcap_out else None
    except BaseException:
        for source in opened:
            source.close()
        if out_stream is not None:
            out_stream.close()
        for lock in locks:
            lock.release(remove_if_new_and_empty=True)
        raise
    several = len(opened) > 1
    video_files = video_paths(args)
    videos: dict[int | None, VideoSink] = {}
    shows: dict[int | None, ShowSink] = {None if not several else 0: show} if show else {}
    progress = ProgressLine(enabled=not args.quiet and bool(jsonl or args.write_video or robot))
    code = 0
    terminated: list[int] = []
    reported: list[WriteError] = []  # write errors already printed

    def on_sigterm(signum, _frame):  # a service manager or `docker stop`: end as Ctrl-C does, outputs closed
        terminated.append(signum)
        raise KeyboardInterrupt

    def emit(event: dict) -> None:
        if robot:
            robot.write(event)
        if jsonl:
            jsonl.write(event)
        elif not mcap_out and (not args.quiet or event.get("fresh")):
            print(json.dumps(event), flush=True)

    previous_sigterm = signal.signal(signal.SIGTERM, on_sigterm)
    loop = frame_loop(runner, sources, args.max_frames)
    try:
        for result in loop:
            for event in result.events:
                emit(event)
            frame = result.frame
            if frame is not None and (args.write_video or show or robot):
                annotations = result.annotations()
                if args.write_video:
                    if frame.source not in videos:
                        h, w = frame.image.shape[:2]
                        videos[frame.source] = VideoSink(video_files[frame.source or 0],
                                                         opened[frame.source or 0].fps or 10.0, (w, h))
                    videos[frame.source].write(frame.image, annotations)
                if robot:
                    robot.write_frame(annotate(frame.image, annotations), frame.timestamp, frame.source)
                if show:
                    if frame.source not in shows:
                        shows[frame.source] = ShowSink(f"focalrt source {frame.source}")
                    if shows[frame.source].write(frame.image, annotations) is False:
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
        reported.append(e)
        code = 4
    except ServerLost as e:
        progress.end()
        print(f"focalrt run: server lost: {e}", file=sys.stderr)
        code = 6
    except KeyboardInterrupt:
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        progress.end()
        print(f"focalrt run: {how}; closing outputs" + ("; finishing the descriptions in flight (up to "
                                                         f"{args.stop_timeout:g} s)" if realtime else ""),
              file=sys.stderr)
        code = 128 + (terminated[0] if terminated else signal.SIGINT)
    finally:
        try:
            loop.close()  # real time: stops the description lane (in flight: finished in time, or dropped)
            if code != 4:
                for event in runner.take_described():  # finished before the stop: written, not lost
                    emit(event)
        except WriteError as e:
            if e not in reported:
                print(f"focalrt run: {e}", file=sys.stderr)
                reported.append(e)
            code = 4
        finally:
            signal.signal(signal.SIGTERM, previous_sigterm)
            sources.close()
            if jsonl:
                jsonl.close()
            for window in shows.values():
                window.close()
            closers = [robot.close] if robot else []
            closers += [lambda video=video: video.close(check=code == 0) for video in videos.values()]
            for close in closers:  # each output is finished even when another failed
                try:
                    close()
                except WriteError as e:
                    if e not in reported:  # a sink that failed mid-run raises the same error again at close
                        progress.end()
                        print(f"focalrt run: {e}", file=sys.stderr)
                        reported.append(e)
                    code = 4
            for lock in locks:  # a video that never got a frame is not left behind as an empty file
                lock.release(remove_if_new_and_empty=lock.flag == "--write-video"
                             and lock.path not in {video.path for video in videos.values()})
    for i, why in sources.lost.items():
        print(f"focalrt run: source {i} ({sources.names[i]}) lost: {why}", file=sys.stderr)
        code = code or 3
    summary = {**runner.stats.as_dict(), "mode": "realtime" if realtime else "lockstep"}
    if several:
        summary["sources"] = [{"source": i, "name": sources.names[i], **source_summary(runner, i),
                               "capture": sources.stats(i), "lost": sources.lost.get(i)} for i in range(len(opened))]
    else:
        summary["source"] = sources.stats(0)
    summary["drafts"] = runner.drafts.stats()
    if args.server:
        summary["server"] = {"url": args.server, **pipeline.stats}
    if realtime:
        summary["lanes"] = {"frame_lane_threads": face_threads, "description_lane_threads": threads,
                            "face_providers": face_providers, "describe_provider": pipeline.providers[0],
                            "describe_nice": runner.lane.nice if runner.lane else None,
                            **(runner.lane.stats if runner.lane else {})}
    progress.end()
    print("summary " + json.dumps(summary), file=sys.stderr)
    bad: dict[str, int] = {}
    for source in opened:
        for k in ("corrupt_frames", "frames_missing"):
            if source.stats.get(k):
                bad[k] = bad.get(k, 0) + source.stats[k]
    if bad and code == 0:
        named = [n for source in opened for n in source.stats.get("unreadable_named") or []]  # image folders
        more = sum(source.stats.get("unreadable_files", 0) for source in opened) - len(named)
        files = f"; unreadable files: {', '.join(named)}" + (f" and {more} more" if more > 0 else "") if named else ""
        print(f"focalrt run: warning: the input was incomplete ({', '.join(f'{k} {v}' for k, v in bad.items())}"
              f"{files}); exit status 5", file=sys.stderr)
        code = 5
    return code


def source_summary(runner, index: int) -> dict:
    """One source's counts (frames, faces, states, descriptions) from the runner's per-source state."""
    state = runner.sources.get(index)
    if state is None:
        return {"frames": 0}
    s = state.stats.as_dict()
    return {k: s[k] for k in ("frames", "frames_without_face", "faces", "states", "fresh_descriptions",
                              "carried_over", "events")}



def claim_outputs(args) -> list:
    """Check --out and --write-video before any model loads, and hold an exclusive lock on each."""
    from pathlib import Path

    from focalrt.outputs import STDOUT, FileLock, OutputError, check_distinct, check_file, is_stream
    from focalrt.runtime.stream.sinks import KILL_SAFE_SUFFIXES

    if args.overwrite and args.append:
        raise OutputError("--overwrite and --append contradict each other; give one")
    if args.write_video and Path(args.write_video).suffix.lower() not in KILL_SAFE_SUFFIXES:
        raise OutputError(f"--write-video {args.write_video}: use a .mkv or .avi path (MJPEG), which stays "
                          f"playable if the run is killed; an .mp4 written by OpenCV does not")
    videos = video_paths(args)  # one per source when there are several
    out = args.out if args.out != STDOUT else None  # `--out -`: stdout, nothing to check or lock
    outputs = {"--out": out, **{"--write-video" + (f" ({i})" if len(videos) > 1 else ""): path
                                for i, path in enumerate(videos)}}
    for spec in args.source:  # two sources may be the same file; an output may not be any source
        check_distinct({"--source": spec if Path(spec).is_file() else None, **outputs})
    if out and out.lower().endswith(".mcap") and is_stream(out):
        raise OutputError(f"--out {out} is not a regular file; an MCAP file needs one (it seeks back to index "
                          f"its chunks): give a file path")
    if out:
        check_file(out, "--out", overwrite=args.overwrite, append=args.append, can_append=True)
    for path in videos:
        check_file(path, "--write-video", overwrite=args.overwrite)
        if not Path(path).resolve().is_file() and Path(path).exists():
            raise OutputError(f"--write-video {path} is not a regular file; give a file path")
    locks: list[FileLock] = []
    try:
        for flag, path in [("--out", out)] + [("--write-video", path) for path in videos]:
            if path:
                locks.append(FileLock(path, flag))
    except OutputError:
        for lock in locks:
            lock.release(remove_if_new_and_empty=True)
        raise
    return locks

