"""fp32 bundle -> int8 / fp8 / fp16 / int4 bundle, gated on held-out frames, written atomically.

Steps: load the fp32 pipeline; sample frames and split off the held-out ones; record the calibration
inputs (int8/fp8); run the fp32 reference on the held-out requests; in a temporary directory beside the
target, copy what does not change, transform the components (with a signed-int8 copy of each int8 graph
for TensorRT, `write_tensorrt_copy`), write the manifest, load the result with the runtime and gate it;
while it fails, keep the most sensitive nodes (measured) in float and try again. The directory becomes
the bundle only when the gate passes (or with `force`).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from focalrt import __version__
from focalrt.bundle import atomic_output_dir, file_record, load, refuse_hard_linked_data, write_manifest
from focalrt.calibration import quantize as qz
from focalrt.calibration import report as reports
from focalrt.calibration.gate import GateResult, Thresholds, evaluate, open_candidate, reference_runs
from focalrt.calibration.record import Recording, plan_requests, prompt_requests, read_frames, read_prompts, record

log = logging.getLogger(__name__)

PRECISIONS = ("int8", "fp8", "fp16", "int4", "int8-weights")
CALIBRATED = ("int8", "fp8")
# Which components each precision transforms, and how; the rest (face models, tokenizer) are copied.
# The token embedding is a lookup table (one row read per token), so it goes to fp16 everywhere: half the
# memory (1.2 GB -> 0.6 GB for a 3B model) at no cost in speed. INT4 is the memory-first choice for 8 GB
# Jetsons, so its vision encoder goes to fp16 as well.
PLAN = {"int8": {"vision": "int8", "embed": "fp16", "decoder": "int8"},
        "fp8": {"vision": "fp8", "embed": "fp16", "decoder": "fp8"},
        "fp16": {"vision": "fp16", "embed": "fp16", "decoder": "fp16"},
        "int4": {"vision": "fp16", "embed": "fp16", "decoder": "int4"},
        # `focalrt convert --precision int8`: int8 weights, float activations (no calibration data needed)
        "int8-weights": {"vision": "fp16", "embed": "fp16", "decoder": "int8-weights"}}
WEIGHT_ONLY = ("int4", "int8-weights")
# The signed-int8 copy of a component's graph that TensorRT reads (see write_tensorrt_copy).
TENSORRT_SUFFIX = ".tensorrt.onnx"
GATE_METRIC_COMPONENT = {"vision_cosine_min": "vision", "logit_cosine_mean": "decoder",
                         "top1_agreement": "decoder", "greedy_agreement_mean": "decoder"}


class GateFailed(RuntimeError):
    """The converted bundle is not accurate enough; nothing was written."""

    def __init__(self, report: dict[str, Any]):
        self.report = report
        super().__init__("accuracy gate failed: " + "; ".join(report["gate"]["failures"])
                         + ". No bundle was written; loosen the thresholds, calibrate on more frames, "
                           "or pass --force to write it anyway")


@dataclass
class Options:
    precision: str
    method: str | None = None  # int8: minmax (default), entropy or percentile
    samples: int = 32
    holdout: int = 4
    seed: int = 0
    max_new_tokens: int = 16
    thresholds: Thresholds | None = None
    exclude_lm_head: bool = False
    fallback: bool = True
    max_fallback_fraction: float = 0.25
    int4_block_size: int = qz.INT4_BLOCK_SIZE
    int4_algorithm: str = "rtn"
    force: bool = False
    overwrite: bool = False
    progress: bool = True


def make_bundle(src: str | Path, out: str | Path, data: str | Path | int, opts: Options) -> dict[str, Any]:
    """Write the converted bundle at `out` and return its report; raises GateFailed when it is not good
    enough (and `opts.force` is off)."""
    from focalrt.runtime.pipeline import Pipeline

    t_start = time.perf_counter()
    if opts.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {opts.precision!r}; choose one of {list(PRECISIONS)}")
    method = _method(opts)
    thresholds = opts.thresholds or Thresholds()
    source = load(src)
    refuse_hard_linked_data(source, "calibrate" if opts.precision in CALIBRATED else "convert")
    _check_fp32(source)
    timings: dict[str, float] = {}
    pipe = Pipeline.from_bundle(src, provider="cpu")

    t = time.perf_counter()
    if pipe.vision is None:  # a text-only bundle: prompts from a text file instead of frames
        frames = read_prompts(data, opts.samples, opts.holdout, opts.seed)
        calib_requests = prompt_requests(frames.calibration)
        held_requests = prompt_requests(frames.holdout, first_index=len(frames.calibration))
    else:
        frames = read_frames(data, opts.samples, opts.holdout, opts.seed)
        calib_requests = plan_requests(pipe, frames.calibration, opts.seed)
        held_requests = plan_requests(pipe, frames.holdout, opts.seed + 7919, first_index=len(frames.calibration))
    recording = Recording()
    if opts.precision in CALIBRATED or opts.int4_algorithm == "gptq":
        recording = record(pipe, calib_requests, opts.max_new_tokens, progress=opts.progress)
    timings["record"] = time.perf_counter() - t
    t = time.perf_counter()
    references = reference_runs(pipe, held_requests, opts.max_new_tokens, opts.progress)
    timings["reference"] = time.perf_counter() - t

    plan = {name: kind for name, kind in PLAN[opts.precision].items() if name in source.manifest["components"]}
    vocab = int(source.manifest["text"]["vocab_size"])
    exclude: dict[str, list[str]] = {name: [] for name in plan}
    if opts.exclude_lm_head and "decoder" in plan:
        exclude["decoder"] = qz.lm_head_nodes(qz.load_graph(source.component_path("decoder")), vocab)

    with atomic_output_dir(out, overwrite=opts.overwrite) as tmp:
        _copy_unchanged(source, tmp, set(plan))
        (tmp / reports.REPORT_DIR).mkdir(exist_ok=True)
        t = time.perf_counter()
        infos = {name: transform_component(source, tmp, name, kind, recording, method, exclude[name], opts)
                 for name, kind in plan.items()}
        timings["convert"] = time.perf_counter() - t
        write_converted_manifest(source, tmp, plan, infos, None)
        t = time.perf_counter()
        result = _gate(tmp, pipe, references, thresholds, opts, "accuracy gate")
        steps: list[dict[str, Any]] = []
        if not result.passed and opts.fallback and opts.precision != "fp16":
            result, recording = _fallback(source, tmp, pipe, references, thresholds, opts, plan, infos, exclude,
                                          recording, calib_requests, method, result, steps)
        timings["gate"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        report = _report(source, tmp, opts, method, frames, recording, plan, infos, result, steps, timings)
        if not result.passed and not opts.force:
            raise GateFailed(report)
        write_converted_manifest(source, tmp, plan, infos, report)
        reports.write(tmp, report)
    return report


def _method(opts: Options) -> str:
    if opts.precision == "int8":
        method = opts.method or "minmax"
        if method not in qz.METHODS:
            raise ValueError(f"--method {method!r} is not one of {list(qz.METHODS)}")
        return method
    if opts.precision == "fp8":
        if opts.method not in (None, "distribution"):
            raise ValueError(f"--method {opts.method} does not apply to fp8: ONNX Runtime calibrates float8 "
                             f"only with its 'distribution' method; leave --method out")
        return "distribution"
    if opts.method is not None:
        raise ValueError(f"--method applies to calibrated precisions (int8, fp8), not {opts.precision}")
    return "none"


def _check_fp32(source) -> None:
    not_fp32 = {n: c.get("precision") for n, c in source.manifest["components"].items()
                if c.get("precision", "fp32") != "fp32"}
    if not_fp32:
        raise ValueError(f"{source.path} is not an fp32 bundle (components {not_fp32}); calibrate and convert "
                         f"start from the fp32 bundle that `focalrt export` wrote")


def _copy_unchanged(source, tmp: Path, replaced: set[str]) -> None:
    """Everything but the replaced components' files, engines and old reports."""
    skip = {"engines", reports.REPORT_DIR, "manifest.json"}
    for name in replaced:
        comp = source.component(name)
        skip.add(comp["file"])
        if "external_data" in comp:
            skip.add(comp["external_data"]["file"])
    for item in source.path.iterdir():
        if item.name in skip:
            continue
        if item.is_dir():
            shutil.copytree(item, tmp / item.name)
        else:
            shutil.copy2(item, tmp / item.name)


