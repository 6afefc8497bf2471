"""`--compare A.json B.json`: the ratio B/A of every figure both results have (fp32 vs int8, two commits).

Latencies (`*_ms`) and memory are better when the ratio is below 1; rates (`*_per_s`) and the roofline
fraction when it is above 1. The table says which way each row points.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from focalrt.bench.report import markdown_table

SKIP = ("environment", "settings", "samples_ms", "notes", "bundle", "schema", "created_unix")
KEEP_SUFFIXES = ("p50_ms", "p90_ms", "p99_ms", "_per_s", "_bytes", "fraction_of_roofline", "ttft_ms",
                 "prefill_ms", "best_gb_s", "load_ms", "total")
LIST_KEYS = {"context": "past", "regions": "regions", "faces": "faces_requested"}


def flatten(obj: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves by dotted path; scaling lists are keyed by their x value (context[past=256])."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not prefix and k in SKIP:
                continue
            out.update(flatten(v, f"{prefix}.{k}" if prefix else k))
    elif isinstance(obj, list):
        name = prefix.rsplit(".", 1)[-1]
        x = LIST_KEYS.get(name)
        for i, item in enumerate(obj):
            tag = f"{x}={item[x]}" if x and isinstance(item, dict) and x in item else str(i)
            out.update(flatten(item, f"{prefix}[{tag}]"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = float(obj)
    return out


def better_when(key: str) -> str:
    return "higher" if key.endswith(("_per_s", "fraction_of_roofline", "best_gb_s")) else "lower"


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, float, float, float | None, str]]:
    """(figure, A, B, B/A, which way is better) for every kept figure present in both."""
    fa, fb = flatten(a), flatten(b)
    rows = []
    for key in fa:
        if key in fb and key.endswith(KEEP_SUFFIXES):
            ratio = fb[key] / fa[key] if fa[key] else None
            rows.append((key, fa[key], fb[key], ratio, better_when(key)))
    return rows


def load_result(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--compare: {p} does not exist; write one with "
                                f"`focalrt bench BUNDLE --json {p}`") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--compare: {p} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not data.get("schema", "").startswith("focalrt.bench/"):
        raise ValueError(f"--compare: {p} is not a focalrt bench result (no 'schema': 'focalrt.bench/...')")
    return data


def compare_files(path_a: str | Path, path_b: str | Path) -> str:
    a, b = load_result(path_a), load_result(path_b)
    rows = compare(a, b)
    if not rows:
        raise ValueError(f"--compare: {path_a} and {path_b} have no figure in common")
    head = [f"A = {path_a} ({a['bundle']['path']}, precision {a['bundle'].get('precision')})",
            f"B = {path_b} ({b['bundle']['path']}, precision {b['bundle'].get('precision')})"]
    if a["environment"].get("cpu") != b["environment"].get("cpu"):
        head.append("warning: A and B come from different CPUs")
    table = markdown_table(["figure", "A", "B", "B/A", "better"], rows)
    return "\n".join(head) + "\n\n" + table + "\n"
