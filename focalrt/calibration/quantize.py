"""Model transforms per precision: INT8 and FP8 QDQ from recorded feeds, INT4 weight-only, FP16.

Choices, and why:
- INT8: weights symmetric int8 per output channel; activations symmetric per tensor. Only MatMul, Gemm
  and Conv with constant weights are quantized, and their outputs are not: norms, softmax, rotary
  embedding, residual adds and attention (GroupQueryAttention, and the vision encoder's
  activation-by-activation matmuls) stay float. Symmetric activations are stored as uint8 with zero
  point 128, which is exactly int8 with zero point 0 shifted by 128: ONNX Runtime's CPU kernels fuse
  that encoding into integer matmuls (its int8 activations behind a shared DequantizeLinear are not
  fused and run as float matmuls over weights dequantized on every call). TensorRT wants int8 with
  zero point 0; `focalrt.runtime.backends.tensorrt_engines.signed_activations` re-encodes without changing one value.
- FP8 (E4M3): weights and activations per tensor, for TensorRT on Ada/Hopper. ONNX Runtime only offers
  its "distribution" calibration for float8.
- INT4: weight-only, symmetric, blocks of 128 along the input dimension (the group size AWQ/GPTQ and
  TensorRT-LLM use; 32 is finer and slower on the CPU), written as QDQ (DequantizeLinear with block_size
  + MatMul, opset 21). ONNX Runtime fuses that into MatMulNBits on the CPU and TensorRT 10 reads it as
  INT4 weight-only quantization: one file for both.
- FP16: everything but norms, rotary embedding, softmax and GroupQueryAttention; graph inputs and
  outputs stay fp32, so the runtime's fp32 KV cache stays bound in place.
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from focalrt.calibration.int4_blocks import INT4_BLOCK_SIZE, INT4_BLOCK_SIZES

log = logging.getLogger(__name__)

IR_VERSION = 10  # onnxruntime releases of the last year reject the IR that onnx 1.23 writes by default
EXTERNAL_DATA_THRESHOLD = 64 << 20
QUANT_OPS = ("MatMul", "Gemm", "Conv")
METHODS = ("minmax", "entropy", "percentile")
# Parts kept in fp32 by the fp16 conversion: matched against node names (norms, rotary) and op types.
FP16_KEEP_NAME_PARTS = ("norm", "rotary", "ln_q")
FP16_KEEP_OPS = ("GroupQueryAttention", "Softmax", "SkipSimplifiedLayerNormalization", "MRotaryEmbedding",
                 "RotaryEmbedding")


def _tqdm(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled)


class FeedReader:
    """ONNX Runtime calibration reader over recorded feeds, one sample per call of `collect_data`.

    quantize_static calls `set_range` per stride (stride 1 here): histogram calibrators need equally
    shaped tensors within one collection, and prefill and decode feeds differ in sequence length.
    """

    def __init__(self, feeds: list[dict[str, np.ndarray]], input_names: list[str], desc: str,
                 progress: bool = True):
        missing = [n for n in input_names if n not in feeds[0]] if feeds else input_names
        if missing:
            raise ValueError(f"recorded feeds lack model inputs {missing}; the recording does not match "
                             f"this model")
        self.feeds = [{n: f[n] for n in input_names} for f in feeds]
        self.bar = _tqdm(len(feeds), desc, progress)
        self.set_range(0, len(self.feeds))

    def __len__(self) -> int:
        return len(self.feeds)

    def __iter__(self):
        """onnxruntime's GPTQ path iterates a (deep-copied) reader instead of calling `get_next`."""
        return iter(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._items = iter(self.feeds[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._items, None)
        if item is not None:
            self.bar.update(1)
        return item

    def rewind(self) -> None:
        self.set_range(0, len(self.feeds))

    def close(self) -> None:
        self.bar.close()


@contextmanager
def quiet_onnxruntime_quantization():
    """ONNX Runtime's quantizer prints histogram progress and logs advice on the root logger (e.g. to
    pre-process the model, or that a Gemm bias is not constant); our own progress bar replaces it."""
    root = logging.getLogger()
    nbits = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    levels = root.level, nbits.level
    root.setLevel(logging.ERROR)
    nbits.setLevel(logging.ERROR)
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(levels[0])
        nbits.setLevel(levels[1])


def load_graph(path: Path) -> onnx.ModelProto:
    """The graph without weights (quick; enough for node names and IO)."""
    return onnx.load(str(path), load_external_data=False)


def input_names(path: Path) -> list[str]:
    model = load_graph(path)
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm/Conv nodes whose second input is a weight (an initializer), in graph order."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type in QUANT_OPS and len(n.input) > 1 and n.input[1] in inits]


def lm_head_nodes(model: onnx.ModelProto, vocab_size: int) -> list[str]:
    """The MatMul/Gemm whose weight has a dimension equal to the vocabulary: the LM head."""
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and vocab_size in dims.get(n.input[1], [])]


def is_large(path: Path) -> bool:
    data = path.with_name(path.name + ".data")
    return data.exists() or path.stat().st_size > EXTERNAL_DATA_THRESHOLD


def save_model(model: onnx.ModelProto, path: Path, large: bool) -> None:
    """Save with IR 10, in one file or with weights in `<name>.data` (the bundle's convention)."""
    model.ir_version = IR_VERSION
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if large or model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _fix_ir_version(path: Path) -> None:
    """Rewrite only the graph file's IR version; external weights stay where they are."""
    model = load_graph(path)
    if model.ir_version != IR_VERSION:
        model.ir_version = IR_VERSION
        onnx.save_model(model, str(path))


def quantize_qdq(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], precision: str,
                 method: str = "minmax", exclude: list[str] | None = None, ranges_cache: Path | None = None,
                 progress: bool = True, desc: str = "calibrating") -> dict[str, Any]:
    """INT8 or FP8 QDQ model of `src` at `dst`, calibrated on `feeds` (or on cached ranges)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if precision not in ("int8", "fp8"):
        raise ValueError(f"quantize_qdq makes int8 or fp8 models, not {precision!r}")
    if precision == "int8" and method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {list(METHODS)}")
    graph = load_graph(src)
    candidates = quantizable_nodes(graph)
    exclude = sorted(set(exclude or []) & set(candidates))
    extra: dict[str, Any] = {"WeightSymmetric": True, "ActivationSymmetric": True,
                             "OpTypesToExcludeOutputQuantization": list(QUANT_OPS), "CalibStridedMinMax": 1}
    if precision == "int8":
        kinds = dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
        calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    else:
        kinds = dict(activation_type=QuantType.QFLOAT8E4M3FN, weight_type=QuantType.QFLOAT8E4M3FN,
                     per_channel=False)
        calib = CalibrationMethod.Distribution
    large = is_large(src)
    dst.with_name(dst.name + ".data").unlink(missing_ok=True)
    reader = FeedReader(feeds, input_names(src), desc, progress) if feeds else None
    if reader is None and not (ranges_cache and ranges_cache.is_file()):
        raise ValueError(f"no calibration feeds for {src.name} and no cached ranges")
    try:
        with quiet_onnxruntime_quantization():
            quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QUANT_OPS), nodes_to_exclude=exclude,
                            nodes_to_quantize=[n for n in candidates if n not in exclude],
                            use_external_data_format=large, calibrate_method=calib, extra_options=extra,
                            calibration_cache_path=str(ranges_cache) if ranges_cache else None, **kinds)
    finally:
        if reader is not None:
            reader.close()
    _fix_ir_version(dst)
    quantized = [n for n in candidates if n not in exclude]
    return {"precision": precision, "method": method if precision == "int8" else "distribution",
            "quantized_nodes": len(quantized), "excluded_nodes": exclude,
            "weights": "int8 symmetric per output channel" if precision == "int8" else "fp8 e4m3 per tensor",
            "activations": ("int8 symmetric per tensor, stored as uint8 with zero point 128"
                            if precision == "int8" else "fp8 e4m3 per tensor")}


# MatMulNBits "accuracy_level" 4: the activations are quantized to int8 per block inside the kernel, so the
# multiply runs on integer dot products. It is what ONNX Runtime's own QDQ -> MatMulNBits fusion uses by
# default (session.qdq_matmulnbits_accuracy_level), so int4 RTN (QDQ) already runs that way. Without it the
# nodes written directly (int8 weights, HQQ, GPTQ, k-quant) take the float path, measured on SmolLM2-135M on
# the AMD EPYC here at 11x slower than fp32 for int8 weights, and 26x slower than int4 RTN for HQQ.
MATMUL_NBITS_ACCURACY_LEVEL = 4


def set_accuracy_level(model: onnx.ModelProto, level: int = MATMUL_NBITS_ACCURACY_LEVEL) -> int:
    """Set `accuracy_level` on every MatMulNBits node; returns how many there are."""
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    for node in nodes:
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])
    return len(nodes)


# onnxruntime's MatMulNBits quantizer algorithms: "rtn" (round to nearest, symmetric, QDQ: one file for ORT and
# TensorRT), "rtn_asym" (with a zero point per block, QDQ), "hqq" (half-quadratic: scales and zero points
# optimized per block, no data), "gptq" (second-order error correction from calibration feeds), "k_quant"
# (its k-quant search). The last three write MatMulNBits directly (ONNX Runtime only).
INT4_ALGORITHMS = ("rtn", "rtn_asym", "hqq", "gptq", "k_quant")


def quantize_int4(src: Path, dst: Path, exclude: list[str] | None = None,
                  block_size: int = INT4_BLOCK_SIZE, algorithm: str = "rtn",
                  feeds: list[dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """INT4 weight-only for every MatMul with constant weights, by one of onnxruntime's algorithms."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    if block_size not in INT4_BLOCK_SIZES:
        raise ValueError(f"int4 block size {block_size} is not one of {list(INT4_BLOCK_SIZES)}")
    if algorithm not in INT4_ALGORITHMS:
        raise ValueError(f"int4 algorithm {algorithm!r} is not one of {list(INT4_ALGORITHMS)}")
    model = onnx.load(str(src))
    candidates = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name in set(quantizable_nodes(model))]
    exclude = sorted(set(exclude or []) & set(candidates))
    algo = None
    if algorithm == "hqq":
        algo = nbits.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
    elif algorithm == "gptq":
        if not feeds:
            raise ValueError("int4 GPTQ needs calibration feeds (recorded decoder inputs)")
        algo = nbits.GPTQWeightOnlyQuantConfig(FeedReader(feeds, input_names(src), "GPTQ", False),
                                               block_size=block_size)
    elif algorithm == "k_quant":
        algo = nbits.KQuantWeightOnlyQuantConfig(customized_weight_config={})
    fmt = QuantFormat.QDQ if algorithm in ("rtn", "rtn_asym") else QuantFormat.QOperator
    quantizer = nbits.MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=algorithm == "rtn",
                                           nodes_to_exclude=exclude, quant_format=fmt, algo_config=algo)
    with quiet_onnxruntime_quantization():
        quantizer.process()
    out = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
    head = quantize_lm_head(out, 4, block_size, exclude)
    set_accuracy_level(out)
    save_model(out, dst, is_large(src))
    done = sum(1 for n in out.graph.node if n.op_type == "MatMulNBits" or (
        n.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in n.attribute)))
    kind = {"rtn": "symmetric round-to-nearest (QDQ)", "rtn_asym": "asymmetric round-to-nearest (QDQ)",
            "hqq": "HQQ (MatMulNBits)", "gptq": "GPTQ (MatMulNBits)", "k_quant": "k-quant (MatMulNBits)"}
    return {"precision": "int4", "quantized_nodes": done, "excluded_nodes": exclude, "algorithm": algorithm,
            "weights": f"int4 {kind[algorithm]}, blocks of {block_size} along the input dimension",
            "activations": "float32", **({"lm_head": head} if head else {})}


