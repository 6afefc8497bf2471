"""TensorRT engines for a bundle, built on the target GPU with the TensorRT Python API.

Engines live in `bundle/engines/`, one per component and key. The key is a hash of the ONNX bytes
(graph and external weights), the TensorRT version, the GPU name and the precision: an engine is only
valid for exactly that combination. `build_engines` rebuilds whatever no longer matches, and
`find_engine` refuses a stale engine with a message that says what changed.

GroupQueryAttention is an ONNX Runtime contrib op (`com.microsoft`) that TensorRT's ONNX parser does not
implement, so a decoder exported with it cannot become a native engine. The runtime therefore uses
TensorRT through ONNX Runtime's TensorRT execution provider: TensorRT takes every subgraph it can parse
and the CUDA execution provider runs the attention nodes, on the same device, with the KV cache still
updated in place. Components with only standard ops (the vision encoder) get native engines
here; a contrib-op component is reported as served by the execution provider, which the runtime
configures with the same shape bounds (`profile_shapes` and `trt_ep_provider_options` live in the torch-free
`focalrt/runtime/backends/tensorrt_ep.py`, so the device can use them). docs/precision-and-tensorrt.md has the
reasoning.

Nothing here was run on a GPU by this project's CI: there is no GPU there. Without tensorrt, CUDA or a GPU
every entry point fails with an error that says which is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from focalrt.bundle import load, sha256_file
from focalrt.runtime.backends.device import FP8_MIN_SM, INT4_WEIGHT_ONLY_MIN_SM, Gpu, gpus
from focalrt.runtime.backends.tensorrt_ep import (
    ENGINE_DIR,
    profile_shapes,
    trt_ep_provider_options,  # noqa: F401  (re-exported for export callers)
)

log = logging.getLogger(__name__)

TIMING_CACHE = "timing.cache"
STANDARD_DOMAINS = ("", "ai.onnx")
# int8-weights (`focalrt convert --precision int8`) is MatMulNBits, a contrib op: ONNX Runtime's TensorRT
# provider serves such components (TensorRT runs the rest of the graph, CUDA the MatMulNBits nodes).
PRECISIONS = ("fp32", "fp16", "int8", "fp8", "int4", "int8-weights")
# How an engine of each bundle precision is built: strongly typed networks take their types from the graph
# (QDQ scales, fp16 tensors); an fp32 graph built "as fp16" lets TensorRT pick fp16 kernels instead.
QUANTIZED = ("int8", "fp8", "int4")


class TensorRTUnavailable(RuntimeError):
    """TensorRT, CUDA or a GPU is missing; the message says which and how to get it."""


class StaleEngineError(RuntimeError):
    """An engine exists but was built for another ONNX file, TensorRT version, GPU or precision."""


@dataclass(frozen=True)
class EngineKey:
    component: str
    onnx_sha256: str
    tensorrt: str
    gpu: str
    precision: str

    @property
    def digest(self) -> str:
        text = json.dumps([self.component, self.onnx_sha256, self.tensorrt, self.gpu, self.precision])
        return hashlib.sha256(text.encode()).hexdigest()

    def file_stem(self) -> str:
        return f"{self.component}.{self.precision}.{self.digest[:16]}"

    def differences(self, other: dict[str, Any]) -> list[str]:
        fields = ("onnx_sha256", "tensorrt", "gpu", "precision")
        return [f"{f}: engine has {other.get(f)!r}, now {getattr(self, f)!r}" for f in fields
                if other.get(f) != getattr(self, f)]


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(
            "TensorRT's Python package is not installed. On an x86 machine with an NVIDIA GPU: "
            "`pip install tensorrt` (it must match your CUDA major version); on a Jetson it comes with JetPack "
            "(`sudo apt install python3-libnvinfer`). See docs/deploy-rtx.md and docs/deploy-jetson.md") from None
    return trt


def require_gpu(found: list[Gpu] | None = None) -> Gpu:
    found = gpus() if found is None else found
    if not found:
        raise TensorRTUnavailable("no NVIDIA GPU found (nvidia-smi is missing or lists none, and this is not a "
                                  "Jetson). TensorRT engines must be built on the GPU that will run them")
    return found[0]


def check_precision_supported(precision: str, gpu: Gpu) -> None:
    """Refuse precisions the GPU has no hardware for, before any build starts."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    cc = gpu.compute_capability
    if precision == "fp8" and (cc is None or cc < FP8_MIN_SM):
        orin = " Jetson Orin is Ampere (SM 8.7) and has no FP8." if cc == (8, 7) else ""
        raise ValueError(f"FP8 engines need compute capability 8.9+ (Ada, Hopper); {gpu.name} is SM "
                         f"{gpu.sm or 'unknown'}.{orin} Calibrate with --precision int8, or convert to int4 "
                         f"or fp16, for this GPU")
    if precision == "int4" and cc is not None and cc < INT4_WEIGHT_ONLY_MIN_SM:
        raise ValueError(f"INT4 weight-only engines need compute capability 7.5+; {gpu.name} is SM {gpu.sm}")


