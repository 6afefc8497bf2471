"""Shared export plumbing: torch.onnx.export with declared IO, single-file external data, IO records,
and the comparison against the PyTorch reference that every component must pass."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

OPSET = 18
# Keep the IR version that onnxruntime releases from the last year accept.
IR_VERSION = 10
EXTERNAL_DATA_THRESHOLD = 64 << 20

_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
           onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
           onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.UINT8: "uint8",
           onnx.TensorProto.INT8: "int8", onnx.TensorProto.BOOL: "bool"}


class ExportValidationError(RuntimeError):
    """An exported component disagrees with its PyTorch reference beyond tolerance."""


def export_module(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str],
                  output_names: list[str], dynamic_axes: dict[str, dict[int, str]]) -> None:
    """Trace `module` to `path` and re-save it with one external-data file when large."""
    scratch = path.parent / f".{path.stem}-trace"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    raw = scratch / path.name  # torch may spill one file per tensor here for >2 GB models
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Tracing warns about every Python int it freezes; the fixed vision grid relies on that.
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(raw), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False,
                              do_constant_folding=True)
        model = onnx.load(str(raw), load_external_data=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    model.ir_version = IR_VERSION
    save_model(model, path)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save with weights in `<name>.data` beside the graph when the model is large."""
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if model.ByteSize() > EXTERNAL_DATA_THRESHOLD or _has_external(model):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _has_external(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def describe_io(path: Path) -> dict[str, Any]:
    """Names, dtypes and shapes (symbolic dims as strings) of a model's inputs and outputs."""
    model = onnx.load(str(path), load_external_data=False)

    def one(v):
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape}

    return {"inputs": [one(v) for v in model.graph.input], "outputs": [one(v) for v in model.graph.output]}


def compare(name: str, ours: np.ndarray, ref: np.ndarray, atol: float, rtol: float = 1e-3) -> float:
    """Max abs difference; raises ExportValidationError past `atol + rtol*|ref|`."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        raise ExportValidationError(f"{name}: ONNX output shape {ours.shape} != PyTorch {ref.shape}")
    diff = np.abs(ours - ref)
    bound = atol + rtol * np.abs(ref)
    if not np.all(diff <= bound):
        worst = float(diff.max())
        raise ExportValidationError(f"{name}: ONNX differs from PyTorch by up to {worst:.3g} "
                                    f"(tolerance {atol:g} + {rtol:g}*|ref|); the export is wrong")
    return float(diff.max())


def cpu_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
