"""The machine a result came from, stored with every result so two numbers are only compared knowingly."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from typing import Any

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ORT_NUM_THREADS")


def cpu_model() -> str:
    """The marketing name from /proc/cpuinfo on Linux; platform's guess elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> dict[str, int | None]:
    logical = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    physical = None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    return {"logical": logical, "physical": physical, "usable": usable}


def total_ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def cache_bytes(level: int = 3) -> int | None:
    """Size of the CPU cache at `level` (Linux sysfs); the roofline sizes its arrays well above it."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            d = os.path.join(base, entry)
            with open(os.path.join(d, "level")) as f:
                if int(f.read()) != level:
                    continue
            with open(os.path.join(d, "size")) as f:
                text = f.read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            return int(text.rstrip("KMG")) * mult
    except (OSError, ValueError):
        pass
    return None


def gpus() -> list[dict[str, str]]:
    """GPUs and driver from nvidia-smi; [] when there is none (or no NVIDIA driver)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            rows.append({"name": parts[0], "driver": parts[1], "memory_total": parts[2]})
    return rows


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(providers_used: list[str] | None = None, threads: int | None = None) -> dict[str, Any]:
    """Everything that moves a latency figure that we can read without privileges."""
    import numpy as np
    import onnxruntime as ort

    from focalrt import __version__

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": {"model": cpu_model(), **cpu_cores(), "l3_cache_bytes": cache_bytes(3)},
        "ram_bytes": total_ram_bytes(),
        "gpus": gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "focalrt": __version__,
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers_available": list(ort.get_available_providers()),
        "onnxruntime_providers_used": providers_used,
        "onnxruntime_genai": package_version("onnxruntime-genai"),
        "threads": threads,
        "thread_env": {k: os.environ.get(k) for k in THREAD_VARS},
        # Other processes on the machine make every figure noisier; the load average says how busy it was.
        "load_average_1_5_15": [round(x, 2) for x in load] if load else None,
    }


def describe(env: dict[str, Any]) -> str:
    """One line for a table caption."""
    cpu = env["cpu"]
    gpu = "; ".join(f"{g['name']} (driver {g['driver']})" for g in env.get("gpus") or []) or "no GPU"
    ram = env.get("ram_bytes")
    ram_s = f"{ram / 2**30:.0f} GiB RAM" if ram else "RAM unknown"
    return (f"{cpu['model']}, {cpu['usable']} usable cores, {ram_s}, {gpu}; onnxruntime {env['onnxruntime']} "
            f"({', '.join(env.get('onnxruntime_providers_used') or env['onnxruntime_providers_available'])}), "
            f"python {env['python']}, load {env.get('load_average_1_5_15')}")
