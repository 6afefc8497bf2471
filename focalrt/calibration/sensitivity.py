"""How much error each quantized node adds, measured on recorded inputs: the ranking the fallback uses.

For a MatMul or Gemm, the error is its output's relative squared error when its real fp32 input (taken from
the fp32 model on recorded feeds) passes through the quantized model's own activation quantizer and meets
the dequantized weights: ||Q(x) Q(W) - x W||^2 / ||x W||^2. That is the error this node alone adds, so
nodes can be compared without re-quantizing the model once per node. For other quantized ops (the vision
encoder's patch Conv) the input and weight noise-to-signal ratios are summed instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from focalrt.calibration.quantize import QUANT_OPS


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int,
               block_size: int) -> np.ndarray:
    """DequantizeLinear in numpy: per tensor, per axis or blocked along `axis`."""
    x = q.astype(np.float32)
    zp = np.zeros_like(scale, np.float32) if zero_point is None else zero_point.astype(np.float32)
    scale = scale.astype(np.float32)
    if scale.ndim == 0 or scale.size == 1:
        return (x - zp.reshape(())) * scale.reshape(())
    axis = axis % x.ndim
    if block_size:
        scale = np.repeat(scale, block_size, axis=axis).take(range(x.shape[axis]), axis=axis)
        zp = np.repeat(zp, block_size, axis=axis).take(range(x.shape[axis]), axis=axis)
        return (x - zp) * scale
    shape = [1] * x.ndim
    shape[axis] = -1
    return (x - zp.reshape(shape)) * scale.reshape(shape)


def fake_quantize(x: np.ndarray, scale: float, zero_point: np.ndarray) -> np.ndarray:
    """QuantizeLinear then DequantizeLinear, for int8, uint8 and float8 e4m3 zero points."""
    if zero_point.dtype in (np.uint8, np.int8):
        info = np.iinfo(zero_point.dtype)
        q = np.clip(np.rint(x / scale) + float(zero_point), info.min, info.max)
        return ((q - float(zero_point)) * scale).astype(np.float32)
    import ml_dtypes

    fp8 = np.clip(x / scale, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)
    return (fp8.astype(np.float32) * scale).astype(np.float32)


def _quantized_parts(qdq: onnx.ModelProto) -> dict[str, dict]:
    """Per quantized node of the QDQ model, keyed by its output tensor (quantizers may rename nodes, never
    the tensors downstream nodes read): its activation quantizer and dequantized weight."""
    inits = {i.name: i for i in qdq.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}

    def array(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    parts: dict[str, dict] = {}
    for node in qdq.graph.node:
        if node.op_type not in QUANT_OPS or len(node.input) < 2:
            continue
        w_dq = producer.get(node.input[1])
        if w_dq is None or w_dq.op_type != "DequantizeLinear" or w_dq.input[0] not in inits:
            continue
        weight = dequantize(array(w_dq.input[0]), array(w_dq.input[1]),
                            array(w_dq.input[2]) if len(w_dq.input) > 2 and w_dq.input[2] else None,
                            _attr(w_dq, "axis", 1), _attr(w_dq, "block_size", 0))
        act = None
        a_dq = producer.get(node.input[0])
        if a_dq is not None and a_dq.op_type == "DequantizeLinear" and a_dq.input[1] in inits:
            zp = array(a_dq.input[2]) if len(a_dq.input) > 2 and a_dq.input[2] else np.zeros((), np.int8)
            act = (float(array(a_dq.input[1]).reshape(())), zp.reshape(()))
        parts[node.output[0]] = {"weight": weight, "act": act}
    return parts


def _float_inputs(fp32_path: Path, nodes: list[str], feeds: list[dict[str, np.ndarray]]) -> list[dict]:
    """Each node's first input in the fp32 model, per feed (an extra graph output per tensor)."""
    import onnxruntime as ort

    graph = onnx.load(str(fp32_path), load_external_data=False)
    by_name = {n.name: n for n in graph.graph.node}
    tensors = sorted({by_name[n].input[0] for n in nodes})
    existing = {o.name for o in graph.graph.output}
    graph.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors if t not in existing)
    scratch = Path(tempfile.mkdtemp(prefix="focalrt-sensitivity-"))
    try:
        data = fp32_path.with_name(fp32_path.name + ".data")
        if data.exists():  # the weights beside the augmented graph: a hard link (ONNX Runtime refuses
            try:               # external data reached through a symlink out of the model's folder)
                os.link(data, scratch / data.name)
            except OSError:
                shutil.copy2(data, scratch / data.name)
        path = scratch / fp32_path.name
        onnx.save_model(graph, str(path))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        return [dict(zip(tensors, sess.run(tensors, {k: f[k] for k in names}), strict=True)) for f in feeds]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def node_errors(fp32_path: Path, qdq_path: Path, feeds: list[dict[str, np.ndarray]],
                max_feeds: int = 6) -> dict[str, float]:
    """Relative output error each quantized node adds, summed over a few recorded feeds; worst first."""
    if not feeds:
        raise ValueError("sensitivity needs recorded feeds; none were given")
    chosen = [feeds[i] for i in np.linspace(0, len(feeds) - 1, min(max_feeds, len(feeds))).astype(int)]
    qdq = onnx.load(str(qdq_path))
    parts = _quantized_parts(qdq)
    del qdq
    fp32 = onnx.load(str(fp32_path))
    weights = {i.name: i for i in fp32.graph.initializer}
    nodes = {n.name: n for n in fp32.graph.node if n.output and n.output[0] in parts}
    if not nodes:
        raise RuntimeError(f"{qdq_path.name} has no quantized node that matches {fp32_path.name}")
    inputs = _float_inputs(fp32_path, list(nodes), chosen)
    errors: dict[str, float] = {}
    for name, node in nodes.items():
        part = parts[node.output[0]]
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        wq = part["weight"]
        total = 0.0
        for values in inputs:
            x = values[node.input[0]].astype(np.float32)
            xq = fake_quantize(x, *part["act"]) if part["act"] is not None else x
            if node.op_type == "MatMul":
                y, yq = x @ w, xq @ wq
            elif node.op_type == "Gemm":
                trans_b = _attr(node, "transB", 0)
                y = x @ (w.T if trans_b else w)
                yq = xq @ (wq.T if trans_b else wq)
            else:
                total += _noise(x, xq) + _noise(w, wq)
                continue
            total += float(np.sum((yq - y) ** 2) / max(float(np.sum(y ** 2)), 1e-30))
        errors[name] = total / len(inputs)
    return dict(sorted(errors.items(), key=lambda kv: -kv[1]))


def _noise(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.sum((got - ref) ** 2) / max(float(np.sum(ref ** 2)), 1e-30))
