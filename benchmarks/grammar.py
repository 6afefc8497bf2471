"""Cost of the JSON-schema token mask per decode step, beside the decode step itself, same loop.

    python benchmarks/grammar.py                            # tiny-random bundle (exported once to the cache)
    python benchmarks/grammar.py --preset small --tokens 128
    python benchmarks/grammar.py --tokenizer path/to/tokenizer.json --vocab 49152 --stop 2
                                                            # mask cost alone for another tokenizer (SmolLM2)

One greedy constrained decode of the bundle's random-weight model: prefill a prompt as long as a region
prompt, then per step time (a) the decoder call (`decode_one_token`) and (b) the grammar processor on that
step's logits (feed the last token to llguidance's matcher, compute the bitmask, set forbidden logits to
-inf). The default face-state schema is used; a finished object starts a new one until --tokens steps are
timed. Medians are reported with the mask/decode ratio (the issue's budget is 10 %). Compiling the schema
and building llguidance's view of the tokenizer happen once, before timing, and are reported separately.
With --tokenizer only the mask is timed, on random logits (there is no decoder to compare with).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _median_ms(xs: list[float]) -> float:
    return float(np.median(xs)) * 1e3


def bundle_run(bundle: Path, tokens: int, threads: int | None) -> dict:
    from decode import prompt_ids, region_prompt_length

    from focalrt.bench.measure import text_positions
    from focalrt.runtime.generate import batch_positions, decode_one_token, prefill
    from focalrt.runtime.grammar import compile_schema
    from focalrt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle, provider="cpu", threads=threads)
    vocab = int(pipe.text_cfg["vocab_size"])
    t0 = time.perf_counter()
    compiled = compile_schema("face_state", pipe.tokenizer, vocab, sorted(pipe.stop_ids))
    compile_s = time.perf_counter() - t0
    ids = np.asarray(prompt_ids(bundle, region_prompt_length(bundle)), np.int64)[None]
    positions = batch_positions(text_positions(ids.shape[1], pipe.model.rope_axes), 1)
    delta = np.zeros(1, np.int64)
    cache = pipe.cache.view(0, 1)
    decode_s: list[float] = []
    mask_s: list[float] = []
    objects = 0
    while len(decode_s) < tokens:
        cache.lengths[:] = 0
        processor = compiled.processor()
        history = ids[0].tolist()
        logits = prefill(pipe.model, cache, ids, positions)
        for _ in range(512):
            s = time.perf_counter()
            masked = processor(history, logits[0])
            mask_s.append(time.perf_counter() - s)
            token = int(np.argmax(masked))
            if token in pipe.stop_ids or len(decode_s) >= tokens:
                break
            history.append(token)
            s = time.perf_counter()
            logits = decode_one_token(pipe.model, cache, np.array([token], np.int64), delta)
            decode_s.append(time.perf_counter() - s)
        objects += 1
    decode_ms, mask_ms = _median_ms(decode_s), _median_ms(mask_s)
    return {"bundle": str(bundle), "vocab": vocab, "compile_s": round(compile_s, 2), "steps": len(decode_s),
            "objects_started": objects, "decode_step_p50_ms": round(decode_ms, 3), "mask_p50_ms": round(mask_ms, 3),
            "mask_over_decode": round(mask_ms / decode_ms, 4)}


def tokenizer_run(path: Path, vocab: int, stop: list[int], tokens: int) -> dict:
    from tokenizers import Tokenizer

    from focalrt.runtime.grammar import compile_schema

    tok = Tokenizer.from_file(str(path))
    t0 = time.perf_counter()
    compiled = compile_schema("face_state", tok, vocab, stop)
    compile_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    mask_s: list[float] = []
    while len(mask_s) < tokens:
        processor, history = compiled.processor(), [0]
        for _ in range(512):
            logits = rng.random(vocab, dtype=np.float32)
            s = time.perf_counter()
            masked = processor(history, logits)
            mask_s.append(time.perf_counter() - s)
            token = int(np.argmax(masked))
            if token in stop:
                break
            history.append(token)
    return {"tokenizer": str(path), "vocab": vocab, "compile_s": round(compile_s, 2), "steps": len(mask_s),
            "mask_p50_ms": round(_median_ms(mask_s), 3)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-random", help="bundle preset, exported once to the cache")
    p.add_argument("--bundle", type=Path, default=None, help="an exported bundle instead of --preset")
    p.add_argument("--tokens", type=int, default=96, help="decode steps to time")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--tokenizer", type=Path, default=None, help="time the mask alone for this tokenizer.json")
    p.add_argument("--vocab", type=int, default=None, help="logits width for --tokenizer (default: its size)")
    p.add_argument("--stop", type=int, action="append", default=[], help="stop token id(s) for --tokenizer")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    report: dict = {"machine": platform.machine(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if args.tokenizer:
        if not args.stop:
            p.error("--tokenizer needs --stop ID (the tokenizer's end-of-turn token id)")
        from tokenizers import Tokenizer

        vocab = args.vocab or Tokenizer.from_file(str(args.tokenizer)).get_vocab_size()
        report["mask_only"] = r = tokenizer_run(args.tokenizer, vocab, args.stop, args.tokens)
        print(f"{args.tokenizer}: vocab {vocab}, schema compiled in {r['compile_s']} s, "
              f"mask p50 {r['mask_p50_ms']:.3f} ms over {r['steps']} steps")
    else:
        from decode import ensure_bundle

        bundle = args.bundle or ensure_bundle(args.preset)
        report["constrained_decode"] = r = bundle_run(bundle, args.tokens, args.threads)
        print(f"{bundle}: vocab {r['vocab']}, schema compiled in {r['compile_s']} s; {r['steps']} steps: "
              f"decode p50 {r['decode_step_p50_ms']:.3f} ms, mask p50 {r['mask_p50_ms']:.3f} ms, "
              f"mask/decode {r['mask_over_decode']:.1%}")
    print(f"load average {report['load_average']} on {report['cpus']} CPUs (timings are noisy when shared)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
