"""`focalrt build-engines`: TensorRT engines for a bundle, built on the GPU that will run them."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("build-engines", help="build TensorRT engines into BUNDLE/engines/ (needs tensorrt and a GPU)")
    p.add_argument("bundle")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8", "fp8", "int4"], default=None,
                   help="engine precision (default: each component's own; fp16 turns an fp32 bundle into fp16 "
                        "engines; int8/fp8/int4 need a calibrated or converted bundle)")
    p.add_argument("--component", action="append", dest="components", default=None,
                   choices=["vision", "embed", "decoder"], help="only this component (repeatable)")
    p.add_argument("--max-batch", type=int, default=1, help="largest batch the engines accept (default 1)")
    p.add_argument("--workspace-gb", type=float, default=None, help="TensorRT workspace limit in GB")
    p.add_argument("--force", action="store_true", help="rebuild even engines that are up to date")
    p.set_defaults(func=run)


def run(args) -> int:
    from focalrt.runtime.tensorrt_engines import build_engines

    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    for r in build_engines(args.bundle, precision=args.precision, components=args.components,
                           max_batch=args.max_batch, force=args.force, workspace_gb=args.workspace_gb):
        detail = r.get("engine") or r.get("reason", "")
        changed = f" (changed: {'; '.join(r['changed'])})" if r.get("changed") else ""
        print(f"{r['component']}: {r['status']}{changed} {detail}".rstrip())
    return 0
