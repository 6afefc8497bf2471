"""The decode roofline: measured memory bandwidth divided by the bytes one decode step must read.

Generating one token reads every decoder weight once (the lm_head included, every token), plus one row
of the token-embedding table (a gather) and the KV cache so far. With batch 1 that traffic dwarfs the
arithmetic, so `bandwidth / bytes per token` bounds decode tokens/s from above; how close a runtime gets
is the honest measure of its overhead. The bound only means something when the weights are much larger
than the last-level cache (true for `small`, not for `tiny-random`).

Bandwidth is measured STREAM-style in numpy: copy (read + write), add (two reads + a write) and read
(a max-reduce), on arrays several times the L3 size, one thread per usable core at once (numpy drops the GIL
inside these loops), best of several repeats as STREAM reports. `focalrt bench` runs it in a child process
(`measure_bandwidth_in_child`): its arrays (4x the L3, up to an eighth of the RAM) would otherwise become the
bench process's peak RSS, which is meant to be the model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from focalrt.bench.environment import cache_bytes, cpu_cores, total_ram_bytes

KERNELS = ("copy", "add", "read")
ARRAYS_PER_KERNEL = {"copy": 2, "add": 3, "read": 1}  # arrays whose bytes move per pass (STREAM counting)


def default_working_set() -> int:
    """4x the L3 (at least 256 MiB) so the caches cannot hold it, and at most 1/8 of the RAM."""
    l3 = cache_bytes(3) or 32 << 20
    ram = total_ram_bytes() or 8 << 30
    return int(min(max(4 * l3, 256 << 20), ram // 8))


def _kernel_pass(kernel: str, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
    if kernel == "copy":
        np.copyto(b, a)
    elif kernel == "add":
        np.add(a, b, out=c)
    else:
        np.maximum.reduce(a)  # vectorised and memory-bound, unlike numpy's pairwise sum


def _run_threads(kernel: str, arrays: list[tuple[np.ndarray, ...]]) -> float:
    """Seconds for one pass of `kernel` over every thread's arrays, all threads at once."""
    barrier = threading.Barrier(len(arrays) + 1)

    def work(abc: tuple[np.ndarray, ...]) -> None:
        barrier.wait()
        _kernel_pass(kernel, *abc)

    threads = [threading.Thread(target=work, args=(abc,)) for abc in arrays]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def measure_bandwidth(working_set_bytes: int | None = None, repeats: int = 5,
                      threads: int | None = None) -> dict[str, Any]:
    """Memory bandwidth in GB/s (1e9 bytes/s) per kernel and the best of them.

    `working_set_bytes` is the total over all arrays of all threads (default: default_working_set()).
    The best kernel is what the roofline uses, so the bound is the most optimistic one we can measure.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    threads = threads or cpu_cores()["usable"] or 1
    working_set = int(working_set_bytes or default_working_set())
    n = max(working_set // (3 * threads * 4), 1 << 16)  # float32 elements per array; 3 arrays per thread
    arrays = [(np.ones(n, np.float32), np.full(n, 2.0, np.float32), np.zeros(n, np.float32))
              for _ in range(threads)]  # filled, so every page is touched before timing
    result: dict[str, Any] = {"threads": threads, "array_bytes": n * 4, "working_set_bytes": 3 * threads * n * 4,
                              "repeats": repeats}
    for kernel in KERNELS:
        _run_threads(kernel, arrays)  # warm-up pass
        best = min(_run_threads(kernel, arrays) for _ in range(repeats))
        moved = ARRAYS_PER_KERNEL[kernel] * n * 4 * threads
        result[f"{kernel}_gb_s"] = moved / best / 1e9
    result["best_gb_s"] = max(result[f"{k}_gb_s"] for k in KERNELS)
    result["best_kernel"] = max(KERNELS, key=lambda k: result[f"{k}_gb_s"])
    return result


def measure_bandwidth_in_child(working_set_bytes: int | None = None, repeats: int = 5) -> dict[str, Any]:
    """measure_bandwidth in a process of its own, so its arrays never count in this process's memory.

    The result also has the child's own peak RSS (`probe_peak_rss_bytes`)."""
    code = ("import json, sys; from focalrt.bench.memory import peak_rss_bytes; "
            "from focalrt.bench.roofline import measure_bandwidth; "
            f"r = measure_bandwidth({working_set_bytes!r}, {int(repeats)}); "
            "r['probe_peak_rss_bytes'] = peak_rss_bytes(); print(json.dumps(r))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the memory-bandwidth probe failed: {done.stderr.strip().splitlines()[-1:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process": "child"}


