"""TensorRT engines: keys, staleness, precision refusal and shape profiles (with a fake GPU and builder),
plus a real build that runs only where tensorrt and an NVIDIA GPU exist (never in this project's CI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from focalrt.runtime.device import Gpu

onnx = pytest.importorskip("onnx")

ORIN = Gpu("NVIDIA Jetson AGX Orin", (8, 7), None, True)
ADA = Gpu("NVIDIA GeForce RTX 4090", (8, 9), 24 << 30)


class FakeBuilder:
    """Stands in for the TensorRT build: records what it was asked, returns engine bytes."""

    def __init__(self):
        self.calls = []

    def __call__(self, path: Path, profiles, precision, fp16_kernels, timing_cache) -> bytes:
        self.calls.append({"file": path.name, "profiles": profiles, "precision": precision, "fp16": fp16_kernels})
        return b"engine:" + path.name.encode()


def test_engine_key_changes_with_every_field():
    from focalrt.export.tensorrt import EngineKey

    base = EngineKey("vision", "a" * 64, "10.3.0", "Orin", "int8")
    variants = [EngineKey("vision", "b" * 64, "10.3.0", "Orin", "int8"),
                EngineKey("vision", "a" * 64, "10.4.0", "Orin", "int8"),
                EngineKey("vision", "a" * 64, "10.3.0", "RTX 4090", "int8"),
                EngineKey("vision", "a" * 64, "10.3.0", "Orin", "fp16"),
                EngineKey("embed", "a" * 64, "10.3.0", "Orin", "int8")]
    assert len({base.digest, *(v.digest for v in variants)}) == 6
    assert base.file_stem().startswith("vision.int8.")


def test_build_keep_rebuild_and_refuse_stale(tiny_bundle, tmp_path):
    import shutil

    from focalrt.export.tensorrt import EngineKey, StaleEngineError, build_engines, component_sha256, find_engine

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    fake = FakeBuilder()
    first = build_engines(bundle, gpu=ADA, tensorrt_version="10.3.0", build_fn=fake)
    status = {r["component"]: r["status"] for r in first}
    assert status["vision"] == "built" and status["embed"] == "built"
    assert "execution provider" in status["decoder"]  # GroupQueryAttention is not a TensorRT parser op
    decoder = next(r for r in first if r["component"] == "decoder")
    assert "com.microsoft::GroupQueryAttention" in decoder["reason"]

    rec = json.loads((bundle / "manifest.json").read_text())["components"]["vision"]
    key = EngineKey("vision", component_sha256(bundle, rec), "10.3.0", ADA.name, "fp32")
    engine = find_engine(bundle, key)
    assert engine.read_bytes() == b"engine:vision.onnx"
    meta = json.loads(engine.with_suffix(".json").read_text())
    assert meta["compute_capability"] == "8.9" and meta["tensorrt"] == "10.3.0"

    again = build_engines(bundle, gpu=ADA, tensorrt_version="10.3.0", build_fn=fake)
    assert {r["component"]: r["status"] for r in again}["vision"] == "up to date"
    assert len(fake.calls) == 2  # nothing rebuilt

    newer = build_engines(bundle, components=["vision"], gpu=ADA, tensorrt_version="10.4.0", build_fn=fake)
    assert newer[0]["status"] == "rebuilt" and any("tensorrt" in c for c in newer[0]["changed"])
    assert not engine.exists()  # the stale engine is gone
    with pytest.raises(StaleEngineError, match=r"tensorrt: engine has '10.4.0', now '10.3.0'"):
        find_engine(bundle, key)
    with pytest.raises(FileNotFoundError, match="build-engines"):
        find_engine(bundle, EngineKey("nothing", "x", "10", "g", "fp32"))


def test_fp8_is_refused_on_orin_before_any_build(tiny_bundle):
    from focalrt.export.tensorrt import build_engines, check_precision_supported

    with pytest.raises(ValueError, match=r"SM 8\.7.*Orin is Ampere.*no FP8"):
        check_precision_supported("fp8", ORIN)
    check_precision_supported("fp8", ADA)  # Ada has FP8
    fake = FakeBuilder()
    with pytest.raises(ValueError, match=r"8\.9\+"):
        build_engines(tiny_bundle, precision="fp8", gpu=ORIN, tensorrt_version="10.3.0", build_fn=fake)
    assert fake.calls == []


def test_quantized_engines_need_a_quantized_bundle(tiny_bundle):
    from focalrt.export.tensorrt import build_engines

    with pytest.raises(ValueError, match="focalrt calibrate --precision int8"):
        build_engines(tiny_bundle, precision="int8", gpu=ADA, tensorrt_version="10.3.0", build_fn=FakeBuilder())


def test_fp16_engines_from_an_fp32_bundle_use_fp16_kernels(tiny_bundle, tmp_path):
    import shutil

    from focalrt.export.tensorrt import build_engines

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    fake = FakeBuilder()
    build_engines(bundle, precision="fp16", components=["vision"], gpu=ORIN, tensorrt_version="10.3.0",
                  build_fn=fake)
    assert fake.calls[0]["precision"] == "fp16" and fake.calls[0]["fp16"] is True


def test_profiles_are_bounded_by_max_context(tiny_bundle):
    from focalrt.bundle import load
    from focalrt.export.tensorrt import profile_shapes, trt_ep_provider_options

    b = load(tiny_bundle)
    ctx = b.manifest["text"]["max_context"]
    dec = profile_shapes(b.component("decoder"), b.manifest, max_batch=4)
    lo, opt, hi = dec["inputs_embeds"]
    assert lo == [1, 1, 64] and hi == [4, ctx, 64]
    assert dec["past_key_values.0.key"][2] == [4, 2, ctx, 16]
    assert dec["attention_mask"][2] == [4, ctx]
    step = profile_shapes(b.component("decoder"), b.manifest, decode=True)
    assert step["inputs_embeds"][2] == [1, 1, 64]
    emb = profile_shapes(b.component("embed"), b.manifest)
    assert emb["image_embeds"][1] == [b.manifest["preprocess"]["image_tokens"], 64]
    assert profile_shapes(b.component("vision"), b.manifest) == {}  # fixed grid: no dynamic inputs

    opts = trt_ep_provider_options(tiny_bundle, "decoder")
    assert f"inputs_embeds:1x{ctx}x64" in opts["trt_profile_max_shapes"]
    assert opts["trt_engine_cache_path"].endswith("engines")

    bad = {"inputs": [{"name": "x", "shape": ["mystery", 3]}]}
    with pytest.raises(ValueError, match="'mystery'"):
        profile_shapes(bad, b.manifest)


def test_int8_activations_reencode_for_tensorrt_without_changing_values(tiny_bundle, tmp_path):
    import onnxruntime as ort

    from focalrt.calibration.quantize import quantize_qdq
    from focalrt.export.tensorrt import signed_activations

    src = tiny_bundle / "vision.onnx"
    rng = np.random.default_rng(0)
    feeds = [{"pixel_values": rng.standard_normal((576, 1176)).astype(np.float32)} for _ in range(2)]
    q8 = tmp_path / "vision.int8.onnx"
    quantize_qdq(src, q8, feeds, "int8", progress=False)
    model = onnx.load(str(q8))
    assert signed_activations(model) > 0
    zps = [i for i in model.graph.initializer if i.name.endswith("zero_point")]
    assert zps and not any(z.data_type == onnx.TensorProto.UINT8 for z in zps)
    s8 = tmp_path / "vision.s8.onnx"
    onnx.save(model, str(s8))
    onnx.checker.check_model(str(s8))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the literal QDQ arithmetic
    a = ort.InferenceSession(str(q8), so, providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    b = ort.InferenceSession(str(s8), so, providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    np.testing.assert_array_equal(a, b)


def test_missing_tensorrt_gives_a_clear_error(tiny_bundle, monkeypatch):
    import sys

    from focalrt.export.tensorrt import TensorRTUnavailable, build_engines

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if it were not installed
    with pytest.raises(TensorRTUnavailable, match="pip install tensorrt"):
        build_engines(tiny_bundle)


def test_real_engine_build_on_a_gpu(tiny_bundle, tmp_path):
    pytest.importorskip("tensorrt", reason="tensorrt is not installed (no GPU build here)")
    from focalrt.runtime.device import gpus

    if not gpus():
        pytest.skip("no NVIDIA GPU")
    import shutil

    from focalrt.export.tensorrt import build_engines

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    results = build_engines(bundle, components=["vision", "embed"])
    assert all(r["status"] == "built" for r in results)
    assert all(Path(r["engine"]).stat().st_size > 0 for r in results)
