"""`focalrt bench`: per-stage latency percentiles, throughput, memory, roofline and scaling of a bundle.

    focalrt bench BUNDLE [--source clip.mp4] [--regions mouth,eyes] [--runs 20] --json out.json --plot out.png
    focalrt bench --compare A.json B.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from focalrt.commands.args import add_parser, add_provider, add_threads, non_negative_int, positive_int
from focalrt.runtime.generation.drafts import DEFAULT_DRAFT, DRAFT_HELP, MODES


def int_list(text: str) -> list[int]:
    """Comma-separated integers >= 1, e.g. 64,256,1024 (an argparse type: errors end in exit code 2)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated integers, e.g. 64,256,1024") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} names no value; give comma-separated integers, e.g. 1,2,4")
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be 1 or more")
    return values


def register(sub) -> None:
    p = add_parser(sub, "bench", help="measure a bundle: stage percentiles, tokens/s, memory, roofline, scaling",
                   description=__doc__)
    p.add_argument("bundle", nargs="?", help="bundle directory (not needed with --compare)")
    p.add_argument("--source", help="video, image, folder or camera (default: the face photo shipped with focalrt)")
    p.add_argument("--regions", help="named regions per face, e.g. mouth,eyes (default: mouth)")
    p.add_argument("--box", action="append", default=[], help="x1,y1,x2,y2 pixel box; repeat for more")
    p.add_argument("--runs", type=positive_int, default=20, help="timed frames")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed frames first")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="tokens per region (default: bundle's)")
    p.add_argument("--contexts", type=int_list, default="64,256,1024,2048",
                   help="KV cache fill levels for decode scaling")
    p.add_argument("--context-steps", type=positive_int, default=16, help="decode steps timed per context level")
    p.add_argument("--region-counts", type=int_list, default="1,2,4,8", help="regions per frame for region scaling")
    p.add_argument("--face-counts", type=int_list, default="1,2,4", help="faces per frame for face scaling")
    p.add_argument("--scaling-runs", type=positive_int, default=3, help="timed runs per scaling point")
    p.add_argument("--scaling-tokens", type=positive_int, default=16, help="tokens per region in the scaling curves")
    add_provider(p)
    add_threads(p)
    p.add_argument("--draft", choices=MODES, default=DEFAULT_DRAFT, help=DRAFT_HELP)
    p.add_argument("--json", dest="json_out", help="write every figure and the environment here")
    p.add_argument("--plot", help="write a PNG with stage bars, latency CDF, context and region scaling "
                                  "(needs the [bench] extra: matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--overwrite", action="store_true", help="replace existing --json / --plot files")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print the ratios B/A and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.compare:
        from focalrt.bench.ratios import compare_files

        print(compare_files(*args.compare), end="")
        return 0
    if not args.bundle:
        raise ValueError("give a BUNDLE directory to measure, or --compare A.json B.json")
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # say so now, not after the whole run
        raise ModuleNotFoundError("no module named 'matplotlib'", name="matplotlib")
    from focalrt.outputs import FileLock, check_distinct, check_file

    check_distinct({"--json": args.json_out, "--plot": args.plot})
    outputs = [(flag, path) for flag, path in (("--json", args.json_out), ("--plot", args.plot)) if path]
    for flag, path in outputs:  # before the benchmark, not after it
        check_file(path, flag, overwrite=args.overwrite)
    locks = [FileLock(path, flag) for flag, path in outputs]
    try:
        return _bench(args)
    finally:  # a bench that failed leaves no empty file behind
        for lock in locks:
            lock.release(remove_if_new_and_empty=True)


def _bench(args) -> int:
    from focalrt.bench.measure import Settings, run_bench
    from focalrt.bench.report import bench_report
    from focalrt.commands.notices import warn_if_random
    from focalrt.runtime.faces.regions import parse_box, parse_regions

    settings = Settings(runs=args.runs, warmup=args.warmup, max_new_tokens=args.max_new_tokens,
                        regions=parse_regions(args.regions) if args.regions else [],
                        boxes=[parse_box(b) for b in args.box], contexts=args.contexts,
                        context_steps=args.context_steps, region_counts=args.region_counts,
                        face_counts=args.face_counts, scaling_runs=args.scaling_runs,
                        scaling_tokens=args.scaling_tokens, provider=args.provider, threads=args.threads,
                        draft=args.draft)
    warn_if_random(args.bundle)
    progress = None if args.quiet else (lambda line: print(f"focalrt bench: {line}", file=sys.stderr, flush=True))
    result = run_bench(args.bundle, args.source, settings, progress=progress)
    print(bench_report(result), end="")  # first: a full disk below must not cost the figures
    try:
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
        if args.plot:
            from focalrt.bench.plots import save_plots

            save_plots(result, args.plot)
    except OSError as e:
        raise OSError(f"writing the results failed ({e}); the report above is all that was kept") from None
    if args.json_out or args.plot:
        print(f"wrote {', '.join(p for p in (args.json_out, args.plot) if p)}", file=sys.stderr)
    return 0
