"""The accuracy gate: a converted bundle against its fp32 source, on held-out frames.

Per held-out request (frame + region, described greedily by the fp32 pipeline):
- vision embedding cosine: the encoder outputs for the same frame;
- teacher forcing: the candidate is fed the fp32 model's greedy tokens, so every step compares the two
  models on the same history: per-step logit cosine and top-1 agreement;
- free running: the candidate decodes greedily on its own: token agreement rate (position by position,
  over the longer of the two outputs) and the first position where it diverges.

Teacher forcing goes through the candidate's real `Pipeline.describe`, given a sampler (its `sampler=`
hook) that replays the reference tokens, so prompts, views and the decode loop are the runtime's own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Defaults from trained weights (SmolLM2-135M-Instruct, 8 held-out prompts; docs/precision-and-tensorrt.md):
# int8 weight-only (+0.85% perplexity) measured logit cosine 0.999, top-1 0.945, greedy agreement 0.45; the
# best int4 (+33%) 0.894, 0.594, 0.13. Cosine and top-1 separate them with margin on both sides. Greedy
# agreement is kept low: on a trained chat model one early near-tie flip ("The" 0.152 against "L" 0.140)
# sends the rest of an answer elsewhere however small the error, so it cannot be held near 1.
DEFAULT_THRESHOLDS = {"min_vision_cosine": 0.99, "min_logit_cosine": 0.98, "min_top1": 0.85,
                      "min_greedy_agreement": 0.25}


@dataclass
class Thresholds:
    min_vision_cosine: float = DEFAULT_THRESHOLDS["min_vision_cosine"]
    min_logit_cosine: float = DEFAULT_THRESHOLDS["min_logit_cosine"]
    min_top1: float = DEFAULT_THRESHOLDS["min_top1"]
    min_greedy_agreement: float = DEFAULT_THRESHOLDS["min_greedy_agreement"]

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 <= float(value) <= 1.0:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {value} is outside [0, 1]: cosines and agreement rates are at most 1, "
                                 f"so the gate could never pass; give a value in [0, 1]")


@dataclass
class Reference:
    """What the fp32 pipeline did for one held-out request."""

    request: Any
    vision: np.ndarray
    tokens: list[int]  # greedy tokens, including the stop token when it stopped
    logits: list[np.ndarray]
    text: str


@dataclass
class GateResult:
    thresholds: dict[str, float]
    metrics: dict[str, Any]
    per_request: list[dict[str, Any]]
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "thresholds": self.thresholds, "metrics": self.metrics,
                "failures": self.failures, "per_request": self.per_request}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom > 0 else (1.0 if not a.any() and not b.any() else 0.0)


def greedy_agreement(ref: list[int], got: list[int]) -> tuple[float, int | None]:
    """Position-wise agreement over the longer sequence, and the first differing position (None: equal)."""
    longest = max(len(ref), len(got))
    if longest == 0:
        return 1.0, None
    same = sum(1 for a, b in zip(ref, got, strict=False) if a == b)
    first = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), None)
    if first is None and len(ref) != len(got):
        first = min(len(ref), len(got))
    return same / longest, first


def reference_runs(ref_pipe, requests: list, max_new_tokens: int, progress: bool = True) -> list[Reference]:
    from tqdm import tqdm

    out = []
    for req in tqdm(requests, desc="fp32 reference on held-out frames", unit="frame", disable=not progress):
        vision = ref_pipe.encode_image(req.image, req.landmarks68).numpy().copy() if req.image is not None \
            else np.zeros(0, np.float32)  # a text-only bundle has no vision component
        d = ref_pipe.describe(req.image, box=req.box, max_new_tokens=max_new_tokens, temperature=0.0,
                              return_logits=True, landmarks68=req.landmarks68, prompt=req.prompt)
        tokens = [int(np.argmax(lg)) for lg in d.logits]
        out.append(Reference(req, vision, tokens, [lg.copy() for lg in d.logits], d.text))
    return out


class ReplaySampler:
    """Returns the reference tokens one by one, whatever the logits: teacher forcing through describe."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens
        self.step = 0

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        token = self.tokens[min(self.step, len(self.tokens) - 1)]
        self.step += 1
        return np.full(logits.shape[0], token, np.int64)


def teacher_forced_logits(pipe, ref: Reference) -> list[np.ndarray]:
    sampler = ReplaySampler(ref.tokens)
    d = pipe.describe(ref.request.image, box=ref.request.box, max_new_tokens=len(ref.tokens), return_logits=True,
                      landmarks68=ref.request.landmarks68, prompt=ref.request.prompt, sampler=sampler)
    if sampler.step == 0:
        raise RuntimeError("teacher forcing: describe did not use the given sampler; the gate cannot compare the "
                           "models step by step")
    return d.logits


