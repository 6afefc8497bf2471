"""Small argparse helpers shared by every subcommand: value checks at parse time, one help style, the
options every inference command has.

A type function raises argparse.ArgumentTypeError, so a bad value ends in argparse's own one-line
`error: argument --x: ...` with exit code 2, before any model loads.
"""

from __future__ import annotations

import argparse
import math
import re


def _number(text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    return value


def positive_int(text: str) -> int:
    """An integer >= 1: sizes and counts."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be 1 or more")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0: seeds, counts where none is allowed."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def unlimited_int(text: str) -> int | None:
    """An integer >= 1, or -1 for no limit (returned as None)."""
    value = _number(text, int)
    if value == -1:
        return None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be 1 or more, or -1 for no limit")
    return value


def finite_float(text: str) -> float:
    """A real number, not nan or inf."""
    value = _number(text, float)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0: temperatures, seconds."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def probability(text: str) -> float:
    """A finite number in (0, 1]: top-p, fractions."""
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be in (0, 1]")
    return value


def unit_interval(text: str) -> float:
    """A finite number in [0, 1]: gate thresholds (cosines, agreement rates)."""
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be in [0, 1]")
    return value


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (no usage block), naming the command and where to look."""

    def error(self, message: str):
        # "argument --top-p: 1.5 must be in (0, 1]" reads as "--top-p 1.5 must be in (0, 1]"
        message = re.sub(r"^argument (\S+): ", r"\1 ", message)
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and appends each option's default, unless it has none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if ("%(default)" in help_text or "default" in help_text.lower() or default in (None, False, [])
                or default is argparse.SUPPRESS or not action.option_strings):
            return help_text
        return f"{help_text} (default: %(default)s)"


def add_parser(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:  # noqa: A002
    """A subcommand parser with the shared help style and -v/--verbose (so it works after the subcommand)."""
    p = sub.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress")
    return p


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=None,
                   help="ONNX Runtime intra-op threads per session (default: ONNX Runtime's choice, one per core)")


def add_provider(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", default=None,
                   help="execution provider: cpu, cuda or tensorrt (default: the best one available)")


def add_stream_timeouts(p: argparse.ArgumentParser) -> None:
    """--open-timeout / --read-timeout: how long a URL source may stay silent (OpenCV's own wait is ~30 s)."""
    p.add_argument("--open-timeout", type=positive_float, default=5.0, metavar="SECONDS",
                   help="rtsp:// or http(s):// sources: give up opening after this long (default 5)")
    p.add_argument("--read-timeout", type=positive_float, default=5.0, metavar="SECONDS",
                   help="rtsp:// or http(s):// sources: a frame that does not come within this long counts as a "
                        "dropped stream, which is reopened as a lost camera is (default 5)")


def require(*modules: str) -> None:
    """Fail before any work when a module an extra provides is missing; `focalrt.cli.main` turns the error
    into one line naming the extra and how to install it."""
    import importlib.util

    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def add_schema(p: argparse.ArgumentParser) -> None:
    """--schema FILE / --format json: constrain every answer to a JSON schema while it decodes (llguidance)."""
    p.add_argument("--schema", metavar="FILE",
                   help="constrain every answer to this JSON schema (a file, or face_state for the shipped "
                        "default); events carry the parsed object under `state` (needs the [grammar] extra)")
    p.add_argument("--format", choices=("text", "json"), default=None,
                   help="json: constrain answers to the bundle profile's JSON schema, else the shipped "
                        "face-state schema (docs/faces.md); text: free text (default)")


def schema_choice(args: argparse.Namespace) -> str | None:
    """The schema to constrain to, from --schema / --format: a path, "profile", or None (free text)."""
    if args.schema and args.format == "text":
        raise ValueError("--schema constrains answers to JSON; drop --format text")
    return args.schema or ("profile" if args.format == "json" else None)
