"""ONNX Runtime sessions: provider choice and loading with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
ALIASES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
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


def provider_options(providers: list[str], cache_dir: Path | None) -> list[tuple[str, dict]]:
    opts: list[tuple[str, dict]] = []
    for p in providers:
        if p == "TensorrtExecutionProvider" and cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            opts.append((p, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                             "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir)}))
        else:
            opts.append((p, {}))
    return opts


def create_session(path: str | os.PathLike, providers: list[str] | None = None,
                   threads: int | None = None, trt_cache_dir: Path | None = None) -> ort.InferenceSession:
    """Load one ONNX file. Graph optimisations are on (ORT_ENABLE_ALL) and run once at load."""
    path = Path(path)
    if not path.is_file():
        raise SessionError(f"ONNX file {path} is missing; re-export the bundle")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    providers = providers or resolve_providers()
    try:
        return ort.InferenceSession(str(path), sess_options=so,
                                    providers=provider_options(providers, trt_cache_dir))
    except Exception as e:  # ORT raises several unrelated exception types for a bad file
        raise SessionError(f"could not load {path}: {str(e).splitlines()[0][:300]}. "
                           f"The file is corrupt or not ONNX; re-export the bundle") from None
