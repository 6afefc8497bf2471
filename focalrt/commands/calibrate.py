"""`focalrt calibrate`: fp32 bundle -> INT8 or FP8 QDQ bundle, calibrated on real frames and gated."""

from __future__ import annotations

import sys

from focalrt.calibration.gate import DEFAULT_THRESHOLDS
from focalrt.commands.args import add_parser, non_negative_int, positive_int, probability, require, unit_interval


def add_gate_options(p) -> None:
    """Options shared by calibrate and convert: data, held-out split, gate thresholds, output."""
    p.add_argument("bundle", help="the fp32 bundle written by `focalrt export`")
    p.add_argument("--data", required=True,
                   help="image, folder of images, video file or camera index: frames to calibrate and to "
                        "check accuracy on")
    p.add_argument("--out", required=True, help="bundle directory to write (atomically)")
    p.add_argument("--holdout", type=positive_int, default=4,
                   help="held-out frames for the accuracy gate, never used for calibration")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed for frame sampling and region choice")
    p.add_argument("--max-new-tokens", type=positive_int, default=16,
                   help="tokens generated per request when recording and gating")
    meaning = {"min_vision_cosine": "lowest vision-embedding cosine over held-out frames",
               "min_logit_cosine": "mean per-step logit cosine under teacher forcing",
               "min_top1": "top-1 agreement under teacher forcing",
               "min_greedy_agreement": "mean greedy token agreement"}
    for key, value in DEFAULT_THRESHOLDS.items():
        p.add_argument("--" + key.replace("_", "-"), type=unit_interval, default=value, help=f"gate: {meaning[key]}")
    p.add_argument("--exclude-lm-head", action="store_true", help="keep the LM head in float")
    p.add_argument("--no-fallback", action="store_true",
                   help="do not keep the most sensitive nodes in float when the gate fails")
    p.add_argument("--max-fallback-fraction", type=probability, default=0.25,
                   help="most quantized nodes per component the fallback may keep in float, in (0, 1]")
    p.add_argument("--force", action="store_true", help="write the bundle even when the gate fails")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(sub) -> None:
    p = add_parser(sub, "calibrate", help="INT8/FP8 quantization calibrated on real frames, with an accuracy gate",
                   description=__doc__ + "\nNeeds the [export] extra (onnx) and an ONNX Runtime ([cpu] or [gpu])")
    add_gate_options(p)
    p.add_argument("--precision", required=True, choices=["int8", "fp8"],
                   help="int8 (CPU, CUDA, TensorRT) or fp8 (TensorRT on Ada/Hopper, SM 8.9+)")
    p.add_argument("--samples", type=positive_int, default=32, help="calibration frames")
    p.add_argument("--method", choices=["minmax", "entropy", "percentile"], default=None,
                   help="activation range method for int8 (default minmax); fp8 always uses 'distribution'")
    p.set_defaults(func=run)


def options_from(args, precision: str, samples: int, method: str | None):
    require("onnx")  # onnxruntime's quantizers, and our graph edits, read and write ONNX protos
    from focalrt.calibration.gate import Thresholds
    from focalrt.calibration.make_bundle import Options

    thresholds = Thresholds(**{k: getattr(args, k) for k in DEFAULT_THRESHOLDS})
    return Options(precision=precision, method=method, samples=samples, holdout=args.holdout, seed=args.seed,
                   max_new_tokens=args.max_new_tokens, thresholds=thresholds,
                   exclude_lm_head=args.exclude_lm_head, fallback=not args.no_fallback,
                   max_fallback_fraction=args.max_fallback_fraction, force=args.force, overwrite=args.overwrite,
                   progress=not args.quiet)


def make(args, opts) -> int:
    """Run the conversion; print the report table; exit 1 (and write nothing) when the gate fails."""
    from focalrt.calibration.make_bundle import GateFailed, make_bundle
    from focalrt.calibration.report import REPORT_JSON, markdown
    from focalrt.commands.notices import warn_if_random
    from focalrt.outputs import check_dir

    check_dir(args.out, "--out", overwrite=args.overwrite)  # before the model loads and calibrates
    warn_if_random(args.bundle)
    data = int(args.data) if str(args.data).isdigit() else args.data
    try:
        report = make_bundle(args.bundle, args.out, data, opts)
    except GateFailed as e:
        print(markdown(e.report), file=sys.stderr)
        print(f"focalrt {args.command}: {e}", file=sys.stderr)
        return 1
    print(markdown(report))
    print(f"bundle written to {args.out} (report: {args.out}/{REPORT_JSON})")
    return 0


def run(args) -> int:
    return make(args, options_from(args, args.precision, args.samples, args.method))
