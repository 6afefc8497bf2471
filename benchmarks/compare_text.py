"""A trained text model side by side in one run: SmolLM2-135M-Instruct from its GGUF.

    python -m benchmarks.compare_text --bundle BUNDLE [--int8 B] [--int4 B] [--keep-quantization B]
                                      [--llama-cpp DIR] [--rounds 2]

Rows (each in its own subprocess, rounds in alternating order, same threads, same prompt token ids, the same
context budget of prompt + new tokens on every side):
  - focalrt fp32 (the exported bundle) and, when given, our int8 / int4 bundles and the --keep-quantization
    bundle (the GGUF's own Q4_1/Q8_0 blocks, compared against llama.cpp on the same file);
  - transformers fp32 on the same GGUF (dequantized by transformers; generate());
  - onnxruntime-genai fp32 and int4 (block 32 and its default algorithm), built by its own model builder
    from a dequantized HF directory written here (safetensors + config.json + tokenizer), since
    transformers' save_pretrained refuses a GGUF-loaded model;
  - with --llama-cpp DIR (built with cmake): llama.cpp's llama-bench on the very GGUF file (Q4_1 as
    shipped), plus F32 and Q8_0 made from it by its own llama-quantize (--allow-requantize); a llama-bench
    that dies of a signal with its default repack (AMX on Xeon VMs) is rerun with --repack 0, which its row
    names.
Reported: prefill ms, decode tok/s (median step), peak RSS, how many greedy tokens agree with ours, and the
decode ratios the targets name.
The prompt is the chat-template prompt of a question; generation is forced to --new-tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import compare, decode, harness  # compare: the genai and llama.cpp workers; decode: ours

CACHE = harness.CACHE
KEPT_ROW = "focalrt GGUF grid (--keep-quantization)"
QUESTION = "Write a short story about a robot who learns to paint."


def worker_transformers_gguf(spec: dict[str, Any]) -> None:
    import torch

    from focalrt.bench.memory import current_rss_bytes
    from focalrt.export.text import load_checkpoint

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    model, _ = load_checkpoint(spec["gguf"])
    decode.time_transformers(model, spec, time.perf_counter() - t0, current_rss_bytes())


def worker_hf_dir(spec: dict[str, Any]) -> None:
    """The GGUF's dequantized weights as a plain HF checkpoint directory (what genai's builder reads)."""
    from safetensors.torch import save_file

    from focalrt.export.text import load_checkpoint

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_checkpoint(spec["gguf"])
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: shares the embedding's memory, which safetensors refuses
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    cfg["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    tok.save_pretrained(str(out))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": tok.bos_token_id,
                                                            "eos_token_id": tok.eos_token_id}))
    print(json.dumps({"checkpoint": str(out)}))


WORKERS = {**decode.WORKERS, "transformers_gguf": worker_transformers_gguf, "hf_dir": worker_hf_dir,
           "genai": compare.worker_genai, "llamacpp": compare.worker_llamacpp}


def ensure_hf_dir(gguf: Path) -> Path:
    out = CACHE / "checkpoints" / gguf.stem
    if not (out / "model.safetensors").is_file():
        print(f"writing the dequantized HF directory {out} (once) ...", file=sys.stderr, flush=True)
        harness.run_worker("benchmarks.compare_text", "hf_dir", {"gguf": str(gguf), "out": str(out)})
    return out


def ensure_llamacpp_gguf(gguf: Path, llama_cpp: Path, kind: str) -> Path:
    """F32 / Q8_0 from the shipped Q4_1 file by llama.cpp's own quantizer (requantizing, as it must)."""
    if kind == "Q4_1":
        return gguf
    out = CACHE / "llamacpp" / f"{gguf.stem}-{kind}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([str(llama_cpp / "build" / "bin" / "llama-quantize"), "--allow-requantize", str(gguf),
                               str(out), kind], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"llama-quantize {kind} failed: {proc.stderr[-800:]}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="our fp32 text bundle (focalrt export --preset smollm2-135m)")
    p.add_argument("--int8", type=Path, help="our int8 bundle")
    p.add_argument("--int4", type=Path, help="our int4 bundle")
    p.add_argument("--keep-quantization", type=Path, metavar="BUNDLE",
                   help="our bundle from `focalrt export --preset smollm2-135m --keep-quantization` (the GGUF's "
                        "Q4_1/Q8_0 blocks as they are)")
    p.add_argument("--llama-cpp", type=Path, help="llama.cpp tree with build/bin/llama-bench and llama-quantize")
    p.add_argument("--skip-genai", action="store_true")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--worker")
    p.add_argument("--spec")
    args = p.parse_args()
    if args.worker:
        WORKERS[args.worker](json.loads(args.spec))
        return
    from focalrt.bench.environment import describe, environment
    from focalrt.bench.report import markdown_table, mib
    from focalrt.export.text import locate_preset
    from focalrt.runtime.pipeline import Pipeline

    gguf = locate_preset("smollm2-135m")
    ids = Pipeline.from_bundle(args.bundle, provider="cpu").build_text_prompt(QUESTION).token_ids.tolist()
    spec = {"ids": ids, "new_tokens": args.new_tokens, "runs": args.runs, "warmup": args.warmup,
            "threads": args.threads, "max_context": len(ids) + args.new_tokens}
    sides: dict[str, dict[str, Any]] = {"focalrt fp32": {**spec, "worker": "ours", "bundle": str(args.bundle)}}
    for name, path in (("focalrt int8", args.int8), ("focalrt int4", args.int4),
                       (KEPT_ROW, args.keep_quantization)):
        if path:
            sides[name] = {**spec, "worker": "ours", "bundle": str(path)}
    sides["transformers fp32 (GGUF dequantized)"] = {**spec, "worker": "transformers_gguf", "gguf": str(gguf)}
    notes: list[str] = []
    if not args.skip_genai:
        hf = ensure_hf_dir(gguf)
        for precision in ("fp32", "int4"):
            try:
                model_dir = compare.ensure_genai_model(hf, precision, 32)
                sides[f"onnxruntime-genai {precision}"] = {**spec, "worker": "genai", "model_dir": str(model_dir)}
            except RuntimeError as e:
                notes.append(f"onnxruntime-genai {precision}: {e}")
    if args.llama_cpp:
        for kind in ("Q4_1", "Q8_0", "F32"):
            try:
                path = ensure_llamacpp_gguf(gguf, args.llama_cpp, kind)
                sides[f"llama.cpp {kind}"] = {**spec, "worker": "llamacpp", "gguf": str(path),
                                              "llama_cpp": str(args.llama_cpp)}
            except RuntimeError as e:
                notes.append(str(e))
    results = harness.measure_sides("benchmarks.compare_text", sides, args.rounds)
    ours = results["focalrt fp32"]
    rows = []
    for name, r in results.items():
        same = f"{harness.agreement(r['tokens'], ours['tokens'])}/{args.new_tokens}" if r["tokens"] else "-"
        notes += [f"{name}: {note}" for note in dict.fromkeys(r.get("notes") or [])]
        rows.append([compare.row_name(name, r), r["quiet_prefill_ms"], r["quiet_decode_tokens_per_s"],
                     r["decode_tokens_per_s"], mib(r["peak_rss_bytes"]), same])
    ratios = decode_ratios(results)
    env = environment(["CPUExecutionProvider"], args.threads)
    print(f"\nSmolLM2-135M-Instruct: prompt {len(ids)} tokens, {args.new_tokens} new tokens, greedy, batch 1; "
          f"{args.rounds} rounds x {args.runs} runs after {args.warmup} warm-up; {args.threads} threads; "
          f"'quiet' = median of the least disturbed round; {compare.CONTEXT_NOTE.format(n=spec['max_context'])}")
    print(describe(env) + "\n")
    print(markdown_table(["runtime", "prefill ms (quiet)", "decode tok/s (quiet)", "decode tok/s (all runs)",
                          "peak RSS", "greedy tokens equal to focalrt fp32"], rows))
    if ratios:
        print("\ndecode ratios (quiet medians): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    for note in notes:
        print(f"- {note}")
    if args.json:
        args.json.write_text(json.dumps({"rows": results, "environment": env, "notes": notes, "ratios": ratios,
                                         "prompt_tokens": len(ids), "context_budget": spec["max_context"]},
                                        indent=1, default=str) + "\n")


# (ours, baseline) pairs whose decode ratio the targets name.
RATIOS = ((KEPT_ROW, "llama.cpp Q4_1"), ("focalrt int4", "llama.cpp Q4_1"), ("focalrt int4", "onnxruntime-genai int4"),
          ("focalrt int8", "llama.cpp Q8_0"), ("focalrt fp32", "onnxruntime-genai fp32"),
          ("focalrt fp32", "llama.cpp F32"), (KEPT_ROW, "focalrt int4"))


def decode_ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    rate = "quiet_decode_tokens_per_s"
    return {f"{a} / {b}": results[a][rate] / results[b][rate] for a, b in RATIOS if a in results and b in results}



if __name__ == "__main__":
    main()
