"""Latency statistics: percentiles over a stated number of timed runs, after a warm-up.

Medians and tail percentiles rather than means, because one slow run (a page fault, another process
taking the core) moves a mean far more than it moves what a user sees most of the time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


def summarize(samples_ms: Sequence[float], warmup: int = 0) -> dict[str, Any]:
    """p50/p90/p99/max/mean/min in ms over `samples_ms`; `warmup` records how many runs were dropped first."""
    ms = np.asarray(list(samples_ms), np.float64)
    if ms.size == 0:
        raise ValueError("no timed runs to summarize; use --runs >= 1")
    out: dict[str, Any] = {f"p{p}_ms": float(np.percentile(ms, p)) for p in PERCENTILES}
    out.update({"max_ms": float(ms.max()), "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
                "runs": int(ms.size), "warmup": int(warmup)})
    return out


def time_runs(fn: Callable[[], Any], runs: int, warmup: int) -> tuple[dict[str, Any], list[float]]:
    """Call `fn` warmup times untimed, then `runs` times timed; (summary, samples in ms)."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs} warmup={warmup}")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return summarize(samples, warmup), samples


def rate_per_s(stats: dict[str, Any], per_run: float = 1.0) -> float:
    """Items per second at the median: `per_run` items take p50_ms."""
    return per_run * 1e3 / stats["p50_ms"] if stats["p50_ms"] > 0 else float("inf")