def component_sha256(bundle_dir: Path, record: dict[str, Any]) -> str:
    """Hash of what the parser reads: the graph file and its external weights, as they are on disk now."""
    h = hashlib.sha256(sha256_file(bundle_dir / record["file"]).encode())
    data = bundle_dir / (record["file"] + ".data")
    if data.exists():
        h.update(sha256_file(data).encode())
    return h.hexdigest()


def engine_files(bundle_dir: Path, key: EngineKey) -> tuple[Path, Path]:
    folder = bundle_dir / ENGINE_DIR
    return folder / f"{key.file_stem()}.engine", folder / f"{key.file_stem()}.json"


def find_engine(bundle_dir: str | Path, key: EngineKey) -> Path:
    """The engine built for exactly `key`; a clear error when only engines for something else exist."""
    bundle_dir = Path(bundle_dir)
    engine, meta = engine_files(bundle_dir, key)
    if engine.is_file() and meta.is_file():
        return engine
    others = sorted((bundle_dir / ENGINE_DIR).glob(f"{key.component}.*.json"), key=lambda p: p.stat().st_mtime)
    if not others:
        raise FileNotFoundError(f"no TensorRT engine for {key.component} in {bundle_dir / ENGINE_DIR}; run "
                                f"`focalrt build-engines {bundle_dir}` on this device")
    previous = json.loads(others[-1].read_text())
    raise StaleEngineError(f"the TensorRT engine for {key.component} in {bundle_dir / ENGINE_DIR} is stale ("
                           + "; ".join(key.differences(previous)) + f"). Rebuild it on this device with "
                           f"`focalrt build-engines {bundle_dir}`")


def contrib_ops(model) -> list[str]:
    """Ops outside the standard ONNX domain, which TensorRT's parser cannot read."""
    return sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS})


def signed_activations(model) -> int:
    """Re-encode uint8 zero-point-128 activations as int8 zero-point-0 (what TensorRT takes); same values.

    Returns how many zero points changed. Asymmetric uint8 zero points cannot be re-encoded and are refused.
    """
    import numpy as np
    from onnx import TensorProto, numpy_helper

    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]
    zp_names = {n.input[2] for n in qdq}
    changed = 0
    for i, init in enumerate(model.graph.initializer):
        if init.name not in zp_names or init.data_type != TensorProto.UINT8:
            continue
        value = numpy_helper.to_array(init)
        if not np.all(value == 128):
            raise ValueError(f"zero point {init.name} is {value.ravel()[:4]}: asymmetric uint8 activations "
                             f"cannot be re-encoded for TensorRT, which needs symmetric int8; re-calibrate "
                             f"with this focalrt (it writes symmetric activations)")
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.zeros(value.shape, np.int8), init.name))
        changed += 1
    if changed:
        q_outputs = {n.output[0] for n in qdq if n.op_type == "QuantizeLinear"}
        for vi in model.graph.value_info:
            if vi.name in q_outputs and vi.type.tensor_type.elem_type == TensorProto.UINT8:
                vi.type.tensor_type.elem_type = TensorProto.INT8
    return changed


def build_engine(trt, onnx_path: Path, profiles: list[dict], precision: str, fp16_kernels: bool,
                 timing_cache: Path, workspace_bytes: int | None) -> bytes:
    """Parse one ONNX file and build a serialized engine with the TensorRT Python API."""
    logger = trt.Logger(trt.Logger.WARNING)
    error: Exception | None = None
    try:
        builder = trt.Builder(logger)
    except Exception as e:  # pybind raises TypeError when the builder cannot initialise CUDA
        builder, error = None, e
    if builder is None:
        raise TensorRTUnavailable(f"TensorRT could not create a builder ({error or 'no CUDA device'}); check the "
                                  f"NVIDIA driver with `nvidia-smi` and that the CUDA runtime this TensorRT was "
                                  f"built for is installed")
    strongly_typed = precision in (*QUANTIZED, "fp16")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16_kernels and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for shapes in profiles:  # none for a static-shape graph (the vision encoder)
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path.name} (see its log above)")
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


BuildFn = Callable[[Path, list[dict], str, bool, Path], bytes]