def transform_component(source, tmp: Path, name: str, kind: str, recording: Recording, method: str,
                        exclude: list[str], opts: Options) -> dict[str, Any]:
    """Write one component of the converted bundle into `tmp` at precision `kind`; its manifest info."""
    src = source.component_path(name)
    dst = tmp / source.component(name)["file"]
    if kind in CALIBRATED:
        feeds = recording.vision if name == "vision" else recording.decoder
        info = qz.quantize_qdq(src, dst, feeds, kind, method, exclude, tmp / reports.REPORT_DIR /
                               f"{name}.ranges.json", opts.progress, f"calibrating {name} ({kind})")
    elif kind == "int4":
        info = qz.quantize_int4(src, dst, exclude, opts.int4_block_size, opts.int4_algorithm,
                                recording.decoder if opts.int4_algorithm == "gptq" else None)
    elif kind == "int8-weights":
        info = qz.quantize_int8_weights(src, dst, exclude)
    elif name == "embed":
        info = qz.convert_fp16_storage(src, dst)
    else:
        info = qz.convert_fp16(src, dst)
    qz.check_io_unchanged(src, dst)
    write_tensorrt_copy(dst)
    return {**info, "bytes": qz.model_bytes(dst), "bytes_fp32": qz.model_bytes(src)}


