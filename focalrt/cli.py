"""focalrt describes face regions (mouth, eyes, brows, ... or any box) in images, videos and cameras
with a vision-language model exported to ONNX.

start here:
  focalrt demo                                       try it on the built-in face photo and a generated clip
  focalrt describe BUNDLE --image face.jpg --box 120,80,260,190
  focalrt run BUNDLE --source 0 --regions mouth,eyes --out events.jsonl
  focalrt COMMAND --help                             every option of one command, with its default
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from focalrt import __version__
from focalrt.commands import notices
from focalrt.commands.args import HelpFormatter, Parser

# Order is the order of `focalrt --help`. Each module's top level imports only the standard library and
# focalrt.commands.args; what a command needs (onnxruntime, torch, onnx, matplotlib) is imported when it runs.
COMMANDS = ("export", "describe", "run", "regions", "demo", "bench", "perplexity", "calibrate", "convert",
            "build-engines", "doctor", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="focalrt", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"focalrt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"focalrt.commands.{name.replace('-', '_')}").register(sub)
    return parser


def missing_extra_message(command: str, error: ModuleNotFoundError) -> str | None:
    """One line naming what to install (an extra, or the device's ONNX Runtime / OpenCV), for a missing module."""
    from focalrt.extras import missing_module_message

    module = (error.name or "").split(".")[0]
    if error.name == "onnxruntime.quantization":
        module = "onnx"
    return missing_module_message(command, module)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (2 for a bad argument, after argparse's one-line message)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad argument: argparse has printed what to print
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "export" else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("default")
    # Sockets that a library (tritonclient's pool, while a server is not up yet) drops without closing are
    # reported at garbage collection, after the run's summary line; they are not the user's to act on.
    warnings.simplefilter("ignore", ResourceWarning)
    notices.reset()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        message = missing_extra_message(args.command, e)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as e:  # OSError: unwritable or full outputs
        print(f"focalrt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