# INT8 weight-only: symmetric round-to-nearest per block of 32 input weights, written as MatMulNBits (bits=8,
# ONNX Runtime only). On a trained LLM the calibrated QDQ path (int8 activations, one static scale per tensor)
# loses to the activation outliers of the residual stream (SmolLM2-135M: +129% perplexity), while int8 weights
# with activations quantized per block of 32 at run time stay close to fp32 (docs/precision-and-tensorrt.md).
INT8_WEIGHT_BLOCK_SIZE = 32


def quantize_int8_weights(src: Path, dst: Path, exclude: list[str] | None = None,
                          block_size: int = INT8_WEIGHT_BLOCK_SIZE) -> dict[str, Any]:
    """INT8 weight-only (float activations) for every MatMul with constant weights."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    model = onnx.load(str(src))
    candidates = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name in set(quantizable_nodes(model))]
    exclude = sorted(set(exclude or []) & set(candidates))
    algo = nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=8)
    quantizer = nbits.MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=True,
                                           nodes_to_exclude=exclude, algo_config=algo)
    with quiet_onnxruntime_quantization():
        quantizer.process()
    out = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
    head = quantize_lm_head(out, 8, block_size, exclude)
    set_accuracy_level(out)
    save_model(out, dst, is_large(src))
    done = sum(1 for n in out.graph.node if n.op_type == "MatMulNBits")
    return {"precision": "int8", "quantized_nodes": done, "excluded_nodes": exclude, "algorithm": "rtn",
            "weights": f"int8 weight-only symmetric round-to-nearest (MatMulNBits), blocks of {block_size} along "
                       "the input dimension",
            "activations": f"float32, quantized to int8 per block inside the matmul (accuracy_level "
                           f"{MATMUL_NBITS_ACCURACY_LEVEL})", **({"lm_head": head} if head else {})}


def lm_head_gemm(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The decoder's LM head as exported (`export/gqa.py::LMHead`): a Gemm(transB=1) over a [V, H] initializer."""
    inits = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        if node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] in inits and trans_b == 1:
            return node
    return None


