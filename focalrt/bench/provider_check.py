"""`focalrt doctor --check BUNDLE`: does this bundle give the CPU's answer on every provider here, and how fast?

A fixed short greedy describe (the photo shipped with focalrt and a box on its mouth; for a text bundle, a fixed
prompt) runs on the CPU, the reference, then on each other provider that can run here. Each provider's greedy
tokens must equal the CPU's, and its logits must stay within a tolerance of the CPU's at every step up to the
first differing token (after it the inputs differ, so the logits are not comparable). Each run is done twice:
the first builds what the provider builds (TensorRT engines: minutes on a Jetson) and is not compared or timed;
the second is. Its decode steps give the speed.

A provider whose sessions silently fell back to the CPU (onnxruntime-gpu without its CUDA libraries) is an
error, not a pass. GPU providers are skipped, and said to be, where no NVIDIA GPU is found: there they can only
fall back to the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

CPU = "CPUExecutionProvider"
CHECK_BOX = (192, 129, 255, 164)  # the mouth in focalrt/data/astronaut.jpg (the README's Python example's box)
CHECK_PROMPT = "What is the capital of France?"
CHECK_TOKENS = 8
# Logits may differ by atol + rtol * (largest |CPU logit| of the step): GPUs reorder sums and use TF32 / fp16
# kernels, so a bit-exact match is not expected; a wrong kernel or a fallen-back node is far outside this.
RTOL = {"fp32": 1e-2, "other": 5e-2}
ATOL = 1e-3
SCHEMA = "focalrt.doctor-check/1"


@dataclass
class ProviderRun:
    """One provider's run of the fixed describe."""

    provider: str  # what was asked for: cpu, cuda, tensorrt (or a test's own name)
    status: str = "ok"  # ok | mismatch | error | skipped | reference
    ran_on: list[str] = field(default_factory=list)  # the sessions' first provider, per component
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logits: list[np.ndarray] = field(default_factory=list)
    load_s: float | None = None
    first_run_s: float | None = None  # includes building engines
    decode_step_ms: float | None = None  # median over the timed run's decode steps
    decode_steps: int = 0
    note: str = ""
    comparison: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("logits")
        out["decode_tokens_per_s"] = 1e3 / self.decode_step_ms if self.decode_step_ms else None
        return out


def sessions_of(pipe) -> dict[str, Any]:
    """The pipeline's ONNX Runtime sessions by component."""
    found = {"vision": getattr(pipe, "vision", None), "video": getattr(pipe, "video", None),
             "embed": getattr(pipe.model, "embed", None), "decoder": getattr(pipe.model, "decoder", None)}
    return {name: s for name, s in found.items() if s is not None}


def fixed_describe(pipe, max_new_tokens: int):
    """The check's input: the shipped photo and its mouth box, or the fixed prompt for a text bundle; greedy."""
    options = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "return_logits": True}
    if pipe.vision is None:
        return pipe.describe_text(CHECK_PROMPT, **options)
    from focalrt.demo import demo_photo

    return pipe.describe(demo_photo(), box=CHECK_BOX, **options)


def run_provider(provider: str, open_pipeline: Callable[[str], Any], max_new_tokens: int) -> ProviderRun:
    """Load the bundle on `provider`, describe twice (warm, then measured), record tokens, logits and speed."""
    from focalrt.runtime.backends.sessions import ALIASES

    run = ProviderRun(provider)
    try:
        t0 = time.perf_counter()
        pipe = open_pipeline(provider)
        run.load_s = time.perf_counter() - t0
        run.ran_on = sorted({s.get_providers()[0] for s in sessions_of(pipe).values()})
        wanted = ALIASES.get(provider.lower())
        if wanted and wanted != CPU and run.ran_on != [wanted]:
            run.status = "error"
            run.note = (f"asked for {wanted}, but sessions run on {', '.join(run.ran_on)}: onnxruntime fell back "
                        f"(its CUDA / TensorRT libraries did not load; see docs/deploy-rtx.md)")
            return run
        t0 = time.perf_counter()
        fixed_describe(pipe, max_new_tokens)
        run.first_run_s = time.perf_counter() - t0
        d = fixed_describe(pipe, max_new_tokens)
    except Exception as e:  # any provider failure is a finding to report, not a crash of the check
        run.status = "error"
        run.note = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        return run
    run.tokens, run.text = list(d.token_ids), d.text
    run.logits = [np.asarray(x, np.float32).reshape(-1) for x in (d.logits or [])]
    steps = d.timings_ms.get("decode_steps") or []
    run.decode_steps = len(steps)
    run.decode_step_ms = float(np.median(steps)) if steps else None
    return run


def compare(reference: ProviderRun, run: ProviderRun, rtol: float, atol: float = ATOL) -> dict[str, Any]:
    """Tokens and logits of `run` against the CPU's, up to and including the first step whose token differs."""
    n = min(len(reference.tokens), len(run.tokens))
    first_diff = next((i for i in range(n) if reference.tokens[i] != run.tokens[i]), None)
    if first_diff is None and len(reference.tokens) != len(run.tokens):
        first_diff = n
    steps = min(first_diff + 1 if first_diff is not None else n, len(reference.logits), len(run.logits))
    out: dict[str, Any] = {"same_tokens": first_diff is None, "first_token_difference": first_diff,
                           "steps_compared": steps, "max_abs_logit_diff": None, "max_rel_logit_diff": None,
                           "min_logit_cosine": None, "first_logit_difference": None, "rtol": rtol, "atol": atol}
    abs_diffs, rel_diffs, cosines = [], [], []
    for i in range(steps):
        ref, got = reference.logits[i], run.logits[i]
        if ref.shape != got.shape:
            return {**out, "logits_ok": False, "error": f"logits of step {i} have shape {got.shape}, the CPU's "
                                                        f"{ref.shape}"}
        diff, scale = float(np.max(np.abs(ref - got))), float(np.max(np.abs(ref)))
        abs_diffs.append(diff)
        rel_diffs.append(diff / max(scale, 1e-12))
        cosines.append(float(np.dot(ref, got) / max(float(np.linalg.norm(ref) * np.linalg.norm(got)), 1e-30)))
        if diff > atol + rtol * scale and out["first_logit_difference"] is None:
            out["first_logit_difference"] = i
    if abs_diffs:
        out.update(max_abs_logit_diff=max(abs_diffs), max_rel_logit_diff=max(rel_diffs), min_logit_cosine=min(cosines))
    out["logits_ok"] = steps > 0 and out["first_logit_difference"] is None
    return out


