"""A GGUF file checked before transformers reads it: one clear line per kind of damage.

transformers' GGUF reader assumes a whole, well-formed file: a truncated one ends in `struct.error`, a damaged
header in `'utf-8' codec can't decode ...` or `cannot reshape array of size ...`, none of which says the file
is damaged. `check_gguf` walks what the GGUF format declares, in order, against the file itself (the layout of
llama.cpp's gguf.md): magic, version, tensor and metadata counts, every metadata key and value, every tensor's
name, shape, type and offset, and the end of each tensor's data against the file size. It reads only the
header (metadata and tensor infos, a few MB for a vocabulary); the weights are not read.

The type and block sizes come from the `gguf` package (the export extra), which transformers itself uses.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 (2023, 32-bit counts) is not read by transformers either
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_STRING = 1 << 30  # no key, value or tensor name is near 1 GiB: a larger length is a damaged header
HINT = "the file is damaged or incomplete; download or copy it again"


class GGUFError(ValueError):
    """A file that is not a readable GGUF; the message names the file and what is wrong."""


def check_gguf(path: str | os.PathLike, flag: str = "--model") -> Path:
    """Return `path` if it is a whole GGUF file; else raise GGUFError (or FileNotFoundError) in one line."""
    p = Path(path)
    if p.is_dir():
        raise GGUFError(f"{flag} {p} is a directory, not a GGUF file; give the .gguf file itself (a "
                        f"checkpoint directory must not end in .gguf)")
    if not p.exists():
        raise FileNotFoundError(f"{flag} {p} does not exist; give a .gguf file or a checkpoint directory")
    if not p.is_file():
        raise GGUFError(f"{flag} {p} is not a regular file; give a .gguf file")
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            _walk(_Reader(f, size))
    except GGUFError as e:
        raise GGUFError(f"{flag} {p}: {e}") from None
    except OSError as e:
        raise GGUFError(f"{flag} {p} cannot be read ({e.strerror or e})") from None
    return p


class _Reader:
    """Little-endian reads that say what they were reading when the file ends."""

    def __init__(self, f: BinaryIO, size: int):
        self.f = f
        self.size = size

    @property
    def pos(self) -> int:
        return self.f.tell()

    def take(self, n: int, what: str) -> bytes:
        data = self.f.read(n) if n else b""
        if len(data) < n:
            raise GGUFError(f"the file ends at byte {self.size} inside {what} (truncated); {HINT}")
        return data

    def skip(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise GGUFError(f"the file ends at byte {self.size} inside {what} (truncated); {HINT}")
        self.f.seek(n, os.SEEK_CUR)

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("Q", f"the length of {what}")
        if n > min(MAX_STRING, self.size - self.pos):
            raise GGUFError(f"{what} declares {n} bytes, more than the {self.size - self.pos} left in the file "
                            f"(damaged header); {HINT}")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{what} is not UTF-8 text ({raw[:16]!r}...: damaged header); {HINT}") from None


def _walk(r: _Reader) -> None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

    scalar = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
              GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
              GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
              GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}
    if r.size < 24:
        raise GGUFError(f"it has {r.size} bytes, too few for a GGUF header (24); {HINT}")
    magic = r.take(4, "the magic")
    if magic != MAGIC:
        raise GGUFError(f"it does not start with the GGUF magic (found {magic!r}); it is not a GGUF file, or "
                        f"its header is damaged")
    version = r.unpack("I", "the version")
    if version not in VERSIONS:
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        why = "a big-endian GGUF, which transformers does not read" if swapped in VERSIONS else \
            "damaged header, or a format this reader does not know"
        raise GGUFError(f"GGUF version {version} is not one of {', '.join(map(str, VERSIONS))} ({why})")
    n_tensors = r.unpack("Q", "the tensor count")
    n_kv = r.unpack("Q", "the metadata count")
    # the smallest tensor info is 8 + 4 + 8 + 4 + 8 bytes, the smallest metadata entry 8 + 4 + 1
    if n_tensors * 32 > r.size or n_kv * 13 > r.size:
        what = f"{n_tensors} tensors" if n_tensors * 32 > r.size else f"{n_kv} metadata entries"
        raise GGUFError(f"its header declares {what}, more than a file of {r.size} bytes can hold (truncated, "
                        f"or a damaged header); {HINT}")

    def value(kind: int, what: str, depth: int = 0):
        if kind == GGUFValueType.STRING:
            return r.string(what)
        if kind in scalar:
            return r.unpack(scalar[kind], what)
        if kind != GGUFValueType.ARRAY or depth > 2:
            raise GGUFError(f"{what} has value type {kind}, which GGUF does not define (damaged header); {HINT}")
        item = r.unpack("I", f"the item type of {what}")
        count = r.unpack("Q", f"the length of {what}")
        if item in scalar:
            r.skip(count * struct.calcsize(scalar[item]), what)
            return None
        if count > r.size - r.pos:
            raise GGUFError(f"{what} declares {count} items, more than the file can hold (damaged header); {HINT}")
        for i in range(count):
            value(item, f"item {i} of {what}", depth + 1)
        return None

    alignment = 32
    for i in range(n_kv):
        key = r.string(f"metadata key {i}")
        kind = r.unpack("I", f"the type of metadata {key!r}")
        v = value(kind, f"metadata {key!r}")
        if key == "general.alignment":
            if not isinstance(v, int) or v <= 0 or v & (v - 1):
                raise GGUFError(f"metadata 'general.alignment' is {v!r}, not a power of two (damaged header)")
            alignment = v
    tensors = []
    for i in range(n_tensors):
        name = r.string(f"the name of tensor {i}")
        n_dims = r.unpack("I", f"the rank of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS}; damaged "
                            f"header); {HINT}")
        dims = [r.unpack("Q", f"the shape of tensor {name!r}") for _ in range(n_dims)]
        kind = r.unpack("I", f"the type of tensor {name!r}")
        offset = r.unpack("Q", f"the offset of tensor {name!r}")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise GGUFError(f"tensor {name!r} has type {kind}, which the gguf package does not know (damaged "
                            f"header, or a newer quantization than this gguf package reads)") from None
        elements = 1
        for d in dims:
            elements *= d
        if elements % block:
            raise GGUFError(f"tensor {name!r} of shape {dims} does not fill whole blocks of {block} "
                            f"({GGMLQuantizationType(kind).name}; damaged header); {HINT}")
        if offset % alignment:
            raise GGUFError(f"tensor {name!r} starts at offset {offset}, not a multiple of the alignment "
                            f"{alignment} (damaged header); {HINT}")
        tensors.append((name, offset, elements // block * type_size))
    data_start = -(-r.pos // alignment) * alignment
    for name, offset, nbytes in tensors:
        end = data_start + offset + nbytes
        if end > r.size:
            raise GGUFError(f"tensor {name!r} needs bytes up to {end}, but the file ends at {r.size} (truncated); "
                            f"{HINT}")
