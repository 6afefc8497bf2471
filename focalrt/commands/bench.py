"""`focalrt bench`: per-stage latency percentiles, throughput, memory, roofline and scaling of a bundle.

    focalrt bench BUNDLE [--source clip.mp4] [--regions mouth,eyes] [--runs 20] --json out.json --plot out.png
    focalrt bench --compare A.json B.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from focalrt.runtime.drafts import DEFAULT_DRAFT, DRAFT_HELP, MODES


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{text!r} must be comma-separated integers, e.g. 64,256,1024") from None
    if not values:
        raise ValueError(f"{text!r} names no value; give comma-separated integers, e.g. 1,2,4")
    return values


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure a bundle: stage percentiles, tokens/s, memory, roofline, scaling")
    p.add_argument("bundle", nargs="?", help="bundle directory (not needed with --compare)")
    p.add_argument("--source", help="video, image, folder or camera (default: scikit-image's astronaut photo)")
    p.add_argument("--regions", help="named regions per face, e.g. mouth,eyes (default: mouth)")
    p.add_argument("--box", action="append", default=[], help="x1,y1,x2,y2 pixel box; repeat for more")
    p.add_argument("--runs", type=int, default=20, help="timed frames (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed frames first (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens per region (default: bundle's)")
    p.add_argument("--contexts", default="64,256,1024,2048", help="KV cache fill levels for decode scaling")
    p.add_argument("--context-steps", type=int, default=16, help="decode steps timed per context level")
    p.add_argument("--region-counts", default="1,2,4,8", help="regions per frame for region scaling")
    p.add_argument("--face-counts", default="1,2,4", help="faces per frame for face scaling")
    p.add_argument("--scaling-runs", type=int, default=3, help="timed runs per scaling point (default 3)")
    p.add_argument("--scaling-tokens", type=int, default=16, help="tokens per region in the scaling curves")
    p.add_argument("--provider", default=None, help="cpu, cuda or tensorrt (default: best available)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's)")
    p.add_argument("--draft", choices=MODES, default=DEFAULT_DRAFT, help=DRAFT_HELP)
    p.add_argument("--json", dest="json_out", help="write every figure and the environment here")
    p.add_argument("--plot", help="write a PNG with stage bars, latency CDF, context and region scaling")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print the ratios B/A and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.compare:
        from focalrt.bench.compare import compare_files

        print(compare_files(*args.compare), end="")
        return 0
    if not args.bundle:
        raise ValueError("give a BUNDLE directory to measure, or --compare A.json B.json")
    from focalrt.bench.measure import Settings, run_bench
    from focalrt.bench.report import bench_report
    from focalrt.runtime.regions import parse_box, parse_regions

    settings = Settings(runs=args.runs, warmup=args.warmup, max_new_tokens=args.max_new_tokens,
                        regions=parse_regions(args.regions) if args.regions else [],
                        boxes=[parse_box(b) for b in args.box], contexts=int_list(args.contexts),
                        context_steps=args.context_steps, region_counts=int_list(args.region_counts),
                        face_counts=int_list(args.face_counts), scaling_runs=args.scaling_runs,
                        scaling_tokens=args.scaling_tokens, provider=args.provider, threads=args.threads,
                        draft=args.draft)
    result = run_bench(args.bundle, args.source, settings)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        from focalrt.bench.plots import save_plots

        save_plots(result, args.plot)
    print(bench_report(result), end="")
    if args.json_out or args.plot:
        print(f"wrote {', '.join(p for p in (args.json_out, args.plot) if p)}", file=sys.stderr)
    return 0
