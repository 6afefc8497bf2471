"""Docs that CI runs: every shell block of the README and docs/deploy-*.md says whether CI executes it
(`# run by CI: .ci/STAGE`) or not (`# not run here: why`), the stages that are named really run their blocks,
and the Jetson recipe's install and first check are among the executed ones, so a missing dependency in the
recipe fails CI instead of a user's first hour on the board."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("deploy-*.md"))]


@pytest.fixture(scope="module")
def doc_blocks():
    spec = importlib.util.spec_from_file_location("doc_blocks", REPO / ".ci" / "doc_blocks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_shell_block_says_whether_ci_runs_it(doc_blocks, doc):
    text = doc.read_text()
    assert doc_blocks.shell_blocks(text), f"{doc.name} has no shell block: is the fence pattern still right?"
    assert doc_blocks.unmarked(text) == [], f"{doc.name}: blocks without a '# run by CI' / '# not run here' line"
    for block in doc_blocks.shell_blocks(text):
        m = doc_blocks.marker(block)
        if m is not None and m["stage"]:
            stage = REPO / m["stage"]
            assert stage.is_file(), f"{doc.name} names {m['stage']}, which does not exist"
            assert doc.name in stage.read_text() and "doc_blocks.py" in stage.read_text(), \
                f"{m['stage']} does not run {doc.name}'s blocks"


def test_a_block_without_a_marker_is_caught_and_stages_are_told_apart(doc_blocks):
    md = ("```sh\n# run by CI: .ci/device-check\npip install a.whl\n```\n\n"
          "```bash\n# not run here: needs a Jetson\nsudo nvpmodel -m 0\n```\n\n"
          "```\npip install b.whl\n```\n\n"
          "```bash\n# the tests\nbash .ci/run\n```\n\n"
          "```python\nprint('not a shell block')\n```\n")
    assert doc_blocks.unmarked(md) == ["pip install b.whl"]
    assert doc_blocks.blocks_for(md, ".ci/device-check") == ["# run by CI: .ci/device-check\npip install a.whl\n"]
    assert doc_blocks.blocks_for(md, ".ci/run") == []


def test_the_jetson_recipe_install_and_first_check_run_in_ci(doc_blocks):
    run = "\n".join(doc_blocks.blocks_for((REPO / "docs" / "deploy-jetson.md").read_text(), ".ci/device-check"))
    lines = [line.split("#")[0].strip() for line in run.splitlines()]
    install = [line for line in lines if line.startswith("pip install") and "focalrt" in line]
    assert install == ["pip install -q focalrt-*.whl"], install  # the wheel with no extra: the device's ORT stays
    assert "pip install -q onnxruntime opencv-python-headless" in lines  # the x86 stand-ins, before it
    assert lines.index(install[0]) > lines.index("pip install -q onnxruntime opencv-python-headless")
    assert "focalrt doctor --check bundles/frf-int4" in lines and "pip check" in lines
    device_check = (REPO / ".ci" / "device-check").read_text()
    assert "deploy-jetson.md\" .ci/device-check" in device_check and "bash \"$work/jetson.sh\"" in device_check


def test_the_readme_main_job_and_real_model_run_in_ci(doc_blocks):
    run = "\n".join(doc_blocks.blocks_for((REPO / "README.md").read_text(), ".ci/run"))
    assert "focalrt demo" in run and 'pip install -e ".[cpu,export]"' in run
    assert '.[grammar]' in run and run.index('.[grammar]') < run.index("--format json")  # the extra it needs, first
    assert "doc_blocks.py README.md .ci/run" in (REPO / ".ci" / "run").read_text()


def test_a_failing_command_inside_an_and_list_stops_the_stage(doc_blocks, tmp_path):
    """bash's `set -e` ignores the failure of `a` in `a && b`; the script doc_blocks writes must not."""
    import subprocess

    doc = tmp_path / "doc.md"
    doc.write_text("```sh\n# run by CI: .ci/run\ntrue && echo first \\\n  line\n```\n\n"
                   "```sh\n# run by CI: .ci/run\nfalse && echo never   # an inline comment\necho reached\n```\n")
    out = subprocess.run(["bash", "-c", doc_blocks.script(doc, ".ci/run")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "first line" in out.stdout and "reached" not in out.stdout, out
    assert "doc block failed (exit 1)" in out.stderr
