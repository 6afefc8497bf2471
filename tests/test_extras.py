"""Install hints work for a wheel and for a checkout, and the wheel leaves ONNX Runtime and OpenCV to the device."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from focalrt.extras import (
    DEVICE_MODULES,
    EXTRA_OF_MODULE,
    install_hint,
    missing_module_message,
    requirements_from_metadata,
    requirements_from_pyproject,
)

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")
Requirement = pytest.importorskip("packaging.requirements").Requirement
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]


def canonical(requirements: list[str]) -> set[str]:
    return {str(Requirement(r)) for r in requirements}


@pytest.fixture(scope="module")
def wheel_requires(tmp_path_factory) -> list[str]:
    """The Requires-Dist lines of the wheel this checkout builds (what a device installs)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(out)], check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("focalrt-*.whl")
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]


def test_the_wheel_alone_installs_no_onnxruntime_and_no_opencv(wheel_requires):
    core = [r for r in wheel_requires if ";" not in r or "extra ==" not in r]
    names = {Requirement(r).name for r in core}
    assert names == {"numpy", "tokenizers", "jsonschema"}, names
    assert canonical(requirements_from_metadata("cpu", wheel_requires)) == \
        canonical(["onnxruntime>=1.20", "opencv-python-headless>=4.8"])
    assert canonical(requirements_from_metadata("gpu", wheel_requires)) == \
        canonical(["onnxruntime-gpu>=1.20", "opencv-python-headless>=4.8"])


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_the_wheel_and_the_checkout_name_the_same_packages_for_every_extra(wheel_requires, extra):
    assert canonical(requirements_from_metadata(extra, wheel_requires)) == canonical(EXTRAS[extra])
    assert requirements_from_pyproject(extra) == EXTRAS[extra]


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_a_hint_names_the_extras_packages_and_the_checkout_form(extra):
    hint = install_hint(extra)
    assert hint.startswith("pip install ") and "\n" not in hint
    for requirement in EXTRAS[extra]:
        assert f'"{requirement}"' in hint
    assert f'in a focalrt checkout: pip install -e ".[{extra}]"' in hint


def test_every_module_an_extra_provides_maps_to_an_extra_that_exists():
    assert set(EXTRA_OF_MODULE.values()) <= set(EXTRAS)
    for module, extra in EXTRA_OF_MODULE.items():
        assert f"[{extra}] extra" in missing_module_message("describe", module)
    assert missing_module_message("describe", "numpy") is None  # a core dependency: a real bug, not a hint


@pytest.mark.parametrize("module", sorted(DEVICE_MODULES))
def test_missing_onnxruntime_or_opencv_names_both_routes_in_one_line(module):
    message = missing_module_message("run", module)
    assert "\n" not in message and message.startswith(f"focalrt run: needs {module!r}")
    assert '"onnxruntime>=1.20" "opencv-python-headless>=4.8"' in message  # a wheel's route, on a CPU
    assert 'pip install -e ".[cpu]"' in message  # a checkout's
    assert "the device's own build" in message and "onnxruntime-gpu" in message  # a Jetson's / GPU's
