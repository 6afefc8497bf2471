"""`focalrt convert`: fp32 bundle -> FP16 or INT4 weight-only bundle, gated on real frames."""

from __future__ import annotations

from focalrt.calibration.int4_blocks import INT4_BLOCK_SIZE, INT4_BLOCK_SIZES
from focalrt.commands.args import add_parser, positive_int
from focalrt.commands.calibrate import add_gate_options, make, options_from


def register(sub) -> None:
    p = add_parser(sub, "convert", help="FP16 or INT4 weight-only conversion, with an accuracy gate",
                   description=__doc__ + "\nNeeds the [export] extra (onnx): pip install -e \".[export]\"")
    add_gate_options(p)
    p.add_argument("--precision", required=True, choices=["fp16", "int4"],
                   help="fp16 (GPUs) or int4 (weight-only decoder: CPUs and 8 GB Jetsons)")
    p.add_argument("--samples", type=positive_int, default=8,
                   help="frames recorded for the sensitivity ranking if the int4 gate needs the fallback")
    p.add_argument("--block-size", type=int, choices=list(INT4_BLOCK_SIZES), default=None,
                   help=f"int4 weights per scale along the input dimension (default {INT4_BLOCK_SIZE}, the group "
                        f"size of AWQ/GPTQ and TensorRT-LLM; 32 is finer and decodes slower on CPUs)")
    p.set_defaults(func=run)


def run(args) -> int:
    opts = options_from(args, args.precision, args.samples, None)
    if args.precision != "int4" and args.block_size is not None:
        raise ValueError("--block-size applies to --precision int4 only")
    opts.int4_block_size = args.block_size or INT4_BLOCK_SIZE
    return make(args, opts)
