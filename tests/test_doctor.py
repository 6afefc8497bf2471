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


# ---------------------------------------------------------------- which distribution, and two at once


def test_doctor_says_which_distribution_provides_onnxruntime_and_cv2():
    from focalrt.runtime.backends.device import module_source

    ort_src = module_source("onnxruntime")
    assert ort_src.error is None and ort_src.version
    assert any(d.split()[0] in ("onnxruntime", "onnxruntime-gpu") for d in ort_src.distributions), ort_src
    cv = module_source("cv2")
    assert cv.error is None and set(cv.build) == {"GStreamer", "FFMPEG"}


def test_doctor_warns_when_onnxruntime_and_onnxruntime_gpu_are_both_installed(tmp_path, monkeypatch):
    from focalrt.runtime.backends.device import module_source, module_warnings

    assert not any("onnxruntime-gpu" in w for w in module_warnings([module_source("onnxruntime")]))
    # What pip leaves behind when onnxruntime-gpu is installed beside onnxruntime: a second dist-info.
    for name, version in (("onnxruntime", "1.31.1"), ("onnxruntime_gpu", "1.31.1")):
        info = tmp_path / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    warnings = module_warnings([module_source("onnxruntime")])
    assert any(w.startswith("both onnxruntime and onnxruntime-gpu are installed") for w in warnings), warnings


# ---------------------------------------------------------------- doctor --check


def perturbed_decoder(bundle, out, bump: dict[int, float] | None = None, shift: float = 0.0):
    """The bundle's decoder graph with its logits moved: `shift` on every token, `bump` on some."""
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import helper, numpy_helper

    model = onnx.load(str(bundle / "decoder.onnx"))
    vocab = json.loads((bundle / "manifest.json").read_text())["text"]["vocab_size"]
    delta = np.full(vocab, shift, np.float32)
    for token, value in (bump or {}).items():
        delta[token] += value
    producer = next(n for n in model.graph.node if "logits" in n.output)
    producer.output[list(producer.output).index("logits")] = "logits_unperturbed"
    model.graph.initializer.append(numpy_helper.from_array(delta, "logits_delta"))
    model.graph.node.append(helper.make_node("Add", ["logits_unperturbed", "logits_delta"], ["logits"]))
    path = out / "decoder.onnx"
    onnx.save(model, str(path))
    return path


def opener(bundle, perturbed=None, pretend=None):
    """open_pipeline for check_bundle: the real CPU pipeline; for "perturbed", one whose decoder is `perturbed`;
    for `pretend` (a GPU provider's name), a CPU pipeline, as onnxruntime gives when it falls back."""
    from focalrt.bundle import load
    from focalrt.runtime.backends.sessions import create_session
    from focalrt.runtime.pipeline import Pipeline

    def open_pipeline(provider):
        if provider == "perturbed":
            def sessions(path):
                return create_session(perturbed if path.name == "decoder.onnx" else path, ["CPUExecutionProvider"])

            return Pipeline(load(bundle), provider="cpu", session_factory=sessions)
        return Pipeline.from_bundle(bundle, provider="cpu" if provider == pretend else provider)

    return open_pipeline


def test_check_cpu_against_itself_agrees(tiny_bundle):
    from focalrt.bench.provider_check import check_bundle

    result = check_bundle(tiny_bundle, providers=["cpu"], open_pipeline=opener(tiny_bundle))
    assert result["ok"] is True
    ref, cpu = result["providers"]
    assert ref["status"] == "reference" and len(ref["tokens"]) == 8 and ref["decode_steps"] == 7
    assert cpu["status"] == "ok" and cpu["tokens"] == ref["tokens"]
    assert cpu["comparison"]["same_tokens"] and cpu["comparison"]["steps_compared"] == 8
    assert cpu["comparison"]["max_abs_logit_diff"] == 0.0


def test_check_catches_logits_that_moved_with_the_same_tokens(tiny_bundle, tmp_path):
    from focalrt.bench.provider_check import check_bundle, format_check

    decoder = perturbed_decoder(tiny_bundle, tmp_path, shift=1.0)  # argmax unchanged, every logit off by 1
    result = check_bundle(tiny_bundle, providers=["perturbed"], open_pipeline=opener(tiny_bundle, decoder))
    assert result["ok"] is False
    row = result["providers"][1]
    assert row["status"] == "mismatch" and row["tokens"] == result["providers"][0]["tokens"]
    c = row["comparison"]
    assert c["same_tokens"] is True and c["logits_ok"] is False and c["first_logit_difference"] == 0
    assert abs(c["max_abs_logit_diff"] - 1.0) < 1e-3
    assert "MISMATCH" in format_check(result)


