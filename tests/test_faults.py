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


# --- strict manifest validation -----------------------------------------------------------------------------

def _drop(section: str, key: str):
    return lambda m: m[section].pop(key)


def _set(path: str, value):
    def change(m):
        *parents, last = path.split(".")
        for p in parents:
            m = m[p]
        m[last] = value
    return change


MALFORMED = [  # (case, change, the key path the one-line error must name)
    ("missing num_layers", _drop("text", "num_layers"), "text.num_layers is missing"),
    ("missing stop_tokens", _drop("prompt", "stop_tokens"), "prompt.stop_tokens is missing"),
    ("missing num_kv_heads", _drop("text", "num_kv_heads"), "text.num_kv_heads is missing"),
    ("negative image_size", _set("preprocess.image_size", -28), "preprocess.image_size -28 is less than"),
    ("face_models yes", _set("face_models", "yes"), "face_models is \"yes\" (str)"),
    ("byte count as string", _set("components.vision.bytes", "1090152"), "components.vision.bytes is \"1090152\""),
    ("component is a string", _set("components.embed", "embed.onnx"), "components.embed is \"embed.onnx\""),
    ("rescale as string", _set("preprocess.rescale", "1/255"), "preprocess.rescale is \"1/255\""),
    ("max_context zero", _set("text.max_context", 0), "text.max_context 0 is less than"),
    ("stop_tokens not a list", _set("prompt.stop_tokens", "<|im_end|>"), "prompt.stop_tokens is"),
    ("image_size off the patch grid", _set("preprocess.image_size", 300), "multiple of"),
    ("detector anchors missing", lambda m: m["face_models"]["detector"].pop("anchors"),
     "face_models.detector.anchors is missing"),
    ("temperature negative", _set("generation.temperature", -1), "generation.temperature -1"),
    ("format_version string", _set("format_version", "1"), "format_version '1'"),
]


@pytest.fixture(scope="module")
def malformed_root(tiny_bundle, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("malformed")


@pytest.mark.parametrize("case,change,expected", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_manifest_is_one_clear_line(tiny_bundle, malformed_root, case, change, expected):
    b = edit_manifest(linked_copy(tiny_bundle, malformed_root / case.replace(" ", "_")), change)
    with pytest.raises(BundleError, match="manifest.json") as err:
        load(b)
    assert expected in str(err.value)
    line = one_line_error(cli("describe", b, "--image", ASTRONAUT))
    assert expected in line and ("re-export" in line or "fix" in line)


def test_unknown_extra_keys_and_text_only_sections_are_accepted(tiny_bundle, tmp_path):
    """Exporters may add fields (random-weights flags, chat templates); old bundles keep loading."""
    b = edit_manifest(linked_copy(tiny_bundle, tmp_path / "b"),
                      lambda m: m.update(random_weights=True, prompt={**m["prompt"], "chat_template": "x"}))
    assert load(b).manifest["random_weights"] is True


def test_bundle_that_is_a_file_and_image_that_is_a_directory(tiny_bundle, tmp_path):
    line = one_line_error(cli("describe", tiny_bundle / "manifest.json", "--image", ASTRONAUT))
    assert "is a file, not a directory" in line and "does not exist" not in line
    line = one_line_error(cli("describe", tiny_bundle, "--image", tmp_path))
    assert "is a directory" in line and "does not exist" not in line
