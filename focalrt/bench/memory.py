"""Process memory: peak and current RSS, and GPU memory when a GPU is in use.

Peak RSS is the kernel's high-water mark for the whole process, so a benchmark that wants one runtime's
peak must run it in a process of its own (benchmarks/decode.py does).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int | None:
    """High-water resident set of this process so far.

    On Linux this is VmHWM, which starts afresh at exec. getrusage's ru_maxrss does not: a child
    started from a big parent reports the parent's peak, which would charge a benchmark worker for
    its orchestrator's memory.
    """
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
    except ImportError:  # Windows
        pass
    try:
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    except ImportError:
        return None


def current_rss_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def gpu_memory_bytes(pid: int | None = None) -> int | None:
    """GPU memory held by process `pid` (default: this one) per nvidia-smi; None without a GPU."""
    if not shutil.which("nvidia-smi"):
        return None
    pid = pid or os.getpid()
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    total = None
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            total = (total or 0) + int(parts[1]) * (1 << 20)  # MiB
    return total


def memory_record() -> dict[str, int | None]:
    return {"peak_rss_bytes": peak_rss_bytes(), "rss_bytes": current_rss_bytes(),
            "gpu_memory_bytes": gpu_memory_bytes()}
