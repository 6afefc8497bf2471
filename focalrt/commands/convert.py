"""`focalrt convert`: fp32 bundle -> FP16, INT8 or INT4 weight-only bundle, gated on real frames (or prompts)."""

from __future__ import annotations

import dataclasses
import sys

from focalrt.calibration.int4_blocks import INT4_BLOCK_SIZE, INT4_BLOCK_SIZES
from focalrt.commands.args import add_parser, positive_int
from focalrt.commands.calibrate import add_gate_options, make, options_from

# onnxruntime MatMulNBits quantizer algorithms (focalrt.calibration.quantize.INT4_ALGORITHMS, which imports onnx)
INT4_ALGORITHMS = ("rtn", "rtn_asym", "hqq", "gptq", "k_quant")


def register(sub) -> None:
    p = add_parser(sub, "convert", help="FP16, INT8 or INT4 weight-only conversion, with an accuracy gate",
                   description=__doc__ + "\nNeeds the [export] extra (onnx) and an ONNX Runtime ([cpu] or [gpu])")
    add_gate_options(p)
    p.add_argument("--precision", required=True, choices=["fp16", "int8", "int4"],
                   help="fp16 (GPUs); int8 (weight-only decoder, float activations: the accurate choice for a "
                        "trained LLM on the CPU; ONNX Runtime only); int4 (weight-only decoder: CPUs and 8 GB "
                        "Jetsons). `focalrt calibrate --precision int8` is the other int8: activations too")
    p.add_argument("--samples", type=positive_int, default=8,
                   help="frames (or prompts) recorded for the sensitivity ranking if the int4 gate needs the "
                        "fallback")
    p.add_argument("--block-size", type=int, choices=list(INT4_BLOCK_SIZES), default=None,
                   help="int4 weights per scale along the input dimension. Default: the coarsest of "
                        f"{sorted(INT4_BLOCK_SIZES, reverse=True)} whose bundle passes the gate without the "
                        f"fallback (the finest, with the fallback, if none does); it says which it chose")
    p.add_argument("--int4-algorithm", choices=list(INT4_ALGORITHMS), default="rtn",
                   help="onnxruntime MatMulNBits quantizer algorithm (default rtn: symmetric round-to-nearest "
                        "as QDQ, which TensorRT reads too; hqq/gptq/k_quant write ONNX Runtime-only MatMulNBits)")
    p.set_defaults(func=run)


def run(args) -> int:
    precision = "int8-weights" if args.precision == "int8" else args.precision
    opts = options_from(args, precision, args.samples, None)
    if args.precision != "int4" and (args.block_size is not None or args.int4_algorithm != "rtn"):
        raise ValueError("--block-size and --int4-algorithm apply to --precision int4 only")
    opts.int4_algorithm = args.int4_algorithm
    if args.precision != "int4" or args.block_size is not None:
        opts.int4_block_size = args.block_size or INT4_BLOCK_SIZE
        return make(args, opts)
    return choose_block_size(args, opts)


def choose_block_size(args, opts) -> int:
    """Try int4 block sizes from the coarsest (smallest, fastest) down; keep the first that passes."""
    from focalrt.calibration.make_bundle import GateFailed, make_bundle

    data = int(args.data) if str(args.data).isdigit() else args.data
    blocks = sorted(INT4_BLOCK_SIZES, reverse=True)
    for block in blocks:
        trial = dataclasses.replace(opts, int4_block_size=block, fallback=False, force=False)
        try:
            make_bundle(args.bundle, args.out, data, trial)
        except GateFailed as e:
            print(f"int4 block {block}: gate failed ({'; '.join(e.report['gate']['failures'])})", file=sys.stderr)
            continue
        print(f"int4: chose block size {block}, the coarsest of {blocks} that passes the gate "
              f"(report: {args.out}/calibration/report.json)")
        return 0
    finest = blocks[-1]
    print(f"int4: no block size passes the gate on its own; block {finest} with the fallback", file=sys.stderr)
    opts.int4_block_size = finest
    return make(args, opts)
