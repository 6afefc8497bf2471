"""`focalrt serve`: a bundle on NVIDIA Triton Inference Server (PyTriton), for many cameras and one GPU."""

from __future__ import annotations

import json
import signal
import sys
import threading

from focalrt.commands.args import add_parser, add_provider, add_threads, non_negative_int, positive_int


def register(sub) -> None:
    p = add_parser(sub, "serve", help="serve a bundle on Triton Inference Server (needs the serve extra)",
                   description="Models `describe` and `faces` over KServe v2 HTTP/gRPC with dynamic batching; "
                               "readiness at /v2/models/describe/ready, Prometheus metrics at "
                               ":METRICS_PORT/metrics. See docs/serving.md.")
    p.add_argument("bundle", help="bundle directory written by `focalrt export`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address HTTP, gRPC and metrics bind to (default: 127.0.0.1, this machine only; "
                        "0.0.0.0 for every interface)")
    p.add_argument("--http-port", type=positive_int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--grpc-port", type=positive_int, default=8001, help="gRPC port (default: 8001)")
    p.add_argument("--metrics-port", type=positive_int, default=8002, help="Prometheus port (default: 8002)")
    p.add_argument("--max-batch", type=positive_int, default=16,
                   help="most requests Triton merges into one batch (default: 16)")
    p.add_argument("--queue-delay-us", type=non_negative_int, default=2000,
                   help="how long Triton's dynamic batcher waits to fill a batch, in microseconds (default: 2000)")
    add_provider(p)
    add_threads(p)
    p.add_argument("--max-image-bytes", type=positive_int, default=16 * 1024 * 1024,
                   help="largest image a request may carry (default: 16777216)")
    p.add_argument("--max-new-tokens-limit", type=positive_int, default=256,
                   help="largest max_new_tokens a request may ask for (default: 256)")
    p.add_argument("--max-prompt-chars", type=positive_int, default=2000,
                   help="longest prompt a request may carry, in characters (default: 2000)")
    p.add_argument("--max-request-bytes", type=positive_int, default=64 * 1024 * 1024,
                   help="most bytes one HTTP request may carry or declare in its input shapes; larger ones get "
                        "HTTP 413 before Triton reads them (default: 67108864)")
    p.add_argument("--exit-timeout", type=positive_int, default=30,
                   help="seconds SIGTERM waits for in-flight requests before the server exits (default: 30)")
    p.set_defaults(func=run)


def run(args) -> int:
    from focalrt.serve import environment

    try:
        libpython = environment.prepare()  # before anything starts Triton: LD_LIBRARY_PATH for the stub
    except environment.ServeEnvironmentError as e:
        print(f"focalrt serve: {e}", file=sys.stderr)
        return 2
    from focalrt.runtime.faces.detection import FaceAnalyzer
    from focalrt.runtime.pipeline import Pipeline
    from focalrt.serve.requests import Limits
    from focalrt.serve.triton import ServeOptions, serve, warm_up

    print(f"focalrt serve: {libpython.message()}", file=sys.stderr)
    pipeline = Pipeline.from_bundle(args.bundle, provider=args.provider, threads=args.threads,
                                    max_batch=args.max_batch)
    entry = pipeline.bundle.manifest.get("face_models")
    faces = FaceAnalyzer.from_dir(pipeline.bundle.path, entry, pipeline.providers) if entry else None
    warm_ms = warm_up(pipeline, faces)
    limits = Limits(max_image_bytes=args.max_image_bytes, max_new_tokens=args.max_new_tokens_limit,
                    max_prompt_chars=args.max_prompt_chars)
    options = ServeOptions(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                           metrics_port=args.metrics_port, max_batch=args.max_batch,
                           queue_delay_us=args.queue_delay_us, exit_timeout_s=args.exit_timeout, limits=limits,
                           max_request_bytes=args.max_request_bytes)
    stop = threading.Event()
    signals: list[int] = []

    def on_signal(signum, _frame):  # drain, then exit 0: what a service manager or `docker stop` expects
        signals.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def on_ready(_triton) -> None:
        models = "describe, faces" if faces is not None else "describe"
        print(f"focalrt serve: ready (warm-up {warm_ms:.0f} ms): models {models} at http://{args.host}:"
              f"{args.http_port} and grpc://{args.host}:{args.grpc_port}; metrics http://{args.host}:"
              f"{args.metrics_port}/metrics", file=sys.stderr, flush=True)

    try:
        stats = serve(pipeline, faces, options, on_ready=on_ready, stop=stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("focalrt serve: stopped " + json.dumps(stats.as_dict()), file=sys.stderr, flush=True)
    if not signals:
        print("focalrt serve: Triton exited on its own (see its log above)", file=sys.stderr)
        return 1
    return 0
