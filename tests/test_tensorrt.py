"""TensorRT engines: keys, staleness, precision refusal and shape profiles (with a fake GPU and builder),
plus a real build that runs only where tensorrt and an NVIDIA GPU exist (never in this project's CI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from focalrt.runtime.backends.device import Gpu

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
    from focalrt.runtime.backends.tensorrt_engines import EngineKey

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

    from focalrt.runtime.backends.tensorrt_engines import (
        EngineKey,
        StaleEngineError,
        build_engines,
        component_sha256,
        find_engine,
    )

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    fake = FakeBuilder()
    first = build_engines(bundle, gpu=ADA, tensorrt_version="10.3.0", build_fn=fake)
    status = {r["component"]: r["status"] for r in first}
    assert status["vision"] == "built" and set(status) == {"vision", "decoder"}
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
    assert len(fake.calls) == 1  # nothing rebuilt

    newer = build_engines(bundle, components=["vision"], gpu=ADA, tensorrt_version="10.4.0", build_fn=fake)
    assert newer[0]["status"] == "rebuilt" and any("tensorrt" in c for c in newer[0]["changed"])
    assert not engine.exists()  # the stale engine is gone
    with pytest.raises(StaleEngineError, match=r"tensorrt: engine has '10.4.0', now '10.3.0'"):
        find_engine(bundle, key)
    with pytest.raises(FileNotFoundError, match="build-engines"):
        find_engine(bundle, EngineKey("nothing", "x", "10", "g", "fp32"))


def test_fp8_is_refused_on_orin_before_any_build(tiny_bundle):
    from focalrt.runtime.backends.tensorrt_engines import build_engines, check_precision_supported

    with pytest.raises(ValueError, match=r"SM 8\.7.*Orin is Ampere.*no FP8"):
        check_precision_supported("fp8", ORIN)
    check_precision_supported("fp8", ADA)  # Ada has FP8
    fake = FakeBuilder()
    with pytest.raises(ValueError, match=r"8\.9\+"):
        build_engines(tiny_bundle, precision="fp8", gpu=ORIN, tensorrt_version="10.3.0", build_fn=fake)
    assert fake.calls == []


def test_quantized_engines_need_a_quantized_bundle(tiny_bundle):
    from focalrt.runtime.backends.tensorrt_engines import build_engines

    before = sorted(p.name for p in tiny_bundle.iterdir())
    with pytest.raises(ValueError, match="focalrt calibrate --precision int8"):
        build_engines(tiny_bundle, precision="int8", gpu=ADA, tensorrt_version="10.3.0", build_fn=FakeBuilder())
    assert sorted(p.name for p in tiny_bundle.iterdir()) == before  # a refusal leaves the bundle as it was


def test_fp16_engines_from_an_fp32_bundle_use_fp16_kernels(tiny_bundle, tmp_path):
    import shutil

    from focalrt.runtime.backends.tensorrt_engines import build_engines

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    fake = FakeBuilder()
    build_engines(bundle, precision="fp16", components=["vision"], gpu=ORIN, tensorrt_version="10.3.0",
                  build_fn=fake)
    assert fake.calls[0]["precision"] == "fp16" and fake.calls[0]["fp16"] is True


def test_profiles_are_bounded_by_max_context(tiny_bundle):
    from focalrt.bundle import load
    from focalrt.runtime.backends.tensorrt_ep import profile_shapes, trt_ep_provider_options

    b = load(tiny_bundle)
    ctx = b.manifest["text"]["max_context"]
    dec = profile_shapes(b.component("decoder"), b.manifest, max_batch=4)
    lo, opt, hi = dec["input_ids"]
    assert lo == [1, 1] and hi == [4, ctx]
    assert dec["past_key_values.0.key"][2] == [4, 2, ctx, 16]
    assert dec["attention_mask"][2] == [4, ctx]
    step = profile_shapes(b.component("decoder"), b.manifest, decode=True)
    assert step["input_ids"][2] == [1, 1]
    assert dec["image_embeds"][1] == [b.manifest["preprocess"]["image_tokens"], 64]
    assert profile_shapes(b.component("vision"), b.manifest) == {}  # fixed grid: no dynamic inputs

    opts = trt_ep_provider_options(tiny_bundle, "decoder")
    assert f"input_ids:1x{ctx}" in opts["trt_profile_max_shapes"]
    assert opts["trt_engine_cache_path"].endswith("engines")

    bad = {"inputs": [{"name": "x", "shape": ["mystery", 3]}]}
    with pytest.raises(ValueError, match="'mystery'"):
        profile_shapes(bad, b.manifest)


TRT_EP = "TensorrtExecutionProvider"
GPU_PROVIDERS = [TRT_EP, "CUDAExecutionProvider", "CPUExecutionProvider"]


def _spec(text: str) -> dict[str, list[int]]:
    """'a:1x2,b:3' -> {'a': [1, 2], 'b': [3]}: the provider's profile string, parsed back."""
    return {name: [int(d) for d in dims.split("x")] for name, dims in (item.split(":") for item in text.split(","))}


