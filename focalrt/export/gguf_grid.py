"""GGUF weights kept on their own grid: Q4_0 / Q4_1 as 4-bit and Q8_0 as 8-bit `com.microsoft::MatMulNBits`.

Why: a GGUF file is already quantized. Dequantizing it to fp32 and quantizing again (`focalrt convert
--precision int4`) stacks a second rounding on the first; on SmolLM2-135M (Q4_1) that costs +33% perplexity
at block 32. The blocks of these three types fit MatMulNBits as they are, so nothing is rounded twice:

    GGUF block (32 weights along K)          MatMulNBits (block_size 32, default zero point 2^(bits-1))
    Q8_0  w = d * q,  q int8                 bits 8:  code = q + 128,       scale = d
    Q4_0  w = d * (q - 8),  q in 0..15       bits 4:  code = q,             scale = d
    Q4_1  w = d * q + m,    q in 0..15       bits 4:  code = q,             scale = d,  plus offset m + 8d

Q4_1's minimum does not fit a zero point without float zero points, which ONNX Runtime's CPU kernel runs
about 24x slower. Instead w = d * (q - 8) + (m + 8d): the default-zero-point 4-bit product plus a per-block
offset term, y = MatMulNBits(x) + blocksums(x) @ O, where blocksums(x) [.., K/32] sums x over each block (a
MatMul with a 0/1 matrix, computed once per distinct input) and O [K/32, N] holds m + 8d. It is exact in
fp32 and adds two small kernels per weight.

The pass works on the exported fp32 decoder, which is the GGUF dequantized (transformers uses the `gguf`
package's `dequantize`, then only reorders rows: the q/k head permutation). Every MatMul weight column is
matched by value to a GGUF tensor row (a hash of its fp32 bytes), so it does not depend on tensor names or
on how the decoder graph arranges them: fused q/k/v or gate/up concatenations, permuted rows, a tied LM head.
A MatMul whose columns come from both 4-bit and 8-bit rows is written as 8-bit (a 4-bit code q is the 8-bit
code q + 120: exact). Weights of float tensors (F32, F16, BF16) stay fp32 MatMuls.

Block layouts, from the `gguf` package's quants module: Q8_0 = f16 d, 32 x int8; Q4_0 = f16 d, 16 bytes;
Q4_1 = f16 d, f16 m, 16 bytes, where weight j < 16 is the low nibble of byte j and weight j + 16 its high
nibble. MatMulNBits (ONNX Runtime's contrib op spec) packs B [N, K/32, 32 * bits / 8] low-first: weight
2i in the low nibble of byte i, 2i + 1 in the high one.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

BLOCK = 32  # weights per block along K in Q4_0, Q4_1 and Q8_0
KEPT_TYPES = ("Q4_0", "Q4_1", "Q8_0")
FLOAT_TYPES = ("F32", "F16", "BF16")  # not quantized: their MatMuls stay float
# Integer kernels (activations quantized to int8 per block inside the op), as the project's int8/int4 paths.
ACCURACY_LEVEL = 4


class UnsupportedGGUFType(ValueError):
    """The GGUF holds a quantized tensor type that has no exact MatMulNBits form."""


@dataclass
class GridTensor:
    """One GGUF tensor's rows on its grid: w[r, k] = scale[r, b] * (code[r, k] - zero) + offset[r, b], b = k // 32."""

    name: str
    kind: str  # Q4_0 | Q4_1 | Q8_0
    bits: int  # 4 or 8
    codes: np.ndarray  # uint8 [rows, K]: 0..15 (zero point 8) or 0..255 (zero point 128)
    scales: np.ndarray  # float32 [rows, K/32]
    offsets: np.ndarray | None  # float32 [rows, K/32] (Q4_1), else None
    dequantized: np.ndarray  # float32 [rows, K], the `gguf` package's own dequantization


def unsupported_types(reader) -> dict[str, list[str]]:
    """Quantized tensor types in the file without an exact MatMulNBits form: type -> tensor names."""
    bad: dict[str, list[str]] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in KEPT_TYPES and kind not in FLOAT_TYPES:
            bad.setdefault(kind, []).append(t.name)
    return bad


