"""The Python snippets of the README and docs/usage.md (the README's, with the decode loop's hooks) run as
written: after `focalrt demo` (here: the tiny-random bundle where the demo keeps it), on the photo shipped with
focalrt, with no camera. The README's shell blocks are checked by tests/test_doc_blocks.py and run by .ci/run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


@pytest.mark.parametrize("doc", ["README.md", "docs/usage.md"])
def test_readme_python_snippet_runs_as_written(tiny_bundle, tmp_path, doc):
    blocks = python_blocks((REPO / doc).read_text())
    assert len(blocks) == 1, f"{doc} has one Python snippet; test each one if that changes"
    home = tmp_path / "home"
    demo_bundle = home / ".cache" / "focalrt" / "bundles" / "tiny-random"
    demo_bundle.parent.mkdir(parents=True)
    demo_bundle.symlink_to(tiny_bundle, target_is_directory=True)
    script = tmp_path / "snippet.py"
    script.write_text(blocks[0])
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    finish = next(i for i, line in enumerate(lines) if re.fullmatch(r"\[length\] 16 tokens in \d+ ms", line))
    assert finish >= 1  # the streamed text came first, as pieces on its own line(s), not one token per line
    assert lines[finish + 1].startswith("[") and lines[finish + 1].count(",") >= 1  # two batched texts
    events = [line.split(" ", 3)[:2] for line in lines[finish + 2:]]
    assert sorted(region for _, region in events) == ["eyes", "mouth"]
