"""Execution-provider choice: best available by default, a clear error for one that is not there."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from focalrt.runtime.backends.sessions import SessionError, device_for, resolve_providers

HAVE_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_auto_prefers_gpu_providers_and_keeps_cpu_last():
    providers = resolve_providers(None)
    assert providers[-1] == "CPUExecutionProvider"
    order = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers == [p for p in order if p in ort.get_available_providers()]


def test_named_provider_and_aliases():
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers("CPUExecutionProvider") == ["CPUExecutionProvider"]


@pytest.mark.skipif(HAVE_CUDA, reason="this machine has CUDA")
def test_missing_gpu_provider_is_explained():
    with pytest.raises(SessionError, match="not available.*onnxruntime-gpu"):
        resolve_providers("cuda")
    with pytest.raises(SessionError, match="not available"):
        resolve_providers("tensorrt")


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="needs onnxruntime-gpu and a CUDA GPU (none on this project's CI)")
def test_cuda_gives_the_cpu_tokens(tiny_bundle, astronaut_bgr):
    from focalrt.runtime.pipeline import Pipeline

    cpu = Pipeline.from_bundle(tiny_bundle, provider="cpu").describe(astronaut_bgr, max_new_tokens=16)
    gpu = Pipeline.from_bundle(tiny_bundle, provider="cuda").describe(astronaut_bgr, max_new_tokens=16)
    assert gpu.token_ids == cpu.token_ids


def test_device_follows_the_first_provider():
    assert device_for(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]) == "cuda"
    assert device_for(["CUDAExecutionProvider", "CPUExecutionProvider"]) == "cuda"
    assert device_for(["CPUExecutionProvider"]) == "cpu"
