"""Bad input gets a clear error that names the culprit, and nothing half-written is left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from focalrt.bundle import BundleError, load
from focalrt.runtime.pipeline import Pipeline


def _copy(bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def test_runtime_imports_without_torch_or_transformers():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import focalrt.runtime.pipeline, focalrt.runtime.generation.generate, focalrt.runtime.models.adapters\n"
        "import focalrt.runtime.stream.sources, focalrt.runtime.stream.sinks, focalrt.runtime.faces.tracking\n"
        "import focalrt.bundle, focalrt.cli\n"
        "import pkgutil, importlib, focalrt.runtime as r\n"
        "for m in pkgutil.walk_packages(r.__path__, 'focalrt.runtime.'):\n"
        "    importlib.import_module(m.name)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_missing_bundle_file_is_named(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    (b / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match="decoder.onnx is missing"):
        load(b)


def test_truncated_bundle_file_is_named(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    data = (b / "vision.onnx").read_bytes()
    (b / "vision.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="vision.onnx has .* bytes"):
        load(b)


def test_corrupt_onnx_with_right_size_names_file(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    size = (b / "decoder.onnx").stat().st_size
    (b / "decoder.onnx").write_bytes(b"\0" * size)
    with pytest.raises(BundleError, match="sha256"):
        load(b, verify_hashes=True)
    with pytest.raises(RuntimeError, match="decoder.onnx"):
        Pipeline.from_bundle(b)


def test_other_format_version_says_which_is_expected(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["format_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format_version 99, this focalrt expects 1"):
        load(b)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load(tmp_path / "nope")
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load(tmp_path)


def test_unreadable_image_and_bad_arrays(pipe, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="x.png could not be decoded"):
        pipe.describe(bad)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        pipe.describe(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="dtype float32"):
        pipe.describe(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"shape \(64, 64\)"):
        pipe.describe(np.zeros((64, 64), np.uint8))
    with pytest.raises(TypeError, match="numpy array"):
        pipe.describe([[1, 2, 3]])


def test_box_outside_is_clipped_with_warning(pipe, astronaut_bgr):
    with pytest.warns(UserWarning, match="clipped to"):
        d = pipe.describe(astronaut_bgr, box=(400, 400, 700, 600), max_new_tokens=1)
    assert d.box == (400, 400, 512, 512)


def test_zero_area_box_is_an_error(pipe, astronaut_bgr):
    with pytest.raises(ValueError, match="empty or inverted"):
        pipe.describe(astronaut_bgr, box=(10, 10, 10, 50))
    with pytest.raises(ValueError, match="outside the image"):
        pipe.describe(astronaut_bgr, box=(600, 600, 700, 700))


def test_prompt_longer_than_context_is_refused_before_running(tiny_bundle, astronaut_bgr):
    small = Pipeline.from_bundle(tiny_bundle, max_context=200)
    calls = []
    small.vision.run_with_iobinding = lambda *a, **k: calls.append(1)  # must not be reached
    with pytest.raises(ValueError, match="does not fit|context holds 200"):
        small.describe(astronaut_bgr, prompt="word " * 100)
    assert calls == []


def test_generation_stops_with_length_at_context_end(tiny_bundle, astronaut_bgr):
    big = Pipeline.from_bundle(tiny_bundle)
    prompt_len = len(big.describe(astronaut_bgr, max_new_tokens=1).prompt_token_ids)
    room = 5
    p = Pipeline.from_bundle(tiny_bundle, max_context=prompt_len + room)
    d = p.describe(astronaut_bgr, max_new_tokens=50)
    assert d.finish_reason == "length"
    # The prompt and every generated token but the last are in the cache, which is full.
    assert len(d.token_ids) == room + 1
    assert int(p.cache.lengths[0]) == prompt_len + room
    # The same tokens as an unconstrained run: the context end cuts, it does not corrupt.
    ref = big.describe(astronaut_bgr, max_new_tokens=room + 1)
    assert ref.token_ids == d.token_ids


def test_max_new_tokens_must_be_positive(pipe, astronaut_bgr):
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipe.describe(astronaut_bgr, max_new_tokens=0)


def test_streaming_deltas_join_to_text(pipe, astronaut_bgr):
    parts: list[str] = []
    d = pipe.describe(astronaut_bgr, box=(170, 80, 280, 200), max_new_tokens=16, on_text=parts.append)
    assert "".join(parts) == d.text and len(parts) > 1


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(pipe, astronaut_bgr):
    a = pipe.describe(astronaut_bgr, max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    b = pipe.describe(astronaut_bgr, max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    g = pipe.describe(astronaut_bgr, max_new_tokens=12)
    assert a.token_ids == b.token_ids
    assert a.token_ids != g.token_ids


def test_cli_describe_json(tiny_bundle, tmp_path, astronaut_bgr):
    import cv2

    img = tmp_path / "face.png"
    cv2.imwrite(str(img), astronaut_bgr)
    out = subprocess.run([sys.executable, "-m", "focalrt.cli", "describe", str(tiny_bundle), "--image", str(img),
                          "--box", "170,80,280,200", "--max-new-tokens", "6", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert {"text", "token_ids", "prompt_token_ids", "finish_reason", "timings_ms"} <= set(d)
    assert len(d["token_ids"]) == 6 and d["finish_reason"] == "length"
    assert d["prompt_token_ids"].count(151655) == 144
    bad = subprocess.run([sys.executable, "-m", "focalrt.cli", "describe", str(tiny_bundle), "--image", str(img),
                          "--box", "1,2,3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "x1,y1,x2,y2" in bad.stderr


@pytest.mark.slow  # exports or loads a model
def test_interrupted_export_leaves_no_half_bundle(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from focalrt.export import qwen2_5_vl
    from focalrt.export.build import export_bundle

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(qwen2_5_vl, "export_decoder", boom)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(tmp_path / "b", preset="tiny-random", face_models=False)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_overwrite_and_keeps_old_bundle(tiny_bundle):
    pytest.importorskip("torch")
    from focalrt.export.build import export_bundle

    before = (tiny_bundle / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_bundle(tiny_bundle, preset="tiny-random")
    assert (tiny_bundle / "manifest.json").read_bytes() == before


def test_bad_image_size_is_explained(tmp_path):
    pytest.importorskip("torch")
    from focalrt.export.build import export_bundle

    with pytest.raises(ValueError, match="multiple of 28"):
        export_bundle(tmp_path / "b", preset="tiny-random", image_size=300, face_models=False)
    assert not (tmp_path / "b").exists()


def test_warning_free_happy_path(pipe, astronaut_bgr):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.describe(astronaut_bgr, box=(170, 80, 280, 200), max_new_tokens=2)
