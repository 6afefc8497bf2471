"""What the benchmarks share: the cached preset bundles, prompts, one subprocess per measured side, and medians.

Run every benchmark from a checkout's root as a module, `python -m benchmarks.NAME`; the scripts import each
other as `benchmarks.NAME` and start their workers the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # the checkout: workers run `python -m benchmarks.NAME` from here
CACHE = Path(os.environ.get("FOCALRT_CACHE", Path.home() / ".cache" / "focalrt"))



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


def run_worker(module: str, side: str, spec: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run one side in a fresh interpreter (`python -m module --worker side`, from the checkout's root, so its
    peak RSS is its own and no caches are shared); it prints one JSON line last."""
    cmd = [sys.executable, "-m", module, "--worker", side, "--spec", json.dumps(spec)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
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




def agreement(a: list[int], b: list[int]) -> int:
    """Leading tokens two greedy runs share: equal weights agree on (at least) the first ones."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def measure_sides(module: str, sides: dict[str, dict[str, Any]], rounds: int,
                  after_round: Callable[[], None] | None = None) -> dict[str, dict[str, Any]]:
    """Every side in its own subprocess, `rounds` times in alternating order; pooled medians per side."""
    raw: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            spec = sides[name]
            print(f"round {r + 1}/{rounds}: {name} ...", file=sys.stderr, flush=True)
            raw[name].append(run_worker(module, spec.get("worker", name), spec))
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
