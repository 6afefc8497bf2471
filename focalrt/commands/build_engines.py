"""`focalrt build-engines`: TensorRT engines for a bundle, built on the GPU that will run them."""

from __future__ import annotations

from focalrt.commands.args import add_parser, positive_float, positive_int


def register(sub) -> None:
    p = add_parser(sub, "build-engines", help="build TensorRT engines into BUNDLE/engines/ (needs tensorrt and a GPU)")
    p.add_argument("bundle", help="bundle directory written by `focalrt export`, `calibrate` or `convert`")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8", "fp8", "int4"], default=None,
                   help="engine precision (default: each component's own; fp16 turns an fp32 bundle into fp16 "
                        "engines; int8/fp8/int4 need a calibrated or converted bundle)")
    p.add_argument("--component", action="append", dest="components", default=None,
                   choices=["vision", "video", "embed", "decoder"], help="only this component (repeatable)")
    p.add_argument("--max-batch", type=positive_int, default=1, help="largest batch the engines accept")
    p.add_argument("--workspace-gb", type=positive_float, default=None,
                   help="TensorRT workspace limit in GB (default: TensorRT's, the GPU's free memory)")
    p.add_argument("--force", action="store_true", help="rebuild even engines that are up to date")
    p.set_defaults(func=run)


def run(args) -> int:
    from focalrt.commands.notices import warn_if_random
    from focalrt.runtime.backends.tensorrt_engines import build_engines

    warn_if_random(args.bundle)
    for r in build_engines(args.bundle, precision=args.precision, components=args.components,
                           max_batch=args.max_batch, force=args.force, workspace_gb=args.workspace_gb):
        detail = r.get("engine") or r.get("reason", "")
        changed = f" (changed: {'; '.join(r['changed'])})" if r.get("changed") else ""
        print(f"{r['component']}: {r['status']}{changed} {detail}".rstrip())
    return 0
