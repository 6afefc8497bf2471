"""The runtime's rooms import downward only (docs/architecture.md, "Rooms"), and nothing reaches into another
module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[1] / "focalrt" / "runtime"
ORDER = ["frames", "backends", "models", "faces", "generation", "pipeline", "stream"]


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if parts[:2] == ["focalrt", "runtime"] and len(parts) > 2 else None


def imports(path: Path) -> list[str]:
    """Every focalrt module `path` imports, at any depth (lazy imports count too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return [m for m in out if m.startswith("focalrt.")]


def test_every_room_is_in_the_documented_order():
    rooms = {p.stem if p.is_file() else p.name for p in RUNTIME.iterdir()
             if not p.name.startswith("_") and (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert rooms == set(ORDER)


def test_rooms_import_only_rooms_below_them():
    upward = []
    for path in RUNTIME.rglob("*.py"):
        here = room_of(".".join(path.relative_to(RUNTIME.parents[1]).with_suffix("").parts))
        for module in imports(path):
            there = room_of(module)
            if here and there and there != here and ORDER.index(there) > ORDER.index(here):
                upward.append(f"{path.relative_to(RUNTIME.parents[1])} imports {module}")
    assert not upward, "\n".join(upward)


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in (RUNTIME.parent).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("focalrt"):
                offenders += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, "\n".join(offenders)


def test_every_benchmark_runs_as_a_module_and_none_edits_sys_path():
    """benchmarks/ is a package: scripts share `benchmarks.harness` by import, not by sys.path edits, and each
    answers `python -m benchmarks.NAME --help` from the checkout's root, as its docs say to run it."""
    import subprocess
    import sys

    root = RUNTIME.parents[1]
    scripts = sorted(p for p in (root / "benchmarks").glob("*.py") if p.stem not in ("__init__", "harness"))
    assert len(scripts) >= 10
    for path in scripts:
        assert "sys.path" not in path.read_text(), path.name
        done = subprocess.run([sys.executable, "-m", f"benchmarks.{path.stem}", "--help"], cwd=root,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage:" in done.stdout, (path.name, done.stderr[-500:])
