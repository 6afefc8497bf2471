"""Checks that PyTriton's Triton Python-backend stub will run under this interpreter, and fixes what can be fixed.

Two traps, both in the stub binary that PyTriton 0.7 ships (`triton_python_backend_stub`, one per Python minor):

1. It links `libpython3.X.so.1.0` by name, so the dynamic linker picks the system's copy, not the running
   interpreter's. Under pyenv, conda or any non-system Python of the same minor the stub then runs a different
   patch release against this interpreter's stdlib and model loading fails (`'_thread.RLock' object has no
   attribute '_recursion_count'`, or `No module named 'numpy'` when the system Python has no numpy). Fix: put
   this interpreter's LIBDIR first on LD_LIBRARY_PATH of the environment Triton is started with; PyTriton
   copies os.environ for the server, and the server passes it to the stub. No re-exec is needed because only
   the children load the stub.
2. It was built with a pybind11 that predates numpy 2 (it imports `numpy.core.multiarray`), and under numpy 2
   every output tensor arrives empty. PyTriton pins numpy<2 for that reason; we refuse to start under numpy 2
   with the fix in one line instead of serving empty answers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

NUMPY_FIX = ('PyTriton 0.7\'s Triton Python-backend stub needs numpy<2 (under numpy 2 every output comes back '
             'empty); serve from an environment with numpy<2 (the [serve] extra pins it), e.g. `python -m venv '
             '--system-site-packages .venv-serve`, and there: ')


class ServeEnvironmentError(RuntimeError):
    """The serving environment cannot work; the message says why and how to fix it in one line."""


def require_pytriton() -> None:
    try:
        import pytriton  # noqa: F401
    except ImportError:
        from focalrt.extras import install_hint

        raise ServeEnvironmentError(f"focalrt serve needs PyTriton: {install_hint('serve')}") from None


def require_numpy1() -> None:
    import numpy as np

    if int(np.__version__.split(".")[0]) >= 2:
        from focalrt.extras import install_hint

        raise ServeEnvironmentError(f"numpy {np.__version__} here: {NUMPY_FIX}{install_hint('serve')} "
                                    f"(see docs/serving.md)")


def stub_path() -> Path:
    """The Python-backend stub PyTriton will copy into its workspace for this Python minor."""
    import pytriton

    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    path = Path(pytriton.__file__).parent / "tritonserver" / "python_backend_stubs" / minor / \
        "triton_python_backend_stub"
    if not path.is_file():
        raise ServeEnvironmentError(f"PyTriton has no Python-backend stub for Python {minor} ({path} missing); "
                                    f"use Python 3.8-3.13")
    return path


def own_libpython() -> Path | None:
    """This interpreter's shared libpython (LIBDIR/INSTSONAME), or None for a statically linked build."""
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not libdir or not soname or not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    path = Path(libdir) / soname
    return path if path.exists() else None


def resolved_libpython(binary: Path, env: dict[str, str]) -> Path | None:
    """Which libpython the dynamic linker gives `binary` under `env` (from ldd), or None if none is linked."""
    try:
        out = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"libpython[\d.]+\.so[\d.]*\s+=>\s+(\S+)", out)
    return Path(m.group(1)) if m and m.group(1) != "not" else None


@dataclass
class LibpythonCheck:
    own: Path | None          # this interpreter's libpython
    before: Path | None       # what the stub would load with the environment as it was
    after: Path | None        # what it loads with the environment as fixed
    fixed: bool               # LD_LIBRARY_PATH was changed

    @property
    def ok(self) -> bool:
        return self.own is not None and self.after is not None and _same(self.own, self.after)

    def message(self) -> str:
        if self.ok:
            how = f"put {self.own.parent} first on LD_LIBRARY_PATH" if self.fixed else "already the one loaded"
            return f"Triton Python stub loads this interpreter's {self.own} ({how})"
        if self.own is None:
            return (f"this Python ({sys.executable}) has no shared libpython, so Triton's Python stub loads "
                    f"{self.before or 'no libpython'} instead and models fail to load; use a Python built with "
                    f"--enable-shared (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared) or the system Python")
        return (f"Triton's Python stub loads {self.after or 'no libpython'}, not this interpreter's {self.own}; "
                f"set LD_LIBRARY_PATH={self.own.parent} before starting")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:
        return False


def fix_libpython(env: dict[str, str] | None = None, stub: Path | None = None) -> LibpythonCheck:
    """Make the stub load this interpreter's libpython by editing `env` (default os.environ) in place."""
    env = os.environ if env is None else env
    stub = stub or stub_path()
    own = own_libpython()
    before = resolved_libpython(stub, dict(env))
    if own is None or (before is not None and _same(own, before)):
        return LibpythonCheck(own, before, before, fixed=False)
    current = env.get("LD_LIBRARY_PATH", "")
    env["LD_LIBRARY_PATH"] = str(own.parent) + (os.pathsep + current if current else "")
    after = resolved_libpython(stub, dict(env))
    return LibpythonCheck(own, before, after, fixed=True)


def prepare() -> LibpythonCheck:
    """Everything `focalrt serve` checks before starting Triton; raises ServeEnvironmentError with the fix."""
    require_pytriton()
    require_numpy1()
    check = fix_libpython()
    if not check.ok:
        raise ServeEnvironmentError(check.message())
    return check
