"""Load test of `focalrt serve`: 1, 4 and 16 concurrent clients against one server on loopback.

Each client sends one-region `describe` requests back to back (one in flight per client) for a fixed count,
then stops. Reported per level: descriptions/s, p50/p99 latency, errors, answers lost, and the batch sizes
Triton formed (from the `batch_requests` each answer carries: how many requests shared its describe_images call).

    PYTHONPATH=. FOCALRT_SERVE_PYTHON=.venv-serve/bin/python python -m benchmarks.serve BUNDLE \
        --requests-per-client 6 --max-new-tokens 64

The server runs under FOCALRT_SERVE_PYTHON (PyTriton 0.7 needs numpy<2; see docs/serving.md). Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

import focalrt.data
from focalrt.serve.client import ServeError, ServerClient
from focalrt.serve.process import start_server


def client_loop(url: str, image: np.ndarray, count: int, max_new_tokens: int, seed: int, out: list) -> None:
    """`count` requests one after another, each with its own box; records (latency_ms, batch, ok)."""
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    with ServerClient(url, timeout_s=600, concurrency=1) as c:
        for _ in range(count):
            x, y = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            t0 = time.perf_counter()
            try:
                r = c.describe(image, boxes=[(x, y, x + w // 3, y + h // 3)], max_new_tokens=max_new_tokens)
                out.append(((time.perf_counter() - t0) * 1e3, r[0].timings_ms.get("batch_requests", 1), True))
            except (ServeError, Exception) as e:  # counted, never fatal: the point is to see them
                out.append(((time.perf_counter() - t0) * 1e3, 0, False))
                print(f"client {seed}: {type(e).__name__}: {str(e)[:200]}")


def level(url: str, image: np.ndarray, clients: int, per_client: int, max_new_tokens: int) -> dict:
    results: list = []
    threads = [threading.Thread(target=client_loop, args=(url, image, per_client, max_new_tokens, i, results))
               for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=3600)
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[2]]
    lat = np.array([r[0] for r in ok]) if ok else np.array([np.nan])
    return {"clients": clients, "requests": clients * per_client, "answered": len(results),
            "lost": clients * per_client - len(results), "errors": len(results) - len(ok),
            "descriptions_per_s": round(len(ok) / wall, 3), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "wall_s": round(wall, 2),
            "batch_sizes_seen": dict(sorted(Counter(int(r[1]) for r in ok).items()))}


def triton_batches(metrics: str, model: str = "describe") -> dict:
    """Triton's own counters: requests vs model executions (requests / executions = mean batch)."""
    vals = {}
    for name in ("nv_inference_request_success", "nv_inference_exec_count", "nv_inference_count"):
        for line in metrics.splitlines():
            if line.startswith(name + "{") and f'model="{model}"' in line:
                vals[name] = float(line.rsplit(" ", 1)[1])
    return vals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--requests-per-client", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="64: the bundles' default")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--queue-delay-us", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=None, help="server's onnxruntime threads")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    image = cv2.imread(str(Path(focalrt.data.__file__).parent / "astronaut.jpg"))
    extra = ["--max-batch", str(args.max_batch), "--queue-delay-us", str(args.queue_delay_us)]
    if args.threads:
        extra += ["--threads", str(args.threads)]
    log = Path(tempfile.mkdtemp(prefix="focalrt-serve-bench-")) / "serve.log"
    server = start_server(args.bundle, log, extra)
    rows = []
    try:
        level(server.url, image, 1, 2, args.max_new_tokens)  # warm the connection path, not counted
        for clients in (int(c) for c in args.levels.split(",")):
            before = triton_batches(server.metrics())
            row = level(server.url, image, clients, args.requests_per_client, args.max_new_tokens)
            after = triton_batches(server.metrics())
            execs = after.get("nv_inference_exec_count", 0) - before.get("nv_inference_exec_count", 0)
            reqs = after.get("nv_inference_request_success", 0) - before.get("nv_inference_request_success", 0)
            row["triton_mean_batch"] = round(reqs / execs, 2) if execs else None
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        code = server.stop()
    base = rows[0]["descriptions_per_s"] if rows else 0
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
          f"max_new_tokens {args.max_new_tokens}, max batch {args.max_batch}, queue delay {args.queue_delay_us} us; "
          f"server exit code {code}")
    print("| clients | descriptions/s | vs 1 client | p50 ms | p99 ms | errors | lost | Triton mean batch | "
          "batch sizes seen (requests per describe_images: answers) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["descriptions_per_s"] / base if base else float("nan")
        print(f"| {r['clients']} | {r['descriptions_per_s']:.2f} | {ratio:.2f}x | {r['p50_ms']:.0f} "
              f"| {r['p99_ms']:.0f} | {r['errors']} | {r['lost']} | {r['triton_mean_batch']} "
              f"| {r['batch_sizes_seen']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
