"""PNG plots of a `focalrt bench` result: stage breakdown, latency CDF, tokens/s vs context, scaling.

matplotlib (the `bench` extra) is imported inside `save_plots` with the Agg backend, so plotting works
headless and importing this module costs nothing.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def stage_share_ms(result: dict[str, Any]) -> dict[str, float]:
    """Mean ms each stage costs per frame: a stage's mean times how often it ran per frame.

    TTFT and the end-to-end figures overlap the others, so they are left out of the breakdown.
    """
    stages = result["stages"]
    frames = stages["frame_end_to_end"]["runs"]
    skip = {"ttft", "region_end_to_end", "frame_end_to_end", "vision"}  # vision = preprocess + vision_encoder
    return {k: s["mean_ms"] * s["runs"] / frames for k, s in stages.items() if s and k not in skip}


def _bars(ax, result: dict[str, Any]) -> None:
    share = stage_share_ms(result)
    names = list(share)
    ax.barh(names, [share[n] for n in names], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("ms per frame (mean)")
    ax.set_title(f"stage breakdown ({result['stages']['frame_end_to_end']['runs']} frames)")


def _cdf(ax, result: dict[str, Any]) -> None:
    for name, samples in result["samples_ms"].items():
        if not samples:
            continue
        x = np.sort(np.asarray(samples))
        ax.step(x, np.arange(1, x.size + 1) / x.size, where="post", label=f"{name} (n={x.size})")
    ax.set_xscale("log")
    ax.set_xlabel("latency ms (log)")
    ax.set_ylabel("fraction of runs")
    ax.set_title("latency CDF")
    ax.legend(fontsize=7)


def _context(ax, result: dict[str, Any]) -> None:
    rows = result["scaling"]["context"]
    if rows:
        ax.plot([r["past"] for r in rows], [r["decode_tokens_per_s"] for r in rows], "o-")
        bound = result["roofline"].get("decode_upper_bound_tokens_per_s")
        if bound and result["roofline"].get("weights_exceed_l3"):
            ax.axhline(bound, color="tab:red", ls="--", label="roofline (weights only)")
            ax.legend(fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
    ax.set_xlabel("past tokens in the KV cache")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("decode speed vs context")


def _scaling(ax, result: dict[str, Any]) -> None:
    regions = result["scaling"]["regions"]
    faces = result["scaling"]["faces"]
    if regions:
        ax.plot([r["regions"] for r in regions], [r["frame_ms"]["p50_ms"] for r in regions], "o-",
                label="regions per frame")
    if faces:
        ax.plot([f["faces_found"] for f in faces], [f["frame_ms"]["p50_ms"] for f in faces], "s-",
                label="faces per frame (1 region each)")
    ax.set_xlabel("count per frame")
    ax.set_ylabel("frame ms (p50)")
    ax.set_title("scaling")
    if regions or faces:
        ax.legend(fontsize=7)


def save_plots(result: dict[str, Any], path: str | os.PathLike) -> None:
    """One PNG with the four panels."""
    try:
        import matplotlib
    except ImportError:
        from focalrt.extras import install_hint

        raise RuntimeError(f"--plot needs matplotlib: {install_hint('bench')}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    _bars(axes[0, 0], result)
    _cdf(axes[0, 1], result)
    _context(axes[1, 0], result)
    _scaling(axes[1, 1], result)
    fig.suptitle(f"focalrt bench: {os.path.basename(result['bundle']['path'].rstrip('/'))} "
                 f"({result['environment']['cpu']['model']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
