"""`focalrt`: one entry point. Each subcommand lives in focalrt/commands/ and imports its heavy parts
(torch for export, TensorRT for engines) only when it runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from focalrt import __version__

# Order is the order of `focalrt --help`.
COMMANDS = ("export", "describe", "run", "regions", "demo", "bench", "calibrate", "convert", "build-engines", "doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="focalrt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"focalrt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"focalrt.commands.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "export" else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("default")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, TypeError) as e:
        print(f"focalrt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
