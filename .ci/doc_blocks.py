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


def script(path: Path, stage: str) -> str:
    blocks = blocks_for(path.read_text(), stage)
    if not blocks:
        raise SystemExit(f"{path}: no block marked '# run by CI: {stage}'")
    parts = ["set -euo pipefail"]
    for i, block in enumerate(blocks, 1):
        parts.append(f"echo '{path.name}: block {i} of {len(blocks)}' >&2")
        parts.append("set -x")
        parts.append(block.rstrip())
        parts.append("{ set +x; } 2>/dev/null")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.stdout.write(script(Path(sys.argv[1]), sys.argv[2]))
