"""`focalrt doctor` and the device facts behind it, with fake GPUs where this machine has none."""

from __future__ import annotations

import json

import pytest

from focalrt.runtime.backends.device import Gpu, bundle_fit, jetson_gpu, parse_nvidia_smi, precisions

GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_nvidia_smi_query_is_parsed():
    out = "NVIDIA GeForce RTX 4090, 8.9, 24564, 550.54.14\nTesla T4, 7.5, 15360, 535.1\n"
    g = parse_nvidia_smi(out)
    assert [x.name for x in g] == ["NVIDIA GeForce RTX 4090", "Tesla T4"]
    assert g[0].compute_capability == (8, 9) and g[0].memory_bytes == 24564 << 20 and g[0].driver == "550.54.14"
    assert parse_nvidia_smi("garbage line\n") == []


def test_jetson_is_found_from_the_device_tree(tmp_path):
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson Orin Nano Engineering Reference Developer Kit\x00")
    g = jetson_gpu(model)
    assert g.compute_capability == (8, 7) and g.shared_memory and g.memory_bytes is None
    model.write_bytes(b"Raspberry Pi 5 Model B\x00")
    assert jetson_gpu(model) is None
    assert jetson_gpu(tmp_path / "missing") is None


def test_precisions_per_device():
    orin = precisions(GPU_PROVIDERS, Gpu("Jetson Orin Nano", (8, 7), None, True))
    assert orin["fp8"].startswith("no") and "8.7" in orin["fp8"] and "8.9" in orin["fp8"]
    assert orin["int8"] == "yes (TensorRT)" and orin["fp16"] == "yes (TensorRT)"
    ada = precisions(GPU_PROVIDERS, Gpu("RTX 4090", (8, 9), 24 << 30))
    assert ada["fp8"] == "yes (TensorRT)"
    cuda_only = precisions(["CUDAExecutionProvider", "CPUExecutionProvider"], Gpu("RTX 4090", (8, 9), 24 << 30))
    assert "needs TensorRT" in cuda_only["fp8"]
    cpu = precisions(["CPUExecutionProvider"], None)
    assert cpu["int8"].startswith("yes") and cpu["fp8"].startswith("no")


def test_bundle_fit_counts_weights_and_kv_cache(tiny_bundle):
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    t = m["text"]
    kv = 2 * t["num_layers"] * t["num_kv_heads"] * t["head_dim"] * t["max_context"] * 4
    roomy = bundle_fit(tiny_bundle, None, 64 << 30)
    assert roomy["kv_cache_bytes"] == kv and roomy["fits"] is True
    weights = sum(c["bytes"] + c.get("external_data", {}).get("bytes", 0) for c in m["components"].values())
    assert roomy["weights_bytes"] >= weights and roomy["needed_bytes"] > roomy["weights_bytes"] + kv
    tight = bundle_fit(tiny_bundle, None, 10 << 20)
    assert tight["fits"] is False and tight["memory"] == "system RAM"
    on_gpu = bundle_fit(tiny_bundle, Gpu("T4", (7, 5), 16 << 30), 1 << 20)
    assert on_gpu["fits"] is True and "GPU memory" in on_gpu["memory"]
    jetson = bundle_fit(tiny_bundle, Gpu("Orin Nano", (8, 7), None, True), 10 << 20)
    assert jetson["fits"] is False and "shared with the GPU" in jetson["memory"]


def test_doctor_command_prints_the_device_and_the_bundle_verdict(tiny_bundle, capsys):
    import focalrt.cli as focal_cli

    old = focal_cli.COMMANDS
    focal_cli.COMMANDS = tuple(dict.fromkeys(old + ("doctor",)))
    try:
        assert focal_cli.main(["doctor", str(tiny_bundle), "--no-cameras"]) == 0
        text = capsys.readouterr().out
        assert "execution providers" in text and "CPUExecutionProvider" in text
        assert "fp8" in text and "fits" in text and "KV cache at 4096 tokens" in text
        assert focal_cli.main(["doctor", "--json", "--no-cameras"]) == 0
        report = json.loads(capsys.readouterr().out)
    finally:
        focal_cli.COMMANDS = old
    assert set(report) >= {"providers", "gpus", "cuda", "tensorrt", "precisions", "cameras", "ram_bytes"}
    assert report["bundle"] is None


@pytest.mark.skipif(not __import__("shutil").which("nvidia-smi"), reason="no nvidia-smi: no NVIDIA GPU here")
def test_real_gpu_is_reported():
    from focalrt.runtime.backends.device import gpus

    found = gpus()
    assert found and found[0].compute_capability is not None