def tensorrt_name(relative: str) -> str:
    """`decoder.onnx` -> `decoder.tensorrt.onnx`: the TensorRT twin of a component, in the same folder."""
    path = Path(relative)
    return str(path.with_name(path.stem + TENSORRT_SUFFIX))


def write_tensorrt_copy(component: Path) -> Path | None:
    """Beside a component with uint8 (zero point 128) activations, the same graph with int8 ones.

    ONNX Runtime's CPU kernels need the uint8 encoding and TensorRT accepts only int8 with zero point 0, so
    the TensorRT execution provider and `build-engines` read this copy. Only the graph proto is written: its
    tensors keep pointing at the component's external-data file (same relative name, same folder), so no
    weight is stored twice. Returns the copy, or None (removing an outdated copy) when there is nothing to
    re-encode.
    """
    import onnx

    from focalrt.runtime.backends.tensorrt_engines import signed_activations

    copy = component.with_name(tensorrt_name(component.name))
    copy.unlink(missing_ok=True)  # a fallback re-quantization must not leave the previous graph's copy
    graph = onnx.load(str(component), load_external_data=False)
    if not signed_activations(graph):
        return None
    onnx.save_model(graph, str(copy))  # no save_as_external_data: the external references are kept as they are
    return copy


def _gate(tmp: Path, pipe, references, thresholds: Thresholds, opts: Options, desc: str) -> GateResult:
    candidate = open_candidate(tmp, pipe, emulate_fp8=opts.precision == "fp8")
    return evaluate(candidate, references, thresholds, opts.progress, desc)


def _fallback(source, tmp, pipe, references, thresholds, opts, plan, infos, exclude, recording,
              calib_requests, method, result, steps):
    """Keep the most sensitive quantized nodes in float, 1, 2, 4, ... of them, until the gate passes."""
    from focalrt.calibration.sensitivity import node_errors

    if opts.precision in WEIGHT_ONLY and not recording.decoder:
        recording = record(pipe, calib_requests, opts.max_new_tokens, progress=opts.progress)
    ranking: dict[str, list[tuple[str, float]]] = {}
    for name in plan:
        if plan[name] not in (*CALIBRATED, *WEIGHT_ONLY):
            continue
        feeds = recording.vision if name == "vision" else recording.decoder
        errors = node_errors(source.component_path(name), tmp / source.component(name)["file"], feeds)
        ranking[name] = [(node, err) for node, err in errors.items() if node not in exclude[name]]
    limits = {n: max(1, math.ceil(opts.max_fallback_fraction * (len(r) + len(exclude[n]))))
              for n, r in ranking.items()}
    tried = {n: 0 for n in ranking}
    k = 1
    while not result.passed:
        failing = {GATE_METRIC_COMPONENT[f.split()[0]] for f in result.failures} & set(ranking)
        counts = {n: min(k, limits[n], len(ranking[n])) for n in failing}
        if all(counts[n] == tried[n] for n in failing):
            break  # nothing left to try within --max-fallback-fraction
        for name in failing:
            top = [node for node, _ in ranking[name][:counts[name]]]
            infos[name] = transform_component(source, tmp, name, plan[name], recording, method,
                                     sorted(set(exclude[name]) | set(top)), opts)
            infos[name]["fallback_nodes"] = top
            tried[name] = counts[name]
        write_converted_manifest(source, tmp, plan, infos, None)
        result = _gate(tmp, pipe, references, thresholds, opts, f"accuracy gate, fallback {k}")
        steps.append({"kept_in_float": {n: infos[n]["fallback_nodes"] for n in failing},
                      "passed": result.passed, "failures": result.failures, "metrics": result.metrics})
        log.info("fallback with %d node(s) per failing component in float: %s", k,
                 "passed" if result.passed else "; ".join(result.failures))
        k *= 2
    for name, entries in ranking.items():
        infos[name]["sensitivity_top"] = [{"node": node, "relative_error": round(err, 8)}
                                          for node, err in entries[:10]]
    return result, recording


