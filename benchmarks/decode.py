"""Prefill ms, decode tokens/s and peak RSS: our runtime against transformers generate(), same weights.

    python benchmarks/decode.py --preset small                  # exports the bundle once to the cache
    python benchmarks/decode.py --preset tiny-random --runs 3 --json out.json

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
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

CACHE = Path(os.environ.get("FOCALRT_CACHE", Path.home() / ".cache" / "focalrt"))


# ---------------------------------------------------------------- shared by benchmarks/compare.py


def ensure_bundle(preset: str, bundle: Path | None = None, seed: int = 0) -> Path:
    """The preset's fp32 bundle, exported once into the cache (a few minutes and ~2.5 GB for `small`)."""
    path = bundle or CACHE / "bundles" / preset
    if (path / "manifest.json").is_file():
        return path
    print(f"exporting the {preset} bundle to {path} (once) ...", file=sys.stderr, flush=True)
    from focalrt.export.build import export_bundle

    path.parent.mkdir(parents=True, exist_ok=True)
    return export_bundle(path, preset=preset, face_models=False, seed=seed)


def bundle_seed(bundle: Path) -> int:
    """The seed the bundle's random weights came from: transformers must build the same model."""
    source = json.loads((bundle / "manifest.json").read_text()).get("source", {})
    if not source.get("preset"):
        raise ValueError(f"{bundle} was not exported from a --preset; these benchmarks rebuild the torch model "
                         f"from the preset, so pass a preset bundle (or none, to use the cache)")
    return int(source.get("seed") or 0)