def quantize_lm_head(model: onnx.ModelProto, bits: int, block_size: int,
                     exclude: list[str] | None = None) -> dict[str, Any] | None:
    """The LM head Gemm -> MatMulNBits (symmetric round-to-nearest, `bits` 4 or 8, blocks along H); a token
    Gather reading the same table (tied embeddings) -> GatherBlockQuantized over that quantized table.

    Why: onnxruntime's quantizers take MatMul (and Gather only at 4 bits, with a table of its own), so the
    head would stay float, and a tied table would be stored twice. This is what onnxruntime-genai's builder
    writes for tied embeddings: the quantized head's weight, reshaped to [V, H * bits / 8], is the
    embedding table, read block by block with the head's scales. Returns None (nothing changed) when the
    graph has no such head or it is excluded.
    """
    from onnx import helper, numpy_helper
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    head = lm_head_gemm(model)
    if head is None or head.name in set(exclude or []):
        return None
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    table_name = head.input[1]
    table = numpy_helper.to_array(inits[table_name]).astype(np.float32)
    vocab, hidden = table.shape
    # The largest block up to the one asked for that divides the hidden size, so no row is padded (a
    # padded row stores and reads the padding too); a hidden size no power of two divides keeps the block.
    block_size = next((b for b in (512, 256, 128, 64, 32, 16) if b <= block_size and hidden % b == 0), block_size)
    blocks = -(-hidden // block_size)
    blob = block_size * bits // 8
    packed = np.zeros((vocab, blocks, blob), np.uint8)
    scales = np.zeros(vocab * blocks, np.float32)
    zero_points = np.zeros(vocab * ((blocks + 1) // 2), np.uint8)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, np.ascontiguousarray(table.T), scales, zero_points, block_size, vocab, hidden, True)
    base = f"lm_head.q{bits}"
    graph.initializer.extend([numpy_helper.from_array(packed, f"{base}.weight"),
                              numpy_helper.from_array(scales.reshape(vocab, blocks), f"{base}.scales")])
    nodes = list(graph.node)
    at = nodes.index(head)
    out = head.output[0]
    matmul_out = out if len(head.input) < 3 else f"{out}.no_bias"
    new = [helper.make_node("MatMulNBits", [head.input[0], f"{base}.weight", f"{base}.scales"], [matmul_out],
                            name=f"{head.name}.MatMulNBits", domain="com.microsoft", K=hidden, N=vocab, bits=bits,
                            block_size=block_size, accuracy_level=MATMUL_NBITS_ACCURACY_LEVEL)]
    if len(head.input) >= 3:
        new.append(helper.make_node("Add", [matmul_out, head.input[2]], [out], name=f"{head.name}.bias"))
    nodes[at:at + 1] = new
    gathers = gathers_from_quantized_table(graph, nodes, table_name, f"{base}.weight", f"{base}.scales", bits,
                                           block_size, hidden)
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(table_name in n.input for n in nodes):
        graph.initializer.remove(inits[table_name])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"node": head.name, "bits": bits, "block_size": block_size,
            "tied_embedding": "GatherBlockQuantized over the head's weight (stored once)" if gathers else None}


def gathers_from_quantized_table(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], table: str, weight: str,
                                 scales: str, bits: int, block_size: int, hidden: int) -> int:
    """Replace, in `nodes`, every Gather of rows of the float `table` [V, H] by a GatherBlockQuantized over
    the quantized LM head that was made from it: `weight` [V, blocks, block * bits / 8] (MatMulNBits' B,
    zero point 2^(bits-1)) and `scales` [V, blocks]. Returns how many Gathers were replaced.

    Why: with tied embeddings the head's quantized weight is the table, so the float table need not be
    kept (onnxruntime-genai's builder does the same); the rows read back are the head's dequantized rows.
    """
    from onnx import helper, numpy_helper

    gathers = [n for n in nodes if n.op_type == "Gather" and n.input[0] == table]
    if not gathers:
        return 0
    packed = next(i for i in graph.initializer if i.name == weight)
    vocab, blocks = int(packed.dims[0]), int(packed.dims[1])
    rows = f"{weight}.rows"
    graph.initializer.append(numpy_helper.from_array(np.array([vocab, blocks * block_size * bits // 8], np.int64),
                                                     rows))
    nodes.insert(0, helper.make_node("Reshape", [weight, rows], [f"{weight}.table"], name=f"{weight}.table"))
    padded = blocks * block_size != hidden
    if padded:  # the last block of each row is padded: each gathered row is cut back to the hidden size
        graph.initializer.extend([numpy_helper.from_array(np.array([v], np.int64), f"{weight}.{k}")
                                  for k, v in (("from", 0), ("to", hidden), ("axis", -1))])
    for gather in gathers:
        i = nodes.index(gather)
        out = gather.output[0]
        gathered = f"{out}.padded" if padded else out
        repl = [helper.make_node("GatherBlockQuantized", [f"{weight}.table", gather.input[1], scales], [gathered],
                                 name=f"{gather.name}.GatherBlockQuantized", domain="com.microsoft", bits=bits,
                                 block_size=block_size, gather_axis=0, quantize_axis=1)]
        if padded:
            repl.append(helper.make_node("Slice", [gathered, f"{weight}.from", f"{weight}.to", f"{weight}.axis"],
                                         [out], name=f"{gather.name}.unpad"))
        nodes[i:i + 1] = repl
    return len(gathers)


def convert_fp16(src: Path, dst: Path, keep_fp32_nodes: list[str] | None = None) -> dict[str, Any]:
    """FP16 weights and compute with fp32 graph IO; norms, rotary, softmax and GQA stay fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    keep = [n.name for n in model.graph.node
            if any(part in n.name.lower() for part in FP16_KEEP_NAME_PARTS)] + list(keep_fp32_nodes or [])
    keep += _constants_only_read_by(model, set(keep), FP16_KEEP_OPS)
    out = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP16_KEEP_OPS),
                                   node_block_list=keep)
    _drop_duplicate_casts(out)
    _skip_fp16_round_trips(out, set(keep))
    _bind_kv_directly(out)
    save_model(out, dst, is_large(src))
    kept_ops = Counter(n.op_type for n in model.graph.node if n.name in set(keep) or n.op_type in FP16_KEEP_OPS)
    return {"precision": "fp16", "kept_fp32": {"node_name_parts": list(FP16_KEEP_NAME_PARTS),
                                               "op_types": list(FP16_KEEP_OPS), "nodes": len(keep),
                                               "by_op": dict(kept_ops)},
            "weights": "fp16", "activations": "fp16 (fp32 in the kept parts and at the graph IO)"}


def _constants_only_read_by(model: onnx.ModelProto, names: set[str], op_types: tuple[str, ...]) -> list[str]:
    """Constant nodes read only by fp32-kept nodes (the rotary cos/sin tables): left fp32, not rounded to fp16
    and cast back."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    return [n.name for n in model.graph.node if n.op_type == "Constant" and n.name and readers.get(n.output[0])
            and all(r.name in names or r.op_type in op_types for r in readers[n.output[0]])]


def _skip_fp16_round_trips(model: onnx.ModelProto, kept: set[str]) -> None:
    """Read fp32 tensors directly where the converter routes them Cast(fp16) -> Cast(fp32) between two kept
    nodes: the rotary tables, and the residual stream between fused norms, would otherwise lose precision
    (and cost two kernels) for nothing."""
    producer = {o: n for n in model.graph.node for o in n.output}

    def is_fp32(name: str) -> bool:
        node = producer.get(name)
        if node is None:
            return False
        if node.op_type == "Constant":
            return node.attribute[0].type == onnx.AttributeProto.TENSOR and \
                node.attribute[0].t.data_type == onnx.TensorProto.FLOAT
        return node.name in kept or node.op_type in FP16_KEEP_OPS

    def cast_to(node: onnx.NodeProto) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    rename: dict[str, str] = {}
    for node in model.graph.node:
        first = producer.get(node.input[0]) if node.input else None
        if (cast_to(node) == onnx.TensorProto.FLOAT and first is not None
                and cast_to(first) == onnx.TensorProto.FLOAT16 and is_fp32(first.input[0])):
            rename[node.output[0]] = first.input[0]
    outputs = {v.name for v in model.graph.output}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename and name not in outputs:
                node.input[i] = rename[name]
    _drop_dead_casts(model)


def _drop_duplicate_casts(model: onnx.ModelProto) -> None:
    """The float16 converter can insert the same Cast twice for a tensor read by two fp32-kept nodes
    (same input, same output name); ONNX rejects the duplicate definition, and the copies are identical."""
    seen: set[tuple[str, ...]] = set()
    keep = []
    for node in model.graph.node:
        key = tuple(node.output)
        if node.op_type == "Cast" and key in seen:
            continue
        seen.add(key)
        keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


def _bind_kv_directly(model: onnx.ModelProto) -> None:
    """Reconnect GroupQueryAttention's past/present to the graph's KV inputs and outputs.

    With fp32 graph IO the converter routes the KV cache through Cast(fp16) -> Cast(fp32) on both sides of
    the fp32-kept attention. That still computes the right thing, but present is then a copy written by a
    Cast, not the buffer GroupQueryAttention updates in place, and every step would copy the whole cache.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_inputs = {v.name for v in model.graph.input}
    graph_outputs = {v.name for v in model.graph.output}
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention" or len(node.input) < 5:
            continue
        for idx in (3, 4):
            name = node.input[idx]
            while name in producer and producer[name].op_type == "Cast":
                name = producer[name].input[0]
            if name in graph_inputs:
                node.input[idx] = name
        for idx in (1, 2):
            name = node.output[idx]
            while len(consumers.get(name, [])) == 1 and consumers[name][0].op_type == "Cast":
                name = consumers[name][0].output[0]
            if name in graph_outputs:
                node.output[idx] = name
    _drop_dead_casts(model)


def _drop_dead_casts(model: onnx.ModelProto) -> None:
    """Remove Casts that write a tensor a non-Cast node now writes, then Casts nobody reads (repeatedly)."""
    direct = {o for n in model.graph.node if n.op_type != "Cast" for o in n.output}
    keep = [n for n in model.graph.node if not (n.op_type == "Cast" and n.output[0] in direct)]
    outputs = {v.name for v in model.graph.output}
    while True:
        used = {i for n in keep for i in n.input} | outputs
        alive = [n for n in keep if n.op_type != "Cast" or n.output[0] in used]
        if len(alive) == len(keep):
            break
        keep = alive
    del model.graph.node[:]
    model.graph.node.extend(keep)


def convert_fp16_storage(src: Path, dst: Path) -> dict[str, Any]:
    """A lookup-only component (the token embedding) in fp16 with fp32 output: half the memory."""
    return {**convert_fp16(src, dst), "note": "lookup table stored in fp16, output cast to fp32"}


def model_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def check_io_unchanged(before: Path, after: Path) -> None:
    """The runtime binds by name and dtype: a transformed component must keep its graph IO."""
    def io(path: Path) -> list[tuple[str, int]]:
        g = load_graph(path).graph
        inits = {i.name for i in g.initializer}
        return [(v.name, v.type.tensor_type.elem_type) for v in [*g.input, *g.output] if v.name not in inits]

    if io(before) != io(after):
        raise RuntimeError(f"{after.name}: graph inputs/outputs changed from {io(before)} to {io(after)}; "
                           f"the runtime could not bind it")


def fp8_session_options():
    """CPU emulation of an FP8 QDQ model: run the graph literally. ORT's CPU optimizer would fuse the
    float8 QDQ pairs into integer kernels that do not take float8 and refuse to load the model."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = os.cpu_count() or 1
    return so