def write_converted_manifest(source, tmp: Path, plan: dict[str, str], infos: dict[str, dict],
                             report: dict[str, Any] | None) -> None:
    manifest = {k: v for k, v in source.manifest.items() if k not in ("format", "format_version")}
    components = dict(manifest["components"])
    for name, kind in plan.items():
        old = {k: v for k, v in components[name].items()
               if k not in ("file", "bytes", "sha256", "external_data", "tensorrt_file", "validation_max_abs_diff",
                            "precision")}
        info = infos[name]
        quant = {k: v for k, v in info.items() if k not in ("bytes", "bytes_fp32", "sensitivity_top")}
        record = file_record(tmp, components[name]["file"])
        trt_name = tensorrt_name(components[name]["file"])
        if (tmp / trt_name).is_file():
            record["tensorrt_file"] = file_record(tmp, trt_name)
        components[name] = {**record, **old, "precision": kind, "quantization": quant}
    manifest["components"] = components
    if report is not None:
        manifest["calibration"] = {
            "precision": report["precision"], "method": report["method"], "seed": report["seed"],
            "data_sha256": report["data"]["calibration_sha256"], "holdout_sha256": report["data"]["holdout_sha256"],
            "data_source": report["data"]["source"], "samples": report["samples"],
            "gate_passed": report["gate"]["passed"], "forced": report["forced"],
            "report": reports.REPORT_JSON, "source_bundle": report["source_bundle"]}
        manifest["provenance"] = {**manifest["provenance"], "converted_with": report["versions"]}
    write_manifest(tmp, manifest)


def _report(source, tmp, opts, method, frames, recording, plan, infos, result, steps, timings) -> dict[str, Any]:
    import onnx
    import onnxruntime

    components = {}
    for name, comp in source.manifest["components"].items():
        if name in infos:
            components[name] = {"precision": plan[name], **{k: v for k, v in infos[name].items()}}
        else:
            size = qz.model_bytes(source.component_path(name))
            components[name] = {"precision": comp.get("precision", "fp32"), "bytes": size, "bytes_fp32": size}
    excluded = sorted({n for info in infos.values() for n in info.get("fallback_nodes", [])})
    return {
        "precision": opts.precision, "method": method, "seed": opts.seed,
        "forced": bool(opts.force and not result.passed),
        "created_unix": int(time.time()),
        "source_bundle": {"path": str(source.path.resolve()),
                          "decoder_sha256": source.component("decoder").get("sha256"),
                          "weights_fingerprint": source.manifest.get("source", {}).get("weights_fingerprint")},
        "data": {"source": frames.source, "frames_read": frames.frames_read,
                 "calibration_frames": len(frames.calibration), "holdout_frames": len(frames.holdout),
                 "calibration_sha256": frames.calibration_sha256, "holdout_sha256": frames.holdout_sha256},
        "samples": {**recording.summary(), "calibration_frames": len(frames.calibration),
                    "max_new_tokens": opts.max_new_tokens},
        "components": components,
        "gate": result.to_json(),
        "fallback": {"enabled": opts.fallback, "max_fraction": opts.max_fallback_fraction, "steps": steps,
                     "excluded_nodes": excluded},
        "versions": {"focalrt": __version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__},
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
