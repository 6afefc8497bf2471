"""Fault suite (issue 12): hostile and unlucky inputs end in one clear line and a non-zero exit, never a
traceback, a clobbered file, an escaped path or a silently short output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from focalrt.bundle import BundleError, load

ASTRONAUT = Path(__file__).resolve().parents[1] / "focalrt" / "data" / "astronaut.jpg"


def cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "focalrt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def one_line_error(proc: subprocess.CompletedProcess, rc: int = 2) -> str:
    """The stderr of a refused command: exit code rc, one line, no traceback. Returns that line."""
    assert proc.returncode == rc, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def linked_copy(bundle: Path, dst: Path) -> Path:
    """A copy of the bundle whose files are hard links (cheap), so each test may edit its manifest."""
    def link(src, to):
        try:
            os.link(src, to)
        except OSError:
            shutil.copy2(src, to)
    shutil.copytree(bundle, dst, copy_function=link)
    (dst / "manifest.json").unlink()
    shutil.copy2(bundle / "manifest.json", dst / "manifest.json")
    return dst


def edit_manifest(bundle: Path, change) -> Path:
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    (bundle / "manifest.json").write_text(json.dumps(m))
    return bundle


# --- bundle containment -------------------------------------------------------------------------------------

def test_manifest_path_with_dotdot_is_refused(tiny_bundle, tmp_path):
    b = linked_copy(tiny_bundle, tmp_path / "b")
    outside = tmp_path / "outside_model"
    outside.mkdir()
    shutil.copy2(b / "vision.onnx", outside / "vision.onnx")
    edit_manifest(b, lambda m: m["components"]["vision"].update(file="../outside_model/vision.onnx"))
    with pytest.raises(BundleError, match=r"components\.vision\.file .*outside the bundle"):
        load(b)


def test_manifest_absolute_path_is_refused(tiny_bundle, tmp_path):
    b = linked_copy(tiny_bundle, tmp_path / "b")
    target = tmp_path / "abs_tokenizer.json"
    shutil.copy2(b / "tokenizer.json", target)
    edit_manifest(b, lambda m: m["tokenizer"].update(file=str(target)))
    with pytest.raises(BundleError, match=r"tokenizer\.file .*outside the bundle"):
        load(b)


def test_symlink_escaping_the_bundle_is_refused(tiny_bundle, tmp_path):
    b = linked_copy(tiny_bundle, tmp_path / "b")
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy2(b / "faces" / "face_landmark.onnx", outside)
    (b / "faces" / "face_landmark.onnx").unlink()
    (b / "faces" / "face_landmark.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match=r"face_models\.landmarks\.file .*outside the bundle"):
        load(b)
    # a symlink that stays inside the bundle is fine
    (b / "faces" / "face_landmark.onnx").unlink()
    shutil.move(outside, b / "real_landmark.onnx")
    (b / "faces" / "face_landmark.onnx").symlink_to(b / "real_landmark.onnx")
    assert load(b).family == "qwen2_5_vl"


def test_escaping_bundle_fails_on_the_command_line(tiny_bundle, tmp_path):
    b = linked_copy(tiny_bundle, tmp_path / "b")
    (tmp_path / "outside_model").mkdir()
    shutil.copy2(b / "vision.onnx", tmp_path / "outside_model" / "vision.onnx")
    edit_manifest(b, lambda m: m["components"]["vision"].update(file="../outside_model/vision.onnx"))
    line = one_line_error(cli("describe", b, "--image", ASTRONAUT))
    assert "components.vision.file" in line and "outside the bundle" in line