def region_prompt_length(bundle: Path) -> int:
    """Tokens in the bundle's default region prompt (image pads included): the realistic prefill length."""
    from tokenizers import Tokenizer

    from focalrt.bundle import load
    from focalrt.runtime.generation import prompt as prompts
    from focalrt.runtime.models.adapters import adapter_for

    b = load(bundle)
    m = b.manifest
    tok = Tokenizer.from_file(str(bundle / m["tokenizer"]["file"]))
    size = adapter_for(m).image_size
    box = (size // 4, size // 2, 3 * size // 4, 3 * size // 4)
    return int(prompts.encode(tok, m["prompt"], adapter_for(m).image_tokens, None, box).token_ids.size)


def prompt_ids(bundle: Path, length: int, seed: int = 0) -> list[int]:
    from focalrt.bench.measure import synthetic_prompt

    vocab = json.loads((bundle / "manifest.json").read_text())["text"]["vocab_size"]
    return synthetic_prompt(length, vocab, seed).tolist()


def run_worker(script: Path, side: str, spec: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run one side in a fresh interpreter; it prints one JSON line last."""
    cmd = [sys.executable, str(script), "--worker", side, "--spec", json.dumps(spec)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{side} worker failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def summarize_side(rounds: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over every timed run, per round, and of the quietest round.

    Other load on the machine only ever slows a run down, so the round with the best median is the
    least disturbed one: its median ("quiet") is the estimate for an idle machine, and the ratios use it.
    The median over all runs and the best single run are kept beside it.
    """
    runs = [r for rnd in rounds for r in rnd]
    prefill = [r["prefill_ms"] for r in runs]
    rates = [r["decode_tokens_per_s"] for r in runs]
    steps = [s for r in runs for s in r["steps_ms"]]
    rate_by_round = [float(np.median([r["decode_tokens_per_s"] for r in rnd])) for rnd in rounds]
    prefill_by_round = [float(np.median([r["prefill_ms"] for r in rnd])) for rnd in rounds]
    return {"quiet_decode_tokens_per_s": max(rate_by_round), "quiet_prefill_ms": min(prefill_by_round),
            "decode_tokens_per_s": float(np.median(rates)), "prefill_ms": float(np.median(prefill)),
            "decode_tokens_per_s_best": float(np.max(rates)), "prefill_ms_best": float(np.min(prefill)),
            "decode_tokens_per_s_by_round": rate_by_round, "prefill_ms_by_round": prefill_by_round,
            "decode_step_p50_ms": float(np.median(steps)), "decode_step_p90_ms": float(np.percentile(steps, 90)),
            "runs": len(runs), "prefill_ms_all": prefill, "decode_tokens_per_s_all": rates}


def one_run(prefill_ms: float, steps_ms: list[float]) -> dict[str, Any]:
    return {"prefill_ms": prefill_ms, "steps_ms": steps_ms,
            "decode_tokens_per_s": len(steps_ms) * 1e3 / sum(steps_ms) if steps_ms else None}


def finish_worker(runs: list[dict[str, Any]], tokens: list[int], load_s: float, rss_after_load: int | None,
                  extra: dict[str, Any] | None = None) -> None:
    from focalrt.bench.memory import peak_rss_bytes

    print(json.dumps({"runs": runs, "tokens": tokens, "load_s": load_s, "rss_after_load_bytes": rss_after_load,
                      "peak_rss_bytes": peak_rss_bytes(), **(extra or {})}), flush=True)


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
            runs.append(one_run(prefill_ms, steps))
    finish_worker(runs, tokens, load_s, rss)


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
            runs.append(one_run((t[1] - t[0]) * 1e3, [(b - a) * 1e3 for a, b in zip(t[1:], t[2:], strict=False)]))
    finish_worker(runs, tokens, load_s, rss, {"torch": torch.__version__, "torch_threads": torch.get_num_threads()})


WORKERS = {"ours": worker_ours, "transformers": worker_transformers}


# ---------------------------------------------------------------- orchestration


def agreement(a: list[int], b: list[int]) -> int:
    """Leading tokens two greedy runs share: equal weights agree on (at least) the first ones."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def measure_sides(script: Path, sides: dict[str, dict[str, Any]], rounds: int,
                  after_round: Callable[[], None] | None = None) -> dict[str, dict[str, Any]]:
    """Every side in its own subprocess, `rounds` times in alternating order; pooled medians per side."""
    raw: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            spec = sides[name]
            print(f"round {r + 1}/{rounds}: {name} ...", file=sys.stderr, flush=True)
            raw[name].append(run_worker(script, spec.get("worker", name), spec))
        if after_round is not None:
            after_round()
    out = {}
    for name, results in raw.items():
        out[name] = {**summarize_side([res["runs"] for res in results]),
                     "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
                     "rss_after_load_bytes": max(r["rss_after_load_bytes"] or 0 for r in results),
                     "load_s": float(np.median([r["load_s"] for r in results])), "tokens": results[-1]["tokens"],
                     **{k: v for k, v in results[-1].items()
                        if k not in ("runs", "tokens", "peak_rss_bytes", "rss_after_load_bytes", "load_s")}}
    return out


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small", help="tiny-random, tiny-random-b or small (default)")
    p.add_argument("--bundle", type=Path, default=None, help="a preset bundle (default: the cache, exported once)")
    p.add_argument("--runs", type=int, default=4, help="timed generations per side and round (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations first (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="subprocesses per side, alternating order (default 3)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="prompt length (default: the bundle's region prompt, image tokens included)")
    p.add_argument("--threads", type=int, default=None, help="threads on every side (default: usable cores)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)


def base_spec(args) -> tuple[dict[str, Any], Path]:
    if args.runs < 1 or args.warmup < 0 or args.rounds < 1 or args.new_tokens < 2:
        raise SystemExit("need --runs >= 1, --warmup >= 0, --rounds >= 1 and --new-tokens >= 2")
    from focalrt.bench.environment import cpu_cores

    bundle = ensure_bundle(args.preset, args.bundle)
    length = args.prompt_tokens or region_prompt_length(bundle)
    spec = {"bundle": str(bundle), "preset": args.preset, "seed": bundle_seed(bundle),
            "ids": prompt_ids(bundle, length), "new_tokens": args.new_tokens, "runs": args.runs, "warmup": args.warmup,
            "threads": args.threads or cpu_cores()["usable"] or 1, "max_context": length + args.new_tokens}
    return spec, bundle


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(p)
    args = p.parse_args(argv)
    if args.worker:
        WORKERS[args.worker](json.loads(args.spec))
        return {}
    from focalrt.bench.environment import describe, environment
    from focalrt.bench.report import markdown_table, mib

    spec, bundle = base_spec(args)
    sides = measure_sides(Path(__file__).resolve(), {"ours": spec, "transformers": spec}, args.rounds)
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
        "greedy_tokens_agreeing": agreement(ours["tokens"], hf["tokens"]),
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
