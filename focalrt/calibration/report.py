"""The calibration report: `calibration/report.json` (everything) and `calibration/report.md` (a short table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPORT_DIR = "calibration"
REPORT_JSON = f"{REPORT_DIR}/report.json"
REPORT_MD = f"{REPORT_DIR}/report.md"
# Every report has these keys (tests and tools rely on them).
REPORT_KEYS = ("precision", "method", "seed", "source_bundle", "data", "samples", "components", "gate",
               "fallback", "versions", "timings_s", "created_unix")

_ROWS = (("vision_cosine_min", "vision embedding cosine (min)", "min_vision_cosine"),
         ("vision_cosine_mean", "vision embedding cosine (mean)", None),
         ("logit_cosine_mean", "logit cosine, teacher forced (mean)", "min_logit_cosine"),
         ("logit_cosine_min", "logit cosine, teacher forced (min)", None),
         ("top1_agreement", "top-1 agreement, teacher forced", "min_top1"),
         ("greedy_agreement_mean", "greedy token agreement", "min_greedy_agreement"),
         ("first_divergence_min", "first divergence (earliest token)", None),
         ("identical_outputs", "identical greedy outputs", None))


def markdown(report: dict[str, Any]) -> str:
    gate = report["gate"]
    m, t = gate["metrics"], gate["thresholds"]
    lines = [f"# {report['precision'].upper()} vs fp32 on {m['requests']} held-out frames",
             "", f"Gate: **{'passed' if gate['passed'] else 'FAILED'}**"
             + (" (written anyway with --force)" if report.get("forced") else ""), "",
             "| metric | value | threshold | ok |", "|---|---|---|---|"]
    for key, label, limit in _ROWS:
        value = m.get(key)
        shown = "none" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        if key == "identical_outputs":
            shown = f"{value} of {m['requests']}"
        if limit:
            ok = "n/a (no vision)" if value is None and key.startswith("vision") else \
                "yes" if value is not None and value >= t[limit] else "no"
            lines.append(f"| {label} | {shown} | >= {t[limit]:g} | {ok} |")
        else:
            lines.append(f"| {label} | {shown} | | |")
    lines += ["", "| component | precision | size (MB) | fp32 size (MB) | quantized nodes | kept in float |",
              "|---|---|---|---|---|---|"]
    for name, c in report["components"].items():
        kept = len(c.get("excluded_nodes", [])) if "excluded_nodes" in c else "-"
        lines.append(f"| {name} | {c['precision']} | {c['bytes'] / 1e6:.1f} | {c['bytes_fp32'] / 1e6:.1f} | "
                     f"{c.get('quantized_nodes', '-')} | {kept} |")
    fb = report["fallback"]
    if fb["steps"]:
        lines += ["", f"Mixed-precision fallback: {len(fb['steps'])} step(s), "
                      f"{len(fb['excluded_nodes'])} node(s) kept in float."]
    return "\n".join(lines) + "\n"


def write(bundle_dir: Path, report: dict[str, Any]) -> None:
    missing = [k for k in REPORT_KEYS if k not in report]
    if missing:
        raise ValueError(f"calibration report lacks {missing}")
    out = bundle_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    (bundle_dir / REPORT_JSON).write_text(json.dumps(report, indent=2, default=_plain) + "\n")
    (bundle_dir / REPORT_MD).write_text(markdown(report))


def _plain(value):
    """numpy scalars and paths in the report become plain JSON values."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)
