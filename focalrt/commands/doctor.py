"""`focalrt doctor`: what this device can run, and whether a bundle fits in its memory."""

from __future__ import annotations

from focalrt.commands.args import add_parser


def register(sub) -> None:
    p = add_parser(sub, "doctor", help="execution providers, GPU, CUDA/TensorRT, precisions, cameras, memory fit")
    p.add_argument("bundle", nargs="?", help="also check that this bundle fits in memory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-cameras", action="store_true", help="do not probe /dev/video* devices")
    p.set_defaults(func=run)


def run(args) -> int:
    from focalrt.commands.notices import warn_if_random
    from focalrt.runtime.backends.device import format_report, report, to_json

    if args.bundle:
        warn_if_random(args.bundle)
    from focalrt.runtime.stream.sources import list_cameras

    r = report(args.bundle, cameras=None if args.no_cameras else list_cameras())
    print(to_json(r) if args.json else format_report(r))
    return 0 if not r.bundle or r.bundle["fits"] is not False else 1