def check_types(path: str | Path) -> None:
    """Raise UnsupportedGGUFType (one line) when a tensor's type cannot be kept; reads only the header."""
    from gguf import GGUFReader

    bad = unsupported_types(GGUFReader(str(path)))
    if bad:
        kind, names = next(iter(bad.items()))
        more = f" and {sum(map(len, bad.values())) - 1} more" if sum(map(len, bad.values())) > 1 else ""
        raise UnsupportedGGUFType(
            f"--keep-quantization: {Path(path).name} has {kind} tensors ({names[0]}{more}); it keeps "
            f"{', '.join(KEPT_TYPES)} (and leaves {', '.join(FLOAT_TYPES)} in float); export without "
            f"--keep-quantization to dequantize them to fp32")


def grid_of(name: str, kind: str, raw: np.ndarray) -> GridTensor:
    """A GGUF tensor's raw blocks (uint8 [rows, K/32 * block bytes]) as codes, scales and offsets."""
    from gguf import GGMLQuantizationType, quants

    rows = raw.shape[0]
    dequantized = quants.dequantize(raw, GGMLQuantizationType[kind]).reshape(rows, -1).astype(np.float32, copy=False)
    k = dequantized.shape[1]
    nb = k // BLOCK
    head = {"Q8_0": 2, "Q4_0": 2, "Q4_1": 4}[kind]
    blocks = np.ascontiguousarray(raw).reshape(rows, nb, -1)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    payload = blocks[..., head:]
    if kind == "Q8_0":
        codes = (payload.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return GridTensor(name, kind, 8, codes.reshape(rows, k), d, None, dequantized)
    low, high = payload & np.uint8(0x0F), payload >> np.uint8(4)  # weight j: low nibble of byte j; j+16: high
    codes = np.concatenate([low, high], axis=-1).reshape(rows, k)
    offsets = None
    if kind == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        offsets = m + np.float32(8) * d
    return GridTensor(name, kind, 4, codes, d, offsets, dequantized)


def read_grid(path: str | Path) -> dict[str, GridTensor]:
    """Every Q4_0 / Q4_1 / Q8_0 tensor of a GGUF file on its grid (after `check_types`)."""
    from gguf import GGUFReader

    check_types(path)
    reader = GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in KEPT_TYPES and len(t.data.shape) == 2 and int(t.shape[0]) % BLOCK == 0:
            out[t.name] = grid_of(t.name, kind, np.asarray(t.data))
    return out


def _key(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row, np.float32).data, digest_size=16).digest()


def row_index(grid: dict[str, GridTensor]) -> dict[bytes, tuple[str, int]]:
    """fp32 bytes of each dequantized row -> (tensor, row). Rows with equal values are interchangeable."""
    index: dict[bytes, tuple[str, int]] = {}
    for name, g in grid.items():
        for r in range(g.dequantized.shape[0]):
            index.setdefault(_key(g.dequantized[r]), (name, r))
    return index


@dataclass
class Packed:
    """A MatMul weight [K, N] on the grid: MatMulNBits inputs, plus the Q4_1 offset matrix when any is nonzero."""

    bits: int
    b: np.ndarray  # uint8 [N, K/32, 32 * bits / 8]
    scales: np.ndarray  # float32 [N, K/32]
    offsets: np.ndarray | None  # float32 [K/32, N]
    sources: dict[str, int]  # GGUF type -> columns taken from it


