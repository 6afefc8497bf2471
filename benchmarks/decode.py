"""Prefill ms, decode tokens/s and peak RSS: our runtime against transformers generate(), same weights.

    python -m benchmarks.decode --preset small                  # exports the bundle once to the cache
    python -m benchmarks.decode --preset tiny-random --runs 3 --json out.json

Both sides get the same random-weight model (`build_random_model(preset, seed)` is what the bundle was
exported from) and the same prompt: ordinary token ids, as many as the bundle's real region prompt
(image tokens included), so the work per token matches a region description. Each side runs in its own
subprocess, so its peak RSS is its own and neither warms the other's caches. Per side: `--warmup`
untimed generations, then `--runs` timed ones; medians are reported. `--rounds` repeats the pair of
subprocesses (alternating) to average out other load on the machine.

Definitions (identical on both sides): prefill = prompt in -> first new token chosen; a decode step =
one more token chosen; decode tokens/s = steps / their summed time. Greedy, `--new-tokens` tokens,
stop tokens ignored.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from benchmarks import harness

# ---------------------------------------------------------------- workers (one per subprocess)


def worker_ours(spec: dict[str, Any]) -> None:
    from focalrt.bench.measure import text_positions
    from focalrt.bench.memory import current_rss_bytes
    from focalrt.runtime.generation.generate import batch_positions, decode_one_token, prefill
    from focalrt.runtime.pipeline import Pipeline

    t0 = time.perf_counter()
    # The same context budget as the other runtimes get (genai's max_length, transformers' growing cache):
    # one slot of prompt + new tokens, not the bundle's max_context for every slot.
    pipe = Pipeline.from_bundle(spec["bundle"], provider="cpu", threads=spec["threads"],
                                max_context=spec.get("max_context"), max_batch=1)
    load_s, rss = time.perf_counter() - t0, current_rss_bytes()
    ids = np.asarray(spec["ids"], np.int64)[None]
    positions = batch_positions(text_positions(ids.shape[1], pipe.model.rope_axes), 1)
    delta = np.zeros(1, np.int64)
    cache = pipe.cache.view(0, 1)
    runs, tokens = [], []
    for i in range(spec["warmup"] + spec["runs"]):
        cache.lengths[:] = 0
        s0 = time.perf_counter()
        token = prefill(pipe.model, cache, ids, positions).argmax(-1)
        prefill_ms = (time.perf_counter() - s0) * 1e3
        tokens, steps = [int(token[0])], []
        for _ in range(spec["new_tokens"] - 1):
            s0 = time.perf_counter()
            token = decode_one_token(pipe.model, cache, token, delta).argmax(-1)
            steps.append((time.perf_counter() - s0) * 1e3)
            tokens.append(int(token[0]))
        if i >= spec["warmup"]:
            runs.append(harness.one_run(prefill_ms, steps))
    harness.finish_worker(runs, tokens, load_s, rss)


def worker_transformers(spec: dict[str, Any]) -> None:
    import torch

    from focalrt.bench.memory import current_rss_bytes
    from focalrt.export.qwen2_5_vl import build_random_model

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    model = build_random_model(spec["preset"], spec["seed"])
    time_transformers(model, spec, time.perf_counter() - t0, current_rss_bytes())


def time_transformers(model, spec: dict[str, Any], load_s: float, rss: int) -> None:
    """Greedy `generate()` of exactly spec["new_tokens"] tokens, timed per token by a streamer; reports the runs.

    Shared by every transformers row (this script's random preset, compare_text.py's GGUF model).
    """
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """generate() calls put() once with the prompt, then once per new token: a timestamp each."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    ids = torch.tensor([spec["ids"]])
    runs, tokens = [], []
    n = spec["new_tokens"]
    for i in range(spec["warmup"] + spec["runs"]):
        clock = Clock()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0,
                                 streamer=clock)
        t = clock.times  # t[0]: prompt handed over; t[1]: first new token; t[k]: k-th new token
        tokens = out[0, ids.shape[1]:].tolist()
        if i >= spec["warmup"]:
            steps = [(b - a) * 1e3 for a, b in zip(t[1:], t[2:], strict=False)]
            runs.append(harness.one_run((t[1] - t[0]) * 1e3, steps))
    harness.finish_worker(runs, tokens, load_s, rss,
                          {"torch": torch.__version__, "torch_threads": torch.get_num_threads()})


WORKERS = {"ours": worker_ours, "transformers": worker_transformers}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.common_args(p)
    args = p.parse_args(argv)
    if args.worker:
        WORKERS[args.worker](json.loads(args.spec))
        return {}
    from focalrt.bench.environment import describe, environment
    from focalrt.bench.report import markdown_table, mib

    spec, bundle = harness.base_spec(args)
    sides = harness.measure_sides("benchmarks.decode", {"ours": spec, "transformers": spec}, args.rounds)
    ours, hf = sides["ours"], sides["transformers"]
    env = environment(["CPUExecutionProvider"], spec["threads"])
    result = {
        "preset": args.preset, "bundle": str(bundle), "prompt_tokens": len(spec["ids"]),
        "new_tokens": args.new_tokens, "runs_per_round": args.runs, "warmup": args.warmup, "rounds": args.rounds,
        "threads": spec["threads"], "environment": env, "ours": ours, "transformers": hf,
        "ratios": {"decode_speedup": ours["quiet_decode_tokens_per_s"] / hf["quiet_decode_tokens_per_s"],
                   "prefill_speedup": hf["quiet_prefill_ms"] / ours["quiet_prefill_ms"],
                   "decode_speedup_all_runs": ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
                   "prefill_speedup_all_runs": hf["prefill_ms"] / ours["prefill_ms"],
                   "peak_rss_ratio": ours["peak_rss_bytes"] / hf["peak_rss_bytes"]},
        "greedy_tokens_agreeing": harness.agreement(ours["tokens"], hf["tokens"]),
    }
    rows = [[name, s["quiet_prefill_ms"], s["prefill_ms"], s["quiet_decode_tokens_per_s"], s["decode_tokens_per_s"],
             s["decode_tokens_per_s_best"], mib(s["peak_rss_bytes"]), mib(s["rss_after_load_bytes"])]
            for name, s in (("focalrt (ORT, fp32)", ours), ("transformers generate (eager fp32)", hf))]
    rt = result["ratios"]
    rows.append(["ours / transformers", f"{rt['prefill_speedup']:.2f}x faster",
                 f"{rt['prefill_speedup_all_runs']:.2f}x", f"{rt['decode_speedup']:.2f}x",
                 f"{rt['decode_speedup_all_runs']:.2f}x", "", f"{rt['peak_rss_ratio']:.2f}x", ""])
    print(f"\n{args.preset}: prompt {len(spec['ids'])} tokens, {args.new_tokens} new tokens, greedy; "
          f"{args.rounds} rounds x {args.runs} runs per side after {args.warmup} warm-up; {spec['threads']} threads; "
          f"'quiet' = median of the least disturbed round\n{describe(env)}\n")
    print(markdown_table(["runtime", "prefill ms (quiet)", "prefill ms (all)", "decode tok/s (quiet)",
                          "decode tok/s (all)", "best run tok/s", "peak RSS", "RSS after load"], rows))
    print(f"\ngreedy tokens agreeing from the start: {result['greedy_tokens_agreeing']}/{args.new_tokens}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