def default_providers(available: list[str], have_gpu: bool) -> tuple[list[str], dict[str, str]]:
    """(providers to check besides the CPU, {provider: why skipped}) from what onnxruntime offers here."""
    checks, skipped = [], {}
    for name, alias in (("TensorrtExecutionProvider", "tensorrt"), ("CUDAExecutionProvider", "cuda")):
        if name not in available:
            skipped[alias] = "not in this onnxruntime (install onnxruntime-gpu)"
        elif not have_gpu:
            skipped[alias] = "no NVIDIA GPU found (nvidia-smi, Jetson device tree): it could only fall back to the CPU"
        else:
            checks.append(alias)
    return checks, skipped


def check_bundle(bundle_path, providers: list[str] | None = None, threads: int | None = None,
                 max_new_tokens: int = CHECK_TOKENS, rtol: float | None = None,
                 open_pipeline: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """The whole check as one JSON-ready dict; `ok` is False on any mismatch or error.

    `providers` lists what to compare with the CPU (default: CUDA and TensorRT where a GPU and onnxruntime-gpu
    are here). `open_pipeline(provider)` loads the bundle for one provider (default: Pipeline.from_bundle); tests
    pass one that returns a perturbed pipeline to prove a mismatch is caught."""
    from focalrt.bundle import load

    bundle = load(bundle_path)
    precisions = sorted({c.get("precision", "fp32") for c in bundle.manifest["components"].values()})
    rtol = rtol if rtol is not None else RTOL["fp32" if precisions == ["fp32"] else "other"]
    if open_pipeline is None:
        from focalrt.runtime.pipeline import Pipeline

        def open_pipeline(provider: str):
            return Pipeline.from_bundle(bundle_path, provider=provider, threads=threads)

    skipped: dict[str, str] = {}
    if providers is None:
        from focalrt.runtime.backends.device import gpus
        from focalrt.runtime.backends.sessions import available_providers

        providers, skipped = default_providers(available_providers(), bool(gpus()))
    reference = run_provider("cpu", open_pipeline, max_new_tokens)
    reference.status = "reference" if reference.status == "ok" else reference.status
    runs = [reference]
    for provider in providers:
        run = run_provider(provider, open_pipeline, max_new_tokens)
        if run.status == "ok" and reference.status == "reference":
            run.comparison = compare(reference, run, rtol)
            if not (run.comparison["same_tokens"] and run.comparison["logits_ok"]):
                run.status = "mismatch"
        runs.append(run)
    runs += [ProviderRun(p, status="skipped", note=why) for p, why in skipped.items()]
    kind = "text" if bundle.manifest["components"].get("vision") is None else "image"
    return {"schema": SCHEMA, "bundle": str(bundle.path), "precision": precisions,
            "input": ({"prompt": CHECK_PROMPT} if kind == "text" else
                      {"image": "focalrt/data/astronaut.jpg", "box": list(CHECK_BOX)}) | {
                "max_new_tokens": max_new_tokens, "greedy": True},
            "tolerance": {"rtol": rtol, "atol": ATOL},
            "providers": [r.to_json() for r in runs],
            "ok": all(r.status in ("reference", "ok", "skipped") for r in runs)}


def format_check(result: dict[str, Any]) -> str:
    """One table: a row per provider (the CPU first), then a verdict line."""
    rows = [("provider", "status", "ran on", "same tokens", "max |dlogit|", "rel", "cosine", "decode ms/step",
             "tok/s", "load s", "note")]
    for r in result["providers"]:
        c = r["comparison"]
        same = ("-" if not c else "yes" if c["same_tokens"]
                else f"no (from token {c['first_token_difference']})")
        rows.append((r["provider"], r["status"], ",".join(p.replace("ExecutionProvider", "") for p in r["ran_on"])
                     or "-", same,
                     f"{c['max_abs_logit_diff']:.2e}" if c.get("max_abs_logit_diff") is not None else "-",
                     f"{c['max_rel_logit_diff']:.2e}" if c.get("max_rel_logit_diff") is not None else "-",
                     f"{c['min_logit_cosine']:.6f}" if c.get("min_logit_cosine") is not None else "-",
                     f"{r['decode_step_ms']:.2f}" if r["decode_step_ms"] else "-",
                     f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] else "-",
                     f"{r['load_s']:.1f}" if r["load_s"] is not None else "-", r["note"] or c.get("error", "")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    inp = result["input"]
    what = f"prompt {inp['prompt']!r}" if "prompt" in inp else f"{inp['image']} box {inp['box']}"
    verdict = ("every provider checked gives the CPU's tokens and logits" if result["ok"]
               else "MISMATCH or error: see the rows above")
    return "\n".join([f"doctor --check {result['bundle']} ({'/'.join(result['precision'])}): {what}, "
                      f"{inp['max_new_tokens']} greedy tokens; logits within {result['tolerance']['atol']:g} + "
                      f"{result['tolerance']['rtol']:g} x max|CPU logit|", *lines, verdict])