def match_weight(weight: np.ndarray, grid: dict[str, GridTensor], index: dict[bytes, tuple[str, int]]
                 ) -> Packed | None:
    """The MatMul weight [K, N] rebuilt column by column from GGUF rows; None when no column is a GGUF row.

    Raises ValueError when only some columns are found: the graph mixes GGUF rows with something else,
    which this pass cannot represent exactly.
    """
    cols = np.ascontiguousarray(weight.T, np.float32)  # [N, K]: column n of the weight is output row n
    n_out, k = cols.shape
    if k % BLOCK:
        return None
    found = [index.get(_key(c)) for c in cols]
    hits = sum(f is not None for f in found)
    if hits == 0:
        return None
    if hits < n_out:
        raise ValueError(f"{n_out - hits} of {n_out} columns of a [{k}, {n_out}] weight are not rows of the GGUF file")
    bits = max(grid[name].bits for name, _ in found)
    codes = np.empty((n_out, k), np.uint8)
    scales = np.empty((n_out, k // BLOCK), np.float32)
    offsets = np.zeros((n_out, k // BLOCK), np.float32)
    sources: dict[str, int] = {}
    by_tensor: dict[str, tuple[list[int], list[int]]] = {}
    for n, (name, r) in enumerate(found):
        by_tensor.setdefault(name, ([], []))[0].append(n)
        by_tensor[name][1].append(r)
    for name, (outs, rows) in by_tensor.items():
        g = grid[name]
        c = g.codes[rows]
        codes[outs] = c if g.bits == bits else c + np.uint8(120)  # 4-bit (q - 8) == 8-bit (q + 120 - 128)
        scales[outs] = g.scales[rows]
        if g.offsets is not None:
            offsets[outs] = g.offsets[rows]
        sources[g.kind] = sources.get(g.kind, 0) + len(rows)
    blocks = codes.reshape(n_out, k // BLOCK, BLOCK)
    if bits == 4:
        pairs = blocks.reshape(n_out, k // BLOCK, BLOCK // 2, 2)
        blocks = pairs[..., 0] | (pairs[..., 1] << np.uint8(4))
    has_offsets = bool(np.any(offsets))
    return Packed(bits, np.ascontiguousarray(blocks), scales, offsets.T.copy() if has_offsets else None, sources)


def dequantize_packed(p: Packed) -> np.ndarray:
    """The weight [K, N] a Packed holds, by MatMulNBits' formula (for checks at export and in tests)."""
    n_out, nb, _ = p.b.shape
    if p.bits == 4:
        codes = np.stack([p.b & np.uint8(0x0F), p.b >> np.uint8(4)], axis=-1).reshape(n_out, nb, BLOCK)
    else:
        codes = p.b
    w = (codes.astype(np.float32) - np.float32(2 ** (p.bits - 1))) * p.scales[..., None]
    if p.offsets is not None:
        w = w + p.offsets.T[..., None]
    return w.reshape(n_out, nb * BLOCK).T


def is_weight_product(node) -> bool:
    """A MatMul, or the decoder's LM head: a plain Gemm(transB=1) over the [V, H] table (export/gqa.py::LMHead)."""
    if node.op_type == "MatMul":
        return True
    attrs = {a.name: (a.i if a.type == a.INT else a.f) for a in node.attribute}
    return (node.op_type == "Gemm" and attrs.get("transB", 0) == 1 and attrs.get("transA", 0) == 0
            and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0)


def keep_quantization(src: Path, dst: Path, grid: dict[str, GridTensor], accuracy_level: int = ACCURACY_LEVEL
                      ) -> dict[str, Any]:
    """Rewrite every MatMul of `src` whose weight is GGUF rows as MatMulNBits on the GGUF grid; save to `dst`.

    A weight initializer that other nodes also read (a Gather on a tied table) stays for them. Returns a
    summary for the manifest: nodes per bit width, columns per GGUF type, how many carry the offset term.
    """
    import onnx
    from onnx import helper, numpy_helper

    from focalrt.calibration.quantize import gathers_from_quantized_table
    from focalrt.export.onnx_io import IR_VERSION, save_model

    model = onnx.load(str(src), load_external_data=True)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    index = row_index(grid)
    new_nodes, new_inits, replaced = [], [], set()
    block_sums: dict[str, str] = {}  # MatMul input -> its block sums
    block_ones: set[str] = set()
    summary: dict[str, Any] = {"nodes_4bit": 0, "nodes_8bit": 0, "nodes_with_offsets": 0, "float_matmuls": 0,
                               "columns": {}}
    tied: list[tuple[str, str, Packed, int]] = []  # (table, MatMulNBits name base, packed head, hidden)
    for node in graph.node:
        weight = inits.get(node.input[1]) if len(node.input) == 2 and is_weight_product(node) else None
        if weight is None or len(weight.dims) != 2:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(weight)
        if node.op_type == "Gemm":  # the LM head over the [V, H] table as stored (export/gqa.py::LMHead)
            w = w.T
        try:
            packed = match_weight(w, grid, index)
        except ValueError as e:
            raise ValueError(f"--keep-quantization: MatMul {node.name}: {e}") from None
        if packed is None:
            summary["float_matmuls"] += 1
            new_nodes.append(node)
            continue
        k, n = w.shape
        worst = float(np.max(np.abs(dequantize_packed(packed) - w)))
        if worst > 1e-6 * max(1.0, float(np.max(np.abs(w)))):
            raise ValueError(f"--keep-quantization: MatMul {node.name}: the GGUF grid differs from the exported "
                             f"weight by {worst:.3g}")
        base = node.name or node.output[0]
        new_inits += [numpy_helper.from_array(packed.b, f"{base}.gguf_B"),
                      numpy_helper.from_array(packed.scales, f"{base}.gguf_scales")]
        out = node.output[0] if packed.offsets is None else f"{base}.gguf_product"
        new_nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], f"{base}.gguf_B", f"{base}.gguf_scales"], [out], name=f"{base}.gguf",
            domain="com.microsoft", K=k, N=n, bits=packed.bits, block_size=BLOCK, accuracy_level=accuracy_level))
        if packed.offsets is not None:
            x = node.input[0]
            if x not in block_sums:
                sums_w = f"gguf_block_ones_{k}"  # [K, K/32]: 1 where row k is in block b; one per K
                if sums_w not in block_ones:
                    ones = np.kron(np.eye(k // BLOCK, dtype=np.float32), np.ones((BLOCK, 1), np.float32))
                    block_ones.add(sums_w)
                    new_inits.append(numpy_helper.from_array(ones, sums_w))
                block_sums[x] = f"{base}.gguf_block_sums"
                new_nodes.append(helper.make_node("MatMul", [x, sums_w], [block_sums[x]], name=f"{base}.gguf_sums"))
            new_inits.append(numpy_helper.from_array(packed.offsets, f"{base}.gguf_offsets"))
            new_nodes.append(helper.make_node("MatMul", [block_sums[x], f"{base}.gguf_offsets"],
                                              [f"{base}.gguf_offset_term"], name=f"{base}.gguf_offset"))
            new_nodes.append(helper.make_node("Add", [out, f"{base}.gguf_offset_term"], [node.output[0]],
                                              name=f"{base}.gguf_add"))
            summary["nodes_with_offsets"] += 1
        if node.op_type == "Gemm" and packed.offsets is None:
            tied.append((weight.name, base, packed, k))
        summary[f"nodes_{packed.bits}bit"] += 1
        for kind, count in packed.sources.items():
            summary["columns"][kind] = summary["columns"].get(kind, 0) + count
        replaced.add(weight.name)
    if not summary["nodes_4bit"] + summary["nodes_8bit"]:
        raise ValueError("--keep-quantization: no MatMul weight of the exported decoder is a Q4_0/Q4_1/Q8_0 tensor "
                         "of the GGUF file")
    before = list(graph.initializer)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    for table, base, packed, hidden in tied:  # a tied table's token Gather reads the head's blocks (stored once)
        summary["tied_gathers"] = summary.get("tied_gathers", 0) + gathers_from_quantized_table(
            graph, new_nodes, table, f"{base}.gguf_B", f"{base}.gguf_scales", packed.bits, BLOCK, hidden)
    # A replaced weight stays only while another node still reads it (say, a Gather of an untied table).
    still_read = {name for n in new_nodes for name in n.input}
    graph.initializer.extend([i for i in before if i.name not in replaced or i.name in still_read])
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    model.ir_version = IR_VERSION
    save_model(model, dst)
    summary["accuracy_level"] = accuracy_level
    return summary


def with_accuracy_level(src: Path, dst: Path, level: int) -> None:
    """A copy of a rewritten decoder whose MatMulNBits run at another accuracy level (0: fp32 compute)."""
    import onnx

    from focalrt.calibration.quantize import set_accuracy_level
    from focalrt.export.onnx_io import save_model

    model = onnx.load(str(src), load_external_data=True)
    set_accuracy_level(model, level)
    save_model(model, dst)
