"""Markdown tables: a `focalrt bench` result, and any list of rows (the baseline comparison)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from focalrt.bench.environment import describe


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.2e}"
        return f"{value:,.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def bench_report(result: dict[str, Any]) -> str:
    """The stage table (p50/p90/p99/max), then throughput, memory, roofline and the scaling curves."""
    st = result["settings"]
    out = [f"## focalrt bench: {result['bundle']['path']}",
           f"{describe(result['environment'])}",
           f"{st['runs']} runs after {st['warmup']} warm-up frames; {st['max_new_tokens']} tokens per region; "
           f"source {st['source']}", ""]
    rows = [[name, s["p50_ms"], s["p90_ms"], s["p99_ms"], s["max_ms"], s["runs"]]
            for name, s in result["stages"].items() if s]
    out += [markdown_table(["stage", "p50 ms", "p90 ms", "p99 ms", "max ms", "n"], rows), ""]
    t = result["throughput"]
    rf = result["roofline"]
    mem = result["memory"]
    out += [markdown_table(["figure", "value"], [
        ["decode tokens/s (one region)", t["decode_tokens_per_s"]],
        ["decode tokens/s (all regions of a frame)", t["decode_tokens_per_s_aggregate"]],
        ["prefill tokens/s", t["prefill_tokens_per_s"]],
        ["TTFT ms (p50)", t["ttft_ms"]],
        ["frames/s", t["frames_per_s"]],
        ["region descriptions/s", t["region_descriptions_per_s"]],
        ["peak RSS (whole bench process, load included)", mib(mem["peak_rss_bytes"])],
        ["GPU memory", mib(mem.get("gpu_memory_bytes"))],
        ["model bytes", mib(result["model_bytes"]["total"])],
        ["memory bandwidth GB/s", rf["bandwidth"]["best_gb_s"]],
        ["decode roofline tokens/s", rf["decode_upper_bound_tokens_per_s"]],
        ["decode / roofline", rf["fraction_of_roofline"] if rf["weights_exceed_l3"] is not False
         else "n/a (weights fit in cache)"],
        ["tokens per region (mean)", t["tokens_per_region"]],
        ["prompt tokens", t["prompt_tokens"]],
        ["decode steps per describe call (mean)", t.get("decode_steps_per_call")],
        *([["draft mode", dr["mode"]], ["draft tokens accepted / proposed", f"{dr['accepted']} / {dr['proposed']}"],
           ["draft acceptance", dr["acceptance"]]] if (dr := result.get("drafts")) and dr["mode"] != "off" else []),
    ]), ""]
    sc = result["scaling"]
    if sc["context"]:
        out += [markdown_table(["past tokens", "decode tokens/s", "step p50 ms", "step p99 ms", "prefill ms"],
                               [[c["past"], c["decode_tokens_per_s"], c["decode_step_ms"]["p50_ms"],
                                 c["decode_step_ms"]["p99_ms"], c["prefill_ms"]] for c in sc["context"]]), ""]
    if sc["regions"]:
        out += [markdown_table(["regions/frame", "frame p50 ms", "frame p99 ms", "descriptions/s", "tokens/region"],
                               [[r["regions"], r["frame_ms"]["p50_ms"], r["frame_ms"]["p99_ms"],
                                 r["region_descriptions_per_s"], r["tokens_per_region"]] for r in sc["regions"]]), ""]
    if sc["faces"]:
        out += [markdown_table(["faces asked", "faces found", "detect+landmarks p50 ms", "frame p50 ms",
                                "tokens/region"],
                               [[f["faces_requested"], f["faces_found"], f["front_end_ms"]["p50_ms"],
                                 f["frame_ms"]["p50_ms"], f["tokens_per_region"]] for f in sc["faces"]]), ""]
    if mem.get("peak_rss_covers"):
        probe = rf.get("bandwidth", {}).get("probe_peak_rss_bytes")
        # /usr/bin/time reports the largest of the process and its children: the probe, when it is larger.
        child = f" (its own peak: {mib(probe)}; /usr/bin/time reports the larger of the two)" if probe else ""
        out.append(f"- peak RSS: {mem['peak_rss_covers']}{child}")
    out += [f"- {n}" for n in result.get("notes", [])]
    return "\n".join(out).rstrip() + "\n"