def _with_precisions(tiny_bundle: Path, tmp_path: Path, precisions: dict[str, str]) -> Path:
    """A copy of the bundle whose manifest records other component precisions (the graphs stay fp32).

    Leaves out engines/: another test's refused build_engines call can leave an empty one in the fixture.
    """
    import shutil

    from focalrt.bundle import load, write_manifest

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle, ignore=shutil.ignore_patterns("engines"))
    manifest = load(bundle).manifest
    for name, precision in precisions.items():
        manifest["components"][name]["precision"] = precision
    write_manifest(bundle, manifest)
    return bundle


def test_export_uses_the_runtime_profiles():
    from focalrt.runtime.backends import tensorrt_engines as export_trt
    from focalrt.runtime.backends import tensorrt_ep

    assert export_trt.profile_shapes is tensorrt_ep.profile_shapes
    assert export_trt.trt_ep_provider_options is tensorrt_ep.trt_ep_provider_options
    assert export_trt.ENGINE_DIR == tensorrt_ep.ENGINE_DIR == "engines"


def test_runtime_tensorrt_options_import_no_export_torch_or_tensorrt():
    import subprocess
    import sys

    code = ("import sys\nimport focalrt.runtime.backends.tensorrt_ep, focalrt.runtime.backends.sessions\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorrt', 'transformers')"
            " or m.startswith('focalrt.export'))\nprint(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_only_the_tensorrt_entry_gets_the_options(tiny_bundle):
    from focalrt.runtime.backends.sessions import provider_options
    from focalrt.runtime.backends.tensorrt_ep import trt_ep_provider_options

    ctx = 512
    trt = trt_ep_provider_options(tiny_bundle, "decoder", max_batch=8, max_context=ctx)
    entries = dict(provider_options(GPU_PROVIDERS, trt))
    assert list(entries) == GPU_PROVIDERS
    assert entries["CUDAExecutionProvider"] == {} and entries["CPUExecutionProvider"] == {}
    got = entries[TRT_EP]
    assert got == trt and got is not trt  # a copy: the provider entry cannot change the caller's dict
    engines = str(Path(tiny_bundle) / "engines")
    assert got["trt_engine_cache_enable"] is True and got["trt_timing_cache_enable"] is True
    assert got["trt_engine_cache_path"] == engines and got["trt_timing_cache_path"] == engines
    lo, opt, hi = (_spec(got[f"trt_profile_{k}_shapes"]) for k in ("min", "opt", "max"))
    assert hi["input_ids"] == [8, ctx] and lo["input_ids"] == [1, 1]
    assert opt["past_key_values.0.key"] == [1, 2, ctx, 16]
    assert "trt_fp16_enable" not in got and "trt_int8_enable" not in got  # the tiny bundle is fp32

    # Without TensorRT in the list the options go nowhere; without options its entry is bare.
    assert provider_options(["CUDAExecutionProvider", "CPUExecutionProvider"], trt) == [
        ("CUDAExecutionProvider", {}), ("CPUExecutionProvider", {})]
    assert provider_options(["CPUExecutionProvider"], trt) == [("CPUExecutionProvider", {})]
    assert provider_options(GPU_PROVIDERS, None)[0] == (TRT_EP, {})


def test_create_session_hands_the_options_to_onnxruntime(tiny_bundle, tmp_path, monkeypatch):
    """The wiring into InferenceSession, with ORT's constructor replaced (no TensorRT here)."""
    from focalrt.runtime.backends import sessions
    from focalrt.runtime.backends.tensorrt_ep import trt_ep_provider_options

    bundle = _with_precisions(tiny_bundle, tmp_path, {})
    seen = []

    def fake_session(path, sess_options=None, providers=None):
        seen.append(providers)
        return "session"

    monkeypatch.setattr(sessions.ort, "InferenceSession", fake_session)
    trt = trt_ep_provider_options(bundle, "decoder", max_batch=4)
    assert not (bundle / "engines").exists()
    assert sessions.create_session(bundle / "decoder.onnx", GPU_PROVIDERS, trt_options=trt) == "session"
    assert seen[-1] == [(TRT_EP, trt), ("CUDAExecutionProvider", {}), ("CPUExecutionProvider", {})]
    assert (bundle / "engines").is_dir()  # made before the provider writes its caches there

    sessions.create_session(bundle / "decoder.onnx", ["CPUExecutionProvider"], trt_options=trt)
    assert seen[-1] == [("CPUExecutionProvider", {})]


def test_component_precision_sets_the_tensorrt_flag(tiny_bundle, tmp_path):
    from focalrt.runtime.backends.tensorrt_ep import trt_ep_provider_options

    bundle = _with_precisions(tiny_bundle, tmp_path, {"vision": "fp16", "decoder": "int8"})
    vision = trt_ep_provider_options(bundle, "vision")
    assert vision.get("trt_fp16_enable") is True and "trt_int8_enable" not in vision
    assert not any(k.startswith("trt_profile_") for k in vision)  # fixed grid: no shape profile
    decoder = trt_ep_provider_options(bundle, "decoder")
    assert decoder.get("trt_int8_enable") is True and "trt_fp16_enable" not in decoder
    bundle = _with_precisions(tiny_bundle, tmp_path / "other", {"vision": "fp16"})
    decoder = trt_ep_provider_options(bundle, "decoder")  # still fp32
    assert "trt_fp16_enable" not in decoder and "trt_int8_enable" not in decoder


def test_decoder_profile_max_uses_max_batch_and_context(tiny_bundle):
    from focalrt.bundle import load
    from focalrt.runtime.backends.tensorrt_ep import profile_shapes, trt_ep_provider_options

    b = load(tiny_bundle)
    full = b.manifest["text"]["max_context"]
    for batch, ctx in ((1, 300), (3, 1024), (8, None)):
        hi = _spec(trt_ep_provider_options(b, "decoder", max_batch=batch, max_context=ctx)["trt_profile_max_shapes"])
        c = ctx or full
        assert hi["input_ids"] == [batch, c]
        assert hi["attention_mask"] == [batch, c]
        assert hi["position_ids"] == [3, batch, c]
        kv = [name for name in hi if name.startswith("past_key_values.")]
        assert len(kv) == 2 * b.manifest["text"]["num_layers"]
        assert all(hi[name] == [batch, 2, c, 16] for name in kv)
        assert hi["image_embeds"] == [b.manifest["preprocess"]["image_tokens"] * batch, 64]

    # A context above the model's is capped, as the pipeline caps it; min <= opt <= max even when tiny.
    assert profile_shapes(b.component("decoder"), b.manifest, max_context=10 * full)["attention_mask"][2] == [1, full]
    for decode in (False, True):
        for lo, opt, hi in profile_shapes(b.component("decoder"), b.manifest, 2, decode, max_context=16).values():
            assert all(a <= o <= z for a, o, z in zip(lo, opt, hi, strict=True)), (lo, opt, hi)
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        profile_shapes(b.component("decoder"), b.manifest, max_batch=0)
    with pytest.raises(ValueError, match="max_context must be at least 1"):
        profile_shapes(b.component("decoder"), b.manifest, max_context=0)


class _StopLoading(Exception):
    """Ends a Pipeline load early: a CPU-only onnxruntime cannot go on to allocate a CUDA KV cache."""


def _record_sessions(monkeypatch, stop_after: int | None = None) -> list[dict]:
    """Replace the create_session that loads every bundle component with one that records what each component
    was given, then loads it with the real create_session (on the CPU only, as that is all this machine has)."""
    from focalrt.runtime.backends import sessions
    from focalrt.runtime.backends.sessions import create_session

    calls: list[dict] = []

    def recording(path, providers=None, threads=None, trt_options=None, **options):
        calls.append({"file": Path(path).name, "providers": providers, "trt_options": trt_options})
        if stop_after is not None and len(calls) == stop_after:
            raise _StopLoading
        return create_session(path, [p for p in providers if p == "CPUExecutionProvider"], threads, trt_options,
                              **options)

    monkeypatch.setattr(sessions, "create_session", recording)
    return calls


def test_pipeline_on_cpu_passes_no_tensorrt_options(tiny_bundle, tmp_path, monkeypatch):
    from focalrt.runtime.pipeline import Pipeline

    bundle = _with_precisions(tiny_bundle, tmp_path, {})
    calls = _record_sessions(monkeypatch)
    Pipeline.from_bundle(bundle, provider="cpu")
    assert [c["file"] for c in calls] == ["vision.onnx", "decoder.onnx"]
    assert all(c["trt_options"] is None and c["providers"] == ["CPUExecutionProvider"] for c in calls)
    assert not (bundle / "engines").exists()


def test_pipeline_under_tensorrt_gives_each_component_its_profile(tiny_bundle, tmp_path, monkeypatch):
    from focalrt.runtime import pipeline

    bundle = _with_precisions(tiny_bundle, tmp_path, {"decoder": "fp16"})
    monkeypatch.setattr(pipeline, "resolve_providers", lambda provider=None: list(GPU_PROVIDERS))
    calls = _record_sessions(monkeypatch, stop_after=2)
    with pytest.raises(_StopLoading):
        pipeline.Pipeline.from_bundle(bundle, max_context=256)  # max_batch left at its default, 8
    by_file = {c["file"]: c["trt_options"] for c in calls}
    assert set(by_file) == {"vision.onnx", "decoder.onnx"}
    engines = str(bundle / "engines")
    assert all(o["trt_engine_cache_path"] == engines == o["trt_timing_cache_path"] for o in by_file.values())
    assert "trt_profile_max_shapes" not in by_file["vision.onnx"]
    dec = _spec(by_file["decoder.onnx"]["trt_profile_max_shapes"])
    assert dec["input_ids"] == [8, 256] and dec["past_key_values.0.key"] == [8, 2, 256, 16]
    assert by_file["decoder.onnx"].get("trt_fp16_enable") is True

def _int8_vision_bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A copy of the bundle whose vision encoder is int8, written by the calibrate command's own steps
    (transform, then manifest) on random pixels; the decoder stays fp32. No gate: only files matter."""
    import shutil

    from focalrt.bundle import load
    from focalrt.calibration import make_bundle
    from focalrt.calibration.record import Recording

    bundle = tmp_path / "int8-vision"
    shutil.copytree(tiny_bundle, bundle, ignore=shutil.ignore_patterns("engines"))
    source = load(tiny_bundle)
    shape = source.component("vision")["inputs"][0]["shape"]
    rng = np.random.default_rng(0)
    recording = Recording(vision=[{"pixel_values": rng.standard_normal(shape).astype(np.float32)} for _ in range(2)])
    opts = make_bundle.Options(precision="int8", progress=False)
    (bundle / "calibration").mkdir()
    plan = {"vision": "int8"}
    infos = {"vision": make_bundle.transform_component(source, bundle, "vision", "int8", recording, "minmax", [], opts)}
    make_bundle.write_converted_manifest(source, bundle, plan, infos, None)
    return bundle


def test_tensorrt_provider_loads_the_signed_int8_graph(tiny_bundle, tmp_path, monkeypatch):
    from focalrt.bundle import load
    from focalrt.runtime import pipeline

    bundle = _int8_vision_bundle(tiny_bundle, tmp_path)
    comps = load(bundle, verify_hashes=True).manifest["components"]
    assert comps["vision"]["tensorrt_file"]["file"] == "vision.tensorrt.onnx"
    assert "tensorrt_file" not in comps["decoder"]

    calls = _record_sessions(monkeypatch)
    pipeline.Pipeline.from_bundle(bundle, provider="cpu")  # CPU keeps the uint8 graph ORT fuses
    assert [c["file"] for c in calls] == ["vision.onnx", "decoder.onnx"]

    monkeypatch.setattr(pipeline, "resolve_providers", lambda provider=None: list(GPU_PROVIDERS))
    calls = _record_sessions(monkeypatch, stop_after=2)
    with pytest.raises(_StopLoading):
        pipeline.Pipeline.from_bundle(bundle)
    assert [c["file"] for c in calls] == ["vision.tensorrt.onnx", "decoder.onnx"]
    assert calls[0]["trt_options"]["trt_int8_enable"] is True
    assert calls[0]["providers"] == GPU_PROVIDERS

    monkeypatch.setattr(pipeline, "resolve_providers", lambda provider=None: GPU_PROVIDERS[1:])  # CUDA, no TensorRT
    calls = _record_sessions(monkeypatch, stop_after=2)
    with pytest.raises(_StopLoading):
        pipeline.Pipeline.from_bundle(bundle)
    assert [c["file"] for c in calls] == ["vision.onnx", "decoder.onnx"]


def test_engine_build_parses_the_bundled_signed_graph(tiny_bundle, tmp_path):
    """build-engines reads the bundle's tensorrt_file and leaves it in place; an int8 bundle made before
    that file existed gets a temporary signed copy, removed after the build."""
    from focalrt.bundle import load, write_manifest
    from focalrt.runtime.backends.tensorrt_engines import build_engines

    bundle = _int8_vision_bundle(tiny_bundle, tmp_path)
    seen = []

    def build(path, profiles, precision, fp16_kernels, timing_cache) -> bytes:
        zps = [i for i in onnx.load(str(path)).graph.initializer if i.name.endswith("zero_point")]
        seen.append({"file": path.name, "precision": precision,
                     "uint8": sum(z.data_type == onnx.TensorProto.UINT8 for z in zps),
                     "int8": sum(z.data_type == onnx.TensorProto.INT8 for z in zps)})
        return b"engine"

    build_engines(bundle, components=["vision"], gpu=ADA, tensorrt_version="10.3.0", build_fn=build)
    assert seen[-1]["file"] == "vision.tensorrt.onnx" and seen[-1]["precision"] == "int8"
    assert seen[-1]["uint8"] == 0 and seen[-1]["int8"] > 0
    load(bundle, verify_hashes=True)  # the bundled copy is still there, unchanged

    manifest = load(bundle).manifest
    del manifest["components"]["vision"]["tensorrt_file"]
    write_manifest(bundle, manifest)
    (bundle / "vision.tensorrt.onnx").unlink()
    before = sorted(p.name for p in bundle.iterdir())
    build_engines(bundle, components=["vision"], gpu=ADA, tensorrt_version="10.3.0", build_fn=build, force=True)
    assert seen[-1]["file"] == ".vision.tensorrt-int8.onnx"
    assert seen[-1]["uint8"] == 0 and seen[-1]["int8"] == seen[0]["int8"]
    assert sorted(p.name for p in bundle.iterdir()) == before  # the temporary copy is gone


def test_int8_activations_reencode_for_tensorrt_without_changing_values(tiny_bundle, tmp_path):
    import onnxruntime as ort

    from focalrt.calibration.quantize import quantize_qdq
    from focalrt.runtime.backends.tensorrt_engines import signed_activations

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

    from focalrt.runtime.backends.tensorrt_engines import TensorRTUnavailable, build_engines

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if it were not installed
    with pytest.raises(TensorRTUnavailable, match="pip install tensorrt"):
        build_engines(tiny_bundle)


def test_real_engine_build_on_a_gpu(tiny_bundle, tmp_path):
    pytest.importorskip("tensorrt", reason="tensorrt is not installed (no GPU build here)")
    from focalrt.runtime.backends.device import gpus

    if not gpus():
        pytest.skip("no NVIDIA GPU")
    import shutil

    from focalrt.runtime.backends.tensorrt_engines import build_engines

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    results = build_engines(bundle, components=["vision"])
    assert all(r["status"] == "built" for r in results)
    assert all(Path(r["engine"]).stat().st_size > 0 for r in results)


def test_int8_weight_only_decoder_is_left_to_the_tensorrt_provider(tiny_bundle, tmp_path):
    """`convert --precision int8` writes MatMulNBits (a contrib op): no engine is built for that component,
    and the result says why, instead of refusing the bundle's precision as unknown."""
    import shutil

    from focalrt.bundle import file_record, load, write_manifest
    from focalrt.calibration.quantize import quantize_int8_weights
    from focalrt.runtime.backends.tensorrt_engines import build_engines

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    for f in bundle.glob("decoder.onnx*"):
        f.unlink()
    quantize_int8_weights(tiny_bundle / "decoder.onnx", bundle / "decoder.onnx")
    manifest = {k: v for k, v in load(tiny_bundle).manifest.items() if k not in ("format", "format_version")}
    old = {k: v for k, v in manifest["components"]["decoder"].items()
           if k not in ("file", "bytes", "sha256", "external_data")}
    manifest["components"]["decoder"] = {**file_record(bundle, "decoder.onnx"), **old, "precision": "int8-weights"}
    (bundle / "manifest.json").unlink()
    write_manifest(bundle, manifest)
    fake = FakeBuilder()
    results = build_engines(bundle, components=["decoder"], gpu=ADA, tensorrt_version="10.3.0", build_fn=fake)
    assert fake.calls == []
    assert results[0]["status"].startswith("served by ONNX Runtime") and "MatMulNBits" in results[0]["reason"]