def test_check_catches_other_tokens(tiny_bundle, tmp_path):
    from focalrt.bench.provider_check import check_bundle

    decoder = perturbed_decoder(tiny_bundle, tmp_path, bump={100: 1e4})  # token 100 wins every step
    result = check_bundle(tiny_bundle, providers=["perturbed"], open_pipeline=opener(tiny_bundle, decoder))
    row = result["providers"][1]
    assert result["ok"] is False and row["status"] == "mismatch"
    assert set(row["tokens"]) == {100} and row["comparison"]["first_token_difference"] == 0
    assert row["comparison"]["steps_compared"] == 1  # after the first other token the inputs differ


def test_check_calls_a_silent_fallback_to_the_cpu_an_error(tiny_bundle):
    from focalrt.bench.provider_check import check_bundle

    result = check_bundle(tiny_bundle, providers=["cuda"], open_pipeline=opener(tiny_bundle, pretend="cuda"))
    row = result["providers"][1]
    assert result["ok"] is False and row["status"] == "error" and "fell back" in row["note"]


def test_gpu_providers_are_skipped_without_a_gpu_and_checked_with_one():
    from focalrt.bench.provider_check import default_providers

    gpu_ort = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert default_providers(gpu_ort, have_gpu=True) == (["tensorrt", "cuda"], {})
    checks, skipped = default_providers(gpu_ort, have_gpu=False)
    assert checks == [] and set(skipped) == {"tensorrt", "cuda"} and "no NVIDIA GPU" in skipped["cuda"]
    checks, skipped = default_providers(["CPUExecutionProvider"], have_gpu=True)
    assert checks == [] and "onnxruntime-gpu" in skipped["tensorrt"]


def test_doctor_check_command_prints_a_table_and_a_json_and_exits_1_on_a_mismatch(tiny_bundle, tmp_path, capsys,
                                                                                   monkeypatch):
    from focalrt import cli
    from focalrt.runtime.pipeline import Pipeline

    assert cli.main(["doctor", "--check", str(tiny_bundle), "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("doctor --check") and lines[1].startswith("| provider")
    assert lines[3].startswith("| cpu ") and "reference" in lines[3]
    result = json.loads(lines[-1])
    assert result["ok"] is True and result["providers"][0]["tokens"] and result["input"]["max_new_tokens"] == 4

    decoder = perturbed_decoder(tiny_bundle, tmp_path, bump={100: 1e4})
    real = Pipeline.from_bundle
    opened = []

    def from_bundle(path, provider=None, **kwargs):  # the second CPU pipeline (the one compared) is perturbed
        opened.append(provider)
        if len(opened) == 1:
            return real(path, provider=provider, **kwargs)
        return opener(tiny_bundle, decoder)("perturbed")

    monkeypatch.setattr(Pipeline, "from_bundle", staticmethod(from_bundle))
    assert cli.main(["doctor", "--check", str(tiny_bundle), "--providers", "cpu", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and result["providers"][1]["status"] == "mismatch" and opened == ["cpu", "cpu"]


def test_gpu_check_script_skips_cleanly_without_a_gpu_or_onnxruntime_gpu(tmp_path):
    """benchmarks/gpu_check.sh is for the first machine with an NVIDIA GPU; here it must say why it skips,
    write that into its JSON and exit 0, both with no GPU and with a GPU but the CPU onnxruntime."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("nvidia-smi") or Path("/etc/nv_tegra_release").exists():
        pytest.skip("a GPU machine: the script would really run")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA Test (UUID: GPU-0)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    for path, why in ((os.environ["PATH"], "no NVIDIA GPU"), (f"{fake}:{os.environ['PATH']}", "CUDAExecutionProvider")):
        out = tmp_path / why.split()[0]
        done = subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PATH": path})
        assert done.returncode == 0, done.stderr
        assert "skipped" in done.stdout and why in done.stdout, done.stdout
        result = json.loads((out / "gpu_check.json").read_text())
        assert why in result["skipped"] and "steps" not in result and not (out / "bundles").exists()
