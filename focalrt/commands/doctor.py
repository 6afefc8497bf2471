"""`focalrt doctor`: what this device can run, and whether a bundle fits in its memory.

    focalrt doctor [BUNDLE]            providers, GPU, CUDA/TensorRT, which distribution gives onnxruntime and cv2
    focalrt doctor --check BUNDLE      the bundle on every provider here against the CPU: same tokens? how fast?

--check exits 1 when a provider gives other tokens or logits than the CPU, or fails to run; it is the first
thing to run on a new device (docs/deploy-jetson.md).
"""

from __future__ import annotations

import json

from focalrt.commands.args import add_parser, add_threads, positive_float, positive_int


def register(sub) -> None:
    p = add_parser(sub, "doctor", help="execution providers, GPU, CUDA/TensorRT, precisions, cameras, memory fit; "
                                       "--check: the bundle on every provider against the CPU", description=__doc__)
    p.add_argument("bundle", nargs="?", help="also check that this bundle fits in memory")
    p.add_argument("--check", action="store_true",
                   help="run a fixed short greedy describe of BUNDLE on the CPU and on every GPU provider here; "
                        "compare tokens and logits with the CPU, time the decode steps; exit 1 on a mismatch")
    p.add_argument("--providers", help="with --check: the providers to compare with the CPU, comma separated "
                                       "(cpu, cuda, tensorrt; default: CUDA and TensorRT where a GPU is found)")
    p.add_argument("--max-new-tokens", type=positive_int, default=8, help="with --check: tokens to compare")
    p.add_argument("--rtol", type=positive_float, default=None,
                   help="with --check: logits may differ by 1e-3 + RTOL x the step's largest CPU logit "
                        "(default: 0.01 for fp32 bundles, 0.05 for lower precisions)")
    add_threads(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-cameras", action="store_true", help="do not probe /dev/video* devices")
    p.set_defaults(func=run)


def run(args) -> int:
    from focalrt.commands.notices import warn_if_random

    if args.check:
        return run_check(args)
    from focalrt.runtime.backends.device import format_report, report, to_json

    if args.bundle:
        warn_if_random(args.bundle)
    r = report(args.bundle, cameras=None if args.no_cameras else probe_cameras())
    print(to_json(r) if args.json else format_report(r))
    problems = (r.bundle and r.bundle["fits"] is False) or any(m.error for m in r.modules)
    return 1 if problems else 0


def probe_cameras() -> list[int]:
    """The cameras that open; none when OpenCV itself cannot be imported (the report then says why)."""
    try:
        from focalrt.runtime.stream.sources import list_cameras
    except ImportError:
        return []
    return list_cameras()


def run_check(args) -> int:
    from focalrt.bench.provider_check import check_bundle, format_check
    from focalrt.commands.notices import warn_if_random

    if not args.bundle:
        raise ValueError("--check needs a BUNDLE: focalrt doctor --check BUNDLE")
    warn_if_random(args.bundle)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    result = check_bundle(args.bundle, providers=providers, threads=args.threads,
                          max_new_tokens=args.max_new_tokens, rtol=args.rtol)
    if not args.json:
        print(format_check(result))
    print(json.dumps(result))
    return 0 if result["ok"] else 1
