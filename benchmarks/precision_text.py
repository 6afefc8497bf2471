"""Precision on real weights: a text bundle (SmolLM2-135M-Instruct) in fp16, int8 and int4, against fp32.

    python -m benchmarks.precision_text --bundle BUNDLE --out DIR [--windows 16] [--variants ...]

For each variant the decoder is converted with the project's own transforms (focalrt.calibration.quantize;
int4 through each of onnxruntime's MatMulNBits algorithms), the rest of the bundle is hard-linked, and:
- perplexity (focalrt perplexity's llama.cpp windowing, context 512) on CPython's reference docs as the
  standard library ships them (pydoc_data.topics), and its change against fp32;
- teacher-forced top-1 agreement and mean logit cosine: the fp32 model's greedy answer to each held-out
  prompt is fed back in one prefill, and each position's argmax is compared with the fp32 token;
- greedy agreement: the variant answers the held-out prompts itself (position-wise agreement, identical
  answers);
- decode tok/s: median decode step of a 64-token answer (2 threads; noisy on a shared machine);
- disk size of embed + decoder.
int8 is calibrated on decoder inputs recorded from calibration prompts, never the held-out ones.
Prints a markdown table and writes DIR/precision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

CALIBRATION_PROMPTS = [
    "What is the boiling point of water?", "Tell me about the history of Rome.", "How do airplanes fly?",
    "Write a haiku about autumn.", "What are the benefits of exercise?", "Explain what a computer program is.",
    "Describe a sunny day at the beach.", "Why is the sky blue?", "How do I make a cup of tea?",
    "What is machine learning?", "Summarize the plot of Romeo and Juliet.", "What causes earthquakes?",
    "Give three tips for studying.", "What is the tallest mountain in the world?", "How do vaccines work?",
    "Describe the facial expression of someone who is surprised.",
]
HELDOUT_PROMPTS = [
    "What is the capital of France?", "Explain step by step how photosynthesis works.",
    "Write a short story about a robot who learns to paint.", "Give me a detailed recipe for pancakes.",
    "Describe the facial expression of a person who is smiling broadly, in one sentence.",
    "What are the main differences between cats and dogs?", "How does a bicycle work?",
    "List five countries in Europe and their capitals.",
]


_PROMPT_BY_IDS: dict[tuple, str] = {}  # held-out prompt token ids -> prompt text


def cpython_topics_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def make_variant(src: Path, out: Path, name: str, feeds) -> dict:
    """The fp32 bundle's small files hard-linked, embed/decoder converted, the manifest rewritten. ONNX files
    are never hard-linked: onnx refuses external data with several links (its hardlink-attack check)."""
    from focalrt.bundle import file_record, load, write_manifest
    from focalrt.calibration import quantize as qz

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    bundle = load(src)
    replaced = {"decoder.onnx", "decoder.onnx.data", "manifest.json", "embed.onnx", "embed.onnx.data"}
    for f in src.iterdir():
        if f.name not in replaced:
            os.link(f, out / f.name)
    t = time.perf_counter()
    info: dict = {"precision": "fp32"}
    dec_src, dec_dst = bundle.component_path("decoder"), out / "decoder.onnx"
    if name == "fp16":
        info = qz.convert_fp16(dec_src, dec_dst)
    elif name == "int8-weights":  # focalrt convert --precision int8: weight-only, float activations
        info = qz.quantize_int8_weights(dec_src, dec_dst)
    elif name.startswith("int8"):
        exclude = qz.lm_head_nodes(qz.load_graph(dec_src), bundle.manifest["text"]["vocab_size"]) \
            if name.endswith("-keep-head") else []
        info = qz.quantize_qdq(dec_src, dec_dst, feeds, "int8", "minmax", exclude, None, True, "calibrating")
    else:  # int4-<algorithm>-<block>[-keep-head]
        parts = name.split("-")
        algorithm, block = parts[1], int(parts[2])
        exclude = qz.lm_head_nodes(qz.load_graph(dec_src), bundle.manifest["text"]["vocab_size"]) \
            if name.endswith("-keep-head") else []
        info = qz.quantize_int4(dec_src, dec_dst, exclude, block, algorithm, feeds)
    qz.convert_fp16_storage(bundle.component_path("embed"), out / "embed.onnx")
    seconds = time.perf_counter() - t
    manifest = {k: v for k, v in bundle.manifest.items() if k not in ("format", "format_version")}
    comps = dict(manifest["components"])
    for comp in ("embed", "decoder"):
        old = {k: v for k, v in comps[comp].items() if k not in ("file", "bytes", "sha256", "external_data")}
        comps[comp] = {**file_record(out, comps[comp]["file"]), **old}
    comps["decoder"]["precision"] = info.get("precision", name)
    manifest["components"] = comps
    write_manifest(out, manifest)
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith(("embed.onnx", "decoder.onnx")))
    return {"convert_seconds": round(seconds, 1), "disk_bytes": size, "quantization": info}


def calibration_feeds(pipe) -> list:
    """Decoder inputs recorded while the fp32 model answers the calibration prompts (never the held-out ones)."""
    from focalrt.calibration.record import recording

    with recording(pipe) as recorder:
        for prompt in CALIBRATION_PROMPTS:
            recorder.call = 0
            pipe.describe_text(prompt, max_new_tokens=16)
    return recorder.recording.decoder


def references(pipe, new_tokens: int, count: int) -> list[tuple[list[int], list[int], list[np.ndarray]]]:
    out = []
    for prompt in HELDOUT_PROMPTS[:count]:
        d = pipe.describe_text(prompt, max_new_tokens=new_tokens, return_logits=True)
        tokens = [int(np.argmax(lg)) for lg in d.logits]  # includes the stop token when it stopped
        out.append((d.prompt_token_ids, tokens, d.logits))
    return out


def teacher_forced(pipe, prompt_ids: list[int], ref_tokens: list[int]) -> np.ndarray:
    """Logits at every reference position from one prefill of prompt + reference tokens (all but the last)."""
    from focalrt.runtime.generation.generate import PromptCache

    ids = np.array(prompt_ids + ref_tokens[:-1], np.int64)
    t = pipe.text_cfg
    cache = PromptCache.allocate(t["num_layers"], 1, t["num_kv_heads"], t["head_dim"], ids.size, "cpu")
    return pipe.model.forward(ids[None], np.arange(ids.size)[None], cache, ids.size, keep=len(ref_tokens))[0]


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def measure(bundle: Path, refs, text_ids, windows: int, new_tokens: int) -> dict:
    from focalrt.calibration.gate import greedy_agreement
    from focalrt.runtime.generation.perplexity import measure as perplexity
    from focalrt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle, provider="cpu", threads=2)
    ppl = perplexity(pipe, text_ids, 512, None, windows)
    top1, cos, agree, identical = [], [], [], 0
    for (prompt_ids, ref_tokens, ref_logits) in refs:
        forced = teacher_forced(pipe, prompt_ids, ref_tokens)
        top1 += [int(np.argmax(forced[i])) == ref_tokens[i] for i in range(len(ref_tokens))]
        cos += [cosine(forced[i], ref_logits[i]) for i in range(len(ref_tokens))]
        d = pipe.describe_text(_PROMPT_BY_IDS[tuple(prompt_ids)], max_new_tokens=len(ref_tokens),
                               return_logits=True)
        got = [int(np.argmax(lg)) for lg in d.logits]
        rate, first = greedy_agreement(ref_tokens, got)
        agree.append(rate)
        identical += first is None
    d = pipe.describe_text(HELDOUT_PROMPTS[2], max_new_tokens=new_tokens)
    steps = d.timings_ms["decode_steps"]
    return {"perplexity": ppl["perplexity"], "scored_tokens": ppl["scored_tokens"], "windows": ppl["windows"],
            "top1": float(np.mean(top1)), "logit_cosine": float(np.mean(cos)),
            "greedy_agreement": float(np.mean(agree)), "identical_answers": identical,
            "decode_tok_s": 1000.0 / statistics.median(steps) if steps else None,
            "prefill_ms": d.timings_ms["prefill"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="the fp32 text bundle")
    ap.add_argument("--out", required=True, help="folder for the variant bundles and precision.json")
    ap.add_argument("--windows", type=int, default=16, help="perplexity windows of 512 tokens (default 16)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per held-out answer (default 32)")
    ap.add_argument("--heldout", type=int, default=len(HELDOUT_PROMPTS),
                    help=f"held-out prompts (default all {len(HELDOUT_PROMPTS)})")
    ap.add_argument("--decode-tokens", type=int, default=64, help="answer length timed for decode tok/s")
    ap.add_argument("--keep-quantization", type=Path, metavar="BUNDLE",
                    help="also measure this bundle (`focalrt export --preset smollm2-135m --keep-quantization`: "
                         "the GGUF's own Q4_1/Q8_0 blocks) as the row 'gguf-grid'")
    ap.add_argument("--keep", action="store_true", help="keep the variant bundles (for benchmarks/compare_text.py)")
    ap.add_argument("--variants", nargs="+", default=[
        "fp32", "fp16", "int8", "int8-weights", "int4-rtn-32", "int4-rtn-128", "int4-rtn_asym-32", "int4-rtn_asym-128",
        "int4-hqq-32", "int4-hqq-128", "int4-gptq-128", "int4-rtn-128-keep-head", "int4-hqq-128-keep-head"])
    args = ap.parse_args()
    from focalrt.runtime.generation.perplexity import text_tokens
    from focalrt.runtime.pipeline import Pipeline

    src, out = Path(args.bundle), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fp32 = Pipeline.from_bundle(src, provider="cpu", threads=2)
    for prompt in HELDOUT_PROMPTS:
        _PROMPT_BY_IDS[tuple(fp32.build_text_prompt(prompt).token_ids.tolist())] = prompt
    text_ids, _ = text_tokens(fp32, cpython_topics_text())
    refs = references(fp32, args.new_tokens, args.heldout)
    feeds = None
    results_path = out / "precision.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in args.variants:
        try:
            if name == "fp32":  # measured in place
                size = sum(f.stat().st_size for f in src.iterdir() if f.name.startswith(("embed.onnx", "decoder.onnx")))
                made = {"disk_bytes": size, "quantization": {"precision": "fp32"}}
                results[name] = {**made, **measure(src, refs, text_ids, args.windows, args.decode_tokens)}
            else:
                if feeds is None and (name.startswith("int8") or "gptq" in name):
                    feeds = calibration_feeds(fp32)
                made = make_variant(src, out / name, name, feeds)
                results[name] = {**made, **measure(out / name, refs, text_ids, args.windows, args.decode_tokens)}
        except Exception as e:  # report every method tried, including the ones that fail
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        results_path.write_text(json.dumps(results, indent=1, default=str))
        print(name, {k: v for k, v in results[name].items() if k != "quantization"}, flush=True)
        if name != "fp32" and not args.keep:
            shutil.rmtree(out / name, ignore_errors=True)  # keep the disk use down; sizes are recorded
    if args.keep_quantization:
        b = args.keep_quantization
        size = sum(f.stat().st_size for f in b.iterdir() if f.name.startswith(("embed.onnx", "decoder.onnx")))
        quant = json.loads((b / "manifest.json").read_text())["components"]["decoder"].get("quantization", {})
        results["gguf-grid"] = {"disk_bytes": size, "quantization": quant,
                                **measure(b, refs, text_ids, args.windows, args.decode_tokens)}
        results_path.write_text(json.dumps(results, indent=1, default=str))
        print("gguf-grid", {k: v for k, v in results["gguf-grid"].items() if k != "quantization"}, flush=True)
    base = results.get("fp32", {}).get("perplexity")
    print("| variant | perplexity | change | top-1 (teacher forced) | logit cosine | greedy agreement | "
          "identical answers | decode tok/s | disk MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:80]} | | | | | | | |")
            continue
        change = f"{100 * (r['perplexity'] / base - 1):+.2f}%" if base else "-"
        print(f"| {name} | {r['perplexity']:.3f} | {change} | {r['top1']:.3f} | {r['logit_cosine']:.4f} | "
              f"{r['greedy_agreement']:.3f} | {r['identical_answers']}/{args.heldout} | "
              f"{r['decode_tok_s']:.1f} | {r['disk_bytes'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
