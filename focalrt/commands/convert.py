"""`focalrt convert`: fp32 bundle -> FP16 or INT4 weight-only bundle, gated on real frames."""

from __future__ import annotations

from focalrt.commands.calibrate import add_gate_options, make, options_from


def register(sub) -> None:
    p = sub.add_parser("convert", help="FP16 or INT4 weight-only conversion, with an accuracy gate")
    add_gate_options(p)
    p.add_argument("--precision", required=True, choices=["fp16", "int4"],
                   help="fp16 (GPUs) or int4 (weight-only decoder: CPUs and 8 GB Jetsons)")
    p.add_argument("--samples", type=int, default=8,
                   help="frames recorded for the sensitivity ranking if the int4 gate needs the fallback "
                        "(default 8)")
    p.add_argument("--block-size", type=int, choices=[16, 32, 64, 128], default=32,
                   help="int4 weights per scale along the input dimension (default 32; 128 decodes faster on "
                        "CPUs and is coarser)")
    p.set_defaults(func=run)


def run(args) -> int:
    opts = options_from(args, args.precision, args.samples, None)
    if args.precision != "int4" and args.block_size != 32:
        raise ValueError("--block-size applies to --precision int4 only")
    opts.int4_block_size = args.block_size
    return make(args, opts)
