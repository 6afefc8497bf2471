"""ONNX Runtime sessions: provider choice and loading with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnxruntime as ort

TENSORRT = "TensorrtExecutionProvider"
PREFERRED = (TENSORRT, "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = (TENSORRT, "CUDAExecutionProvider")  # both keep tensors in CUDA device memory
ALIASES = {"tensorrt": TENSORRT, "trt": TENSORRT,
           "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


class SessionError(RuntimeError):
    """An ONNX file could not be loaded; the message names the file and the likely fix."""


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def resolve_providers(provider: str | None = None) -> list[str]:
    """Providers in priority order: TensorRT > CUDA > CPU where present, or the one the user named.

    CPU is always kept last as the fallback for nodes the GPU providers do not take.
    """
    have = available_providers()
    if provider in (None, "", "auto"):
        return [p for p in PREFERRED if p in have]
    name = ALIASES.get(provider.lower(), provider)
    if name not in have:
        raise SessionError(f"execution provider {provider!r} is not available in this onnxruntime "
                           f"(available: {have}). Install onnxruntime-gpu for CUDA/TensorRT, "
                           f"or pass --provider cpu")
    return [name] + (["CPUExecutionProvider"] if name != "CPUExecutionProvider" else [])


def device_for(providers: list[str]) -> str:
    """Where tensors and the KV cache live for these providers: "cuda" for CUDA and TensorRT, else "cpu"."""
    return "cuda" if providers and providers[0] in GPU_PROVIDERS else "cpu"


def provider_options(providers: list[str], trt_options: dict[str, Any] | None = None) -> list[tuple[str, dict]]:
    """(provider, options) pairs: only the TensorRT entry gets options; CUDA and CPU run on their defaults."""
    return [(p, dict(trt_options or {}) if p == TENSORRT else {}) for p in providers]


def _make_cache_dirs(options: list[tuple[str, dict]]) -> None:
    """The TensorRT provider writes engines and timing caches into these folders; make them first."""
    for name, opts in options:
        if name == TENSORRT:
            for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
                if opts.get(key):
                    Path(opts[key]).mkdir(parents=True, exist_ok=True)


def create_session(path: str | os.PathLike, providers: list[str] | None = None,
                   threads: int | None = None, trt_options: dict[str, Any] | None = None,
                   spinning: bool = True) -> ort.InferenceSession:
    """Load one ONNX file. Graph optimisations are on (ORT_ENABLE_ALL) and run once at load.

    `threads` sizes the session's own intra-op pool (None: ONNX Runtime's default, one per core).
    `spinning=False` lets that pool's idle threads sleep instead of spinning for the next call, which
    is what a session sharing the CPU with another lane wants (`focalrt run` in real time).
    `trt_options` (from `runtime.tensorrt_ep.trt_ep_provider_options`) go to the TensorRT provider when it
    is among `providers`, and are ignored otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise SessionError(f"ONNX file {path} is missing; re-export the bundle")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = providers or resolve_providers()
    options = provider_options(providers, trt_options)
    _make_cache_dirs(options)
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=options)
    except Exception as e:  # ORT raises several unrelated exception types for a bad file
        trt = ("; or, if it loads with --provider cuda, the TensorRT provider rejected its options (shape "
               "profiles, cache folder): see docs/precision-and-tensorrt.md" if trt_options and TENSORRT in providers
               else "")
        raise SessionError(f"could not load {path}: {str(e).splitlines()[0][:300]}. "
                           f"The file is corrupt or not ONNX; re-export the bundle{trt}") from None


def load_component(bundle: Any, component: str, providers: list[str], threads: int | None = None,
                   max_batch: int = 1, max_context: int | None = None,
                   spinning: bool = True) -> ort.InferenceSession:
    """One bundle component's session; under TensorRT with shape profiles that fit `max_batch` rows of
    `max_context` tokens.

    Under TensorRT an int8 component loads its `tensorrt_file` (int8 activations with zero point 0, which
    TensorRT requires) when the bundle has one; every other provider keeps the uint8 graph that ONNX Runtime's
    CPU kernels fuse into integer matmuls.
    """
    path = bundle.component_path(component)
    trt = None
    if TENSORRT in providers:
        from focalrt.runtime.backends.tensorrt_ep import trt_ep_provider_options

        trt = trt_ep_provider_options(bundle, component, max_batch, max_context)
        signed = bundle.component(component).get("tensorrt_file")
        if signed:
            path = bundle.file(signed["file"])
    return create_session(path, providers, threads, trt, spinning=spinning)


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask where the OS has one (a container's CPU set), else
    the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def lane_threads(cores: int | None = None, face: int | None = None,
                 describe: int | None = None) -> tuple[int, int]:
    """Intra-op threads of (the frame lane's face models, the description lane's VLM) when both run at once.

    The face models are small (BlazeFace, FaceMesh, two 64x64 heads) and gain little past one or two
    threads, while the decoder is bound by memory bandwidth and takes what is left: on 2 cores one each,
    on an 8-core Orin 2 and 6. A value the user gave is kept as given.
    """
    cores = cores or usable_cores()
    face = face or (1 if cores <= 4 else 2)
    describe = describe or max(1, cores - face)
    return face, describe
