"""The shell blocks of a doc that CI runs, as one bash script: docs whose commands are executed cannot rot.

    python .ci/doc_blocks.py FILE STAGE      e.g. docs/deploy-jetson.md .ci/device-check

Every ```sh (or ```bash) block in the README and docs/deploy-*.md starts with one marker line:

    # run by CI: .ci/device-check        executed, as written, by that CI stage
    # run by CI: .ci/run                 executed, as written, by .ci/run
    # not run here: <why>                not executed (it needs a Jetson, a GPU, a camera, a real checkpoint)

A block whose only command is `bash .ci/run` is CI itself and carries no marker. tests/test_doc_blocks.py
checks that every block has one; this script prints the blocks of FILE marked for STAGE, in order, so the
stage runs them in one bash process (a `source .../activate` in one block holds for the next).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

MARKER = re.compile(r"^# (run by CI: (?P<stage>\.ci/[\w-]+)|not run here: \S.*)$")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", flags=re.M | re.S)
SHELL = {"sh", "bash", "shell", "console"}
CI_ITSELF = "bash .ci/run"
CHECK = 'rc=$?; [ "$rc" -eq 0 ] || { echo "doc block failed (exit $rc): the line above" >&2; exit "$rc"; }'


def shell_blocks(markdown: str) -> list[str]:
    """The bodies of the shell blocks (and of blocks with no language, so none escapes the marker rule)."""
    return [m["body"] for m in FENCE.finditer(markdown) if m["lang"] in SHELL or not m["lang"]]


def marker(block: str) -> re.Match | None:
    """The block's marker line (its first line), or None when it has none."""
    first = block.splitlines()[0].strip() if block.strip() else ""
    return MARKER.match(first)


def unmarked(markdown: str) -> list[str]:
    """Blocks with neither marker (and not CI itself): each one's first line, to name it."""
    out = []
    for block in shell_blocks(markdown):
        commands = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if commands == [CI_ITSELF]:
            continue
        if marker(block) is None:
            out.append(block.splitlines()[0] if block.strip() else "(empty block)")
    return out


def blocks_for(markdown: str, stage: str) -> list[str]:
    """The blocks CI's `stage` runs, in the doc's order."""
    return [b for b in shell_blocks(markdown) if (m := marker(b)) is not None and m["stage"] == stage]


def checked(block: str) -> str:
    """The block with its exit status checked after every command line. `set -e` alone lets the first command
    of `a && b && c` fail unnoticed (bash exempts all but the last command of an && list), and README users
    type such lines; each logical line (backslash continuations joined) is followed by a check of `$?`."""
    out, pending = [], ""
    for line in block.splitlines():
        pending += line + "\n"
        if line.endswith("\\"):
            continue
        text, pending = pending, ""
        out.append(text.rstrip("\n"))
        if text.strip() and not text.lstrip().startswith("#"):
            if re.match(r"\s*(if|for|while|until|case|function)\b|.*<<", text):
                raise SystemExit(f"a CI block keeps to simple command lines (no compound commands or here-documents): "
                                 f"{text.strip()}")
            out.append(CHECK)
    return "\n".join(out)


def script(path: Path, stage: str) -> str:
    blocks = blocks_for(path.read_text(), stage)
    if not blocks:
        raise SystemExit(f"{path}: no block marked '# run by CI: {stage}'")
    parts = ["set -euo pipefail"]
    for i, block in enumerate(blocks, 1):  # each block is shown (on stderr) before it runs, as the doc has it
        parts.append(f"cat >&2 <<'END_OF_BLOCK'\n--- {path.name}: block {i} of {len(blocks)}\n{block.rstrip()}\n"
                     f"END_OF_BLOCK")
        parts.append(checked(block.rstrip()))
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.stdout.write(script(Path(sys.argv[1]), sys.argv[2]))