def _component_bytes(bundle_dir: Path, record: dict[str, Any]) -> int:
    """A component's ONNX file plus its external data, from the manifest (file sizes if not recorded)."""
    total = int(record.get("bytes") or (bundle_dir / record["file"]).stat().st_size)
    ext = record.get("external_data")
    if ext:
        total += int(ext.get("bytes") or (bundle_dir / ext["file"]).stat().st_size)
    return total


def model_bytes(bundle_dir: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, int]:
    """Bytes on disk per component (with external data) and in total."""
    bundle_dir = Path(bundle_dir)
    out = {name: _component_bytes(bundle_dir, rec) for name, rec in manifest["components"].items()}
    out["total"] = sum(out.values())
    return out


def weight_bytes_per_token(bundle_dir: str | os.PathLike, manifest: dict[str, Any]) -> int:
    """Bytes one decode step reads: the whole decoder (lm_head included) plus one embedding row.

    The decoder's file size stands in for its weights: the graph itself is a few hundred KB next to
    hundreds of MB of initializers. The embedding table is gathered, so only one row of it is read. A
    decoder that embeds its own tokens holds the table: tied to the LM head it is read whole anyway (as the
    head); untied, its float table (`vocab_size` x `hidden_size`) is counted out but for the one row.
    """
    comps = manifest["components"]
    decoder = _component_bytes(Path(bundle_dir), comps["decoder"])
    hidden = int(manifest["text"]["hidden_size"])
    if "embed" in comps:  # a bundle exported before the decoder embedded its tokens
        row_bytes = 2 if comps["embed"].get("precision") in ("fp16", "bf16") else 4
        return decoder + hidden * row_bytes
    if "tied" in str(comps["decoder"].get("lm_head", "")):
        return decoder
    return decoder - (int(manifest["text"]["vocab_size"]) - 1) * hidden * 4


def kv_bytes_per_token(text: dict[str, Any], past: int, bytes_per_value: int = 4) -> int:
    """KV cache bytes one decode step reads at `past` tokens of context (keys and values, all layers)."""
    head_dim = int(text.get("head_dim") or text["hidden_size"] // text["num_heads"])
    return 2 * int(text["num_layers"]) * int(text["num_kv_heads"]) * head_dim * int(past) * bytes_per_value


def decode_upper_bound(bandwidth_gb_s: float, weight_bytes_per_token: int) -> float:
    """Tokens/s if every step did nothing but stream its bytes at the measured bandwidth."""
    if bandwidth_gb_s <= 0 or weight_bytes_per_token <= 0:
        raise ValueError(f"bandwidth ({bandwidth_gb_s} GB/s) and bytes per token ({weight_bytes_per_token}) "
                         f"must both be positive")
    return bandwidth_gb_s * 1e9 / weight_bytes_per_token


def roofline(bundle_dir: str | os.PathLike, manifest: dict[str, Any], decode_tokens_per_s: float | None = None,
             past: int = 0, bandwidth: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bound for this bundle on this machine, and a measured decode rate as a fraction of it."""
    bandwidth = bandwidth or measure_bandwidth_in_child()
    weights = weight_bytes_per_token(bundle_dir, manifest)
    kv = kv_bytes_per_token(manifest["text"], past)
    bound = decode_upper_bound(bandwidth["best_gb_s"], weights + kv)
    l3 = cache_bytes(3)
    return {"bandwidth": bandwidth, "weight_bytes_per_token": weights, "kv_bytes_per_token": kv,
            "past_tokens": past, "decode_upper_bound_tokens_per_s": bound,
            "decode_tokens_per_s": decode_tokens_per_s,
            "fraction_of_roofline": (decode_tokens_per_s / bound) if decode_tokens_per_s else None,
            "weights_exceed_l3": (weights > l3) if l3 else None}