def build_engines(bundle_dir: str | Path, precision: str | None = None, components: list[str] | None = None,
                  max_batch: int = 1, force: bool = False, workspace_gb: float | None = None,
                  gpu: Gpu | None = None, tensorrt_version: str | None = None,
                  build_fn: BuildFn | None = None) -> list[dict[str, Any]]:
    """Build (or keep, when up to date) one engine per component under bundle/engines/.

    `precision=None` builds each component in its bundle precision. `precision="fp16"` on an fp32 bundle
    lets TensorRT use fp16 kernels. Quantized precisions come only from calibrated bundles: their scales
    are in the graph. `gpu`, `tensorrt_version` and `build_fn` replace detection and the TensorRT build
    (tests use them; a normal call leaves them out).
    """
    import onnx

    bundle_dir = Path(bundle_dir)
    bundle = load(bundle_dir)
    if build_fn is None:
        trt = import_tensorrt()
        tensorrt_version = trt.__version__
        workspace = int(workspace_gb * (1 << 30)) if workspace_gb else None

        def build_fn(path, profiles, prec, fp16, cache):
            return build_engine(trt, path, profiles, prec, fp16, cache, workspace)
    if tensorrt_version is None:
        raise ValueError("tensorrt_version is required with a custom build_fn")
    gpu = gpu or require_gpu()
    if precision is not None:
        check_precision_supported(precision, gpu)  # the hardware answer first: no point quantizing for it
    names = components or list(bundle.manifest["components"])
    out_dir = bundle_dir / ENGINE_DIR
    results = []
    for name in names:
        record = bundle.component(name)
        own = record.get("precision", "fp32")
        target, fp16_kernels = _target_precision(name, own, precision)
        check_precision_supported(target, gpu)
        graph = onnx.load(str(bundle.component_path(name)), load_external_data=False)
        unsupported = contrib_ops(graph)
        if unsupported:
            results.append({"component": name, "status": "served by ONNX Runtime's TensorRT execution provider",
                            "reason": f"{', '.join(unsupported)} is not a TensorRT parser op; TensorRT runs the "
                                      f"rest of the graph and the CUDA execution provider runs these nodes"})
            continue
        key = EngineKey(name, component_sha256(bundle_dir, record), tensorrt_version, gpu.name, target)
        engine, meta = engine_files(bundle_dir, key)
        if engine.is_file() and meta.is_file() and not force:
            results.append({"component": name, "status": "up to date", "engine": str(engine)})
            continue
        stale = [p for p in out_dir.glob(f"{name}.*.json") if p != meta]
        changes = [d for p in stale for d in key.differences(json.loads(p.read_text()))]
        profiles = [profile_shapes(record, bundle.manifest, max_batch)]
        if any(d == "sequence" for i in record.get("inputs", []) for d in i["shape"]):
            profiles.append(profile_shapes(record, bundle.manifest, max_batch, decode=True))
        t0 = time.perf_counter()
        out_dir.mkdir(exist_ok=True)  # only once there is something to build: refusals leave the bundle as it was
        with _parser_input(bundle_dir, record, graph, target) as source:
            data = build_fn(source, [p for p in profiles if p], target, fp16_kernels, out_dir / TIMING_CACHE)
        _write_atomic(engine, data)
        _write_atomic(meta, (json.dumps({"component": name, "file": engine.name, "onnx_sha256": key.onnx_sha256,
                                    "tensorrt": key.tensorrt, "gpu": key.gpu, "compute_capability": gpu.sm,
                                    "precision": target, "key": key.digest, "profiles": profiles,
                                    "built_unix": int(time.time())}, indent=2) + "\n").encode())
        for old in stale:
            old.with_suffix(".engine").unlink(missing_ok=True)
            old.unlink(missing_ok=True)
        results.append({"component": name, "status": "rebuilt" if stale else "built", "engine": str(engine),
                        "seconds": round(time.perf_counter() - t0, 1), "changed": changes})
    return results


def _write_atomic(path: Path, data: bytes) -> None:
    """Write beside the target and rename: an interrupted build never leaves a truncated engine."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _target_precision(name: str, own: str, requested: str | None) -> tuple[str, bool]:
    """(engine precision, let TensorRT choose fp16 kernels) for a component of precision `own`."""
    if requested in (None, own):
        return own, own == "fp16"
    if requested == "fp16" and own == "fp32":
        return "fp16", True
    if requested in QUANTIZED and own == "fp32":
        how = ("focalrt convert --precision int4" if requested == "int4"
               else f"focalrt calibrate --precision {requested}")
        raise ValueError(f"{name} is fp32: {requested} engines need a quantized bundle whose scales are in the "
                         f"graph; make one with `{how}` and build engines from it")
    raise ValueError(f"{name} is {own}; it cannot be built as {requested}. Build it as {own} (leave out "
                     f"--precision) or start from the fp32 bundle")


@contextmanager
def _parser_input(bundle_dir: Path, record: dict[str, Any], graph, precision: str) -> Iterator[Path]:
    """The file TensorRT parses: the component itself, or its graph with int8 (zero point 0) activations.

    Int8 bundles written by `focalrt calibrate` carry that graph as `tensorrt_file`. For older ones a
    temporary copy is written beside the component, so its external weights (same relative file) are read
    in place, and removed after the build.
    """
    path = bundle_dir / record["file"]
    if precision != "int8":
        yield path
        return
    if record.get("tensorrt_file"):
        yield bundle_dir / record["tensorrt_file"]["file"]
        return
    import onnx

    if not signed_activations(graph):
        yield path
        return
    copy = path.with_name(f".{path.stem}.tensorrt-int8.onnx")
    onnx.save_model(graph, str(copy))
    try:
        yield copy
    finally:
        copy.unlink(missing_ok=True)