def evaluate(candidate, references: list[Reference], thresholds: Thresholds, progress: bool = True,
             desc: str = "accuracy gate") -> GateResult:
    """All metrics for `candidate` (a Pipeline) against the fp32 references, and the gate verdict."""
    from tqdm import tqdm

    per_request = []
    all_cos: list[float] = []
    all_top1: list[bool] = []
    for ref in tqdm(references, desc=desc, unit="frame", disable=not progress):
        req = ref.request
        v_cos = cosine(ref.vision, candidate.encode_image(req.image, req.landmarks68).numpy()) \
            if req.image is not None else None  # text-only: nothing to compare
        forced = teacher_forced_logits(candidate, ref)
        steps = min(len(forced), len(ref.logits))
        cos = [cosine(ref.logits[i], forced[i]) for i in range(steps)]
        top1 = [int(np.argmax(forced[i])) == ref.tokens[i] for i in range(steps)]
        free = candidate.describe(req.image, box=req.box, max_new_tokens=len(ref.logits), temperature=0.0,
                                  return_logits=True, landmarks68=req.landmarks68, prompt=req.prompt)
        free_tokens = [int(np.argmax(lg)) for lg in free.logits]
        agreement, first = greedy_agreement(ref.tokens, free_tokens)
        all_cos += cos
        all_top1 += top1
        per_request.append({"frame": req.frame_index, "region": req.region,
                            "box": list(req.box) if req.box else None,
                            "vision_cosine": None if v_cos is None else round(v_cos, 6),
                            "logit_cosine_mean": round(float(np.mean(cos)), 6),
                            "logit_cosine_min": round(float(np.min(cos)), 6),
                            "top1_agreement": round(float(np.mean(top1)), 4), "steps": steps,
                            "greedy_agreement": round(agreement, 4), "first_divergence": first,
                            "reference_text": ref.text, "candidate_text": free.text})
    metrics = summarize(per_request, all_cos, all_top1)
    return GateResult(asdict(thresholds), metrics, per_request, failures(metrics, thresholds))


def summarize(per_request: list[dict], all_cos: list[float], all_top1: list[bool]) -> dict[str, Any]:
    firsts = [r["first_divergence"] for r in per_request if r["first_divergence"] is not None]
    vision = [r["vision_cosine"] for r in per_request if r["vision_cosine"] is not None]  # none: text-only
    return {"requests": len(per_request), "teacher_forced_steps": len(all_cos),
            "vision_cosine_mean": round(float(np.mean(vision)), 6) if vision else None,
            "vision_cosine_min": round(float(np.min(vision)), 6) if vision else None,
            "logit_cosine_mean": round(float(np.mean(all_cos)), 6),
            "logit_cosine_min": round(float(np.min(all_cos)), 6),
            "top1_agreement": round(float(np.mean(all_top1)), 4),
            "greedy_agreement_mean": round(float(np.mean([r["greedy_agreement"] for r in per_request])), 4),
            "identical_outputs": sum(r["first_divergence"] is None for r in per_request),
            "first_divergence_min": min(firsts) if firsts else None,
            "first_divergence_median": float(np.median(firsts)) if firsts else None}


def failures(metrics: dict[str, Any], t: Thresholds) -> list[str]:
    checks = [("vision_cosine_min", t.min_vision_cosine, "--min-vision-cosine"),
              ("logit_cosine_mean", t.min_logit_cosine, "--min-logit-cosine"),
              ("top1_agreement", t.min_top1, "--min-top1"),
              ("greedy_agreement_mean", t.min_greedy_agreement, "--min-greedy-agreement")]
    return [f"{name} {metrics[name]:.4f} < {limit:g} ({flag})" for name, limit, flag in checks
            if metrics[name] is not None and metrics[name] < limit]


def open_candidate(bundle_dir: Path, ref_pipe, emulate_fp8: bool = False):
    """The candidate bundle as a Pipeline on the CPU.

    FP8 QDQ cannot load with ONNX Runtime's full CPU optimizations (they fuse float8 QDQ into integer
    kernels that reject it), so for FP8 the sessions run the graph literally; everything else loads
    through `Pipeline.from_bundle`, exactly as `focalrt describe` would.
    """
    from focalrt.runtime.pipeline import Pipeline

    if not emulate_fp8:
        return Pipeline.from_bundle(bundle_dir, provider="cpu")
    import onnxruntime as ort

    from focalrt.bundle import load
    from focalrt.calibration.quantize import fp8_session_options

    def session(path: Path) -> ort.InferenceSession:
        return ort.InferenceSession(str(path), fp8_session_options(), providers=["CPUExecutionProvider"])

    return Pipeline(load(bundle_dir), provider="cpu", max_context=ref_pipe.max_context, session_factory=session)
