"""Our runtime against the baselines, side by side in one invocation, on the same weights and prompt.

    python -m benchmarks.compare --preset small [--json out.json] [--skip-int4]

Rows:
  1. focalrt, fp32 bundle and an int4 bundle (`focalrt convert --precision int4`);
  2. transformers generate(), PyTorch eager fp32 on the CPU;
  3. onnxruntime-genai, fp32 and int4, built by its own model builder from the same weights saved as a
     local Qwen2_5_VLForConditionalGeneration checkpoint (text decoder `qwen2_5_vl_text`);
  3b. with --llama-cpp DIR (a llama.cpp tree built with cmake): llama.cpp f32 and Q4_0, converted from that
     checkpoint by llama.cpp's own convert_hf_to_gguf.py and llama-quantize, timed by its llama-bench
     (prefill from an empty cache; decode at the prompt's depth). No token ids: speed only;
  4. the roofline: measured memory bandwidth / weight bytes read per token.

Every runtime runs in its own subprocess (honest peak RSS, no shared caches), `--rounds` times in
alternating order, with the same thread count. Prefill = prompt in -> first new token chosen; a decode
step = one more token. Medians over all timed runs. Built artefacts are cached under
~/.cache/focalrt (FOCALRT_CACHE).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import decode, harness
from focalrt.calibration.quantize import INT4_BLOCK_SIZE

CACHE = harness.CACHE
# Every runtime gets the context the run needs: ours a KV cache of one slot and prompt + new tokens,
# onnxruntime-genai max_length = prompt + new tokens, llama-bench the context of each of its tests.
CONTEXT_NOTE = "context budget {n} tokens on every side (prompt + new tokens, one sequence)"
GENAI_PRECISIONS = ("fp32", "int4")


# ---------------------------------------------------------------- building the baselines


def worker_checkpoint(spec: dict[str, Any]) -> None:
    """Save the preset's random model as a local HF checkpoint, with our tokenizer, for the genai builder."""
    from transformers import GenerationConfig

    from focalrt.export.qwen2_5_vl import build_random_model

    out = Path(spec["out"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_random_model(spec["preset"], spec["seed"]).save_pretrained(tmp)
    shutil.copy(Path(spec["bundle"]) / "tokenizer.json", tmp / "tokenizer.json")
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "model_max_length": 32768}))
    GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643, do_sample=False).save_pretrained(tmp)
    tmp.rename(out)
    print(json.dumps({"checkpoint": str(out)}))


def ensure_checkpoint(spec: dict[str, Any]) -> Path:
    out = CACHE / "checkpoints" / f"{spec['preset']}-seed{spec['seed']}"
    if not (out / "config.json").is_file():
        print(f"saving the {spec['preset']} checkpoint to {out} (once) ...", file=sys.stderr, flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        harness.run_worker("benchmarks.compare", "checkpoint", {**spec, "out": str(out)})
    return out


def ensure_genai_model(checkpoint: Path, precision: str, block: int) -> Path:
    """onnxruntime-genai's own build of the checkpoint: `python -m onnxruntime_genai.models.builder`; int4
    with `block` weights per scale, as ours."""
    out = CACHE / "genai" / (f"{checkpoint.name}-{precision}" + (f"-b{block}" if precision == "int4" else ""))
    if (out / "genai_config.json").is_file():
        return out
    print(f"building the onnxruntime-genai {precision} model in {out} (once) ...", file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log = out.with_name(out.name + ".build.log")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(tmp),
           "-p", precision, "-e", "cpu", "-c", str(CACHE / "genai" / "hf-cache")]
    if precision == "int4":
        cmd += ["--extra_options", f"block_size={block}"]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not (tmp / "genai_config.json").is_file():
        raise RuntimeError(f"the onnxruntime-genai builder failed (exit {proc.returncode}); see {log}")
    tmp.rename(out)
    return out


def calibration_frames() -> Path:
    """Eight frames of a real face (scikit-image's astronaut, panned) for `focalrt convert --data`."""
    import cv2
    from skimage.data import astronaut

    out = CACHE / "bench-frames"
    if len(list(out.glob("*.png"))) >= 8:
        return out
    out.mkdir(parents=True, exist_ok=True)
    image = cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR)
    h, w = image.shape[:2]
    for i in range(8):
        shifted = cv2.warpAffine(image, np.float32([[1, 0, 6 * i], [0, 1, 3 * i]]), (w, h),
                                 borderMode=cv2.BORDER_REFLECT)
        cv2.imwrite(str(out / f"frame{i}.png"), shifted)
    return out


def int4_bundle(bundle: Path, block: int) -> tuple[Path | None, str | None]:
    """Our int4 bundle at `block` weights per scale, made once with `focalrt convert --precision int4` and
    remade when the fp32 bundle's decoder changed.

    Random weights make the accuracy gate meaningless, so the bundle is written whatever the gate says
    (--force) and without float fallback (--no-fallback): a pure int4 decoder, like the genai int4 row.
    """
    from focalrt.bundle import load

    out = bundle.with_name(f"{bundle.name}-int4-b{block}")
    decoder_sha = load(bundle).manifest["components"]["decoder"]["sha256"]
    if (out / "manifest.json").is_file():
        made_from = json.loads((out / "manifest.json").read_text()).get("calibration", {}).get("source_bundle", {})
        if made_from.get("decoder_sha256") == decoder_sha:
            return out, None
    print(f"converting {bundle} to int4 (block {block}) in {out} ...", file=sys.stderr, flush=True)
    argv = ["convert", str(bundle), "--precision", "int4", "--block-size", str(block), "--out", str(out),
            "--data", str(calibration_frames()), "--force", "--no-fallback", "--overwrite", "--quiet"]
    log = out.with_name(out.name + ".convert.log")
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "focalrt.cli", *argv], stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not (out / "manifest.json").is_file():
        return None, f"no int4 row for focalrt: `focalrt {' '.join(argv)}` failed (exit {proc.returncode}); see {log}"
    return out, None


# ---------------------------------------------------------------- the onnxruntime-genai worker


def worker_genai(spec: dict[str, Any]) -> None:
    """Same prompt through og.Generator: append_tokens + the first generate_next_token is the prefill."""
    import onnxruntime_genai as og

    from focalrt.bench.memory import current_rss_bytes

    t0 = time.perf_counter()
    config = og.Config(spec["model_dir"])
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": spec["threads"], "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    load_s, rss = time.perf_counter() - t0, current_rss_bytes()
    ids = np.asarray(spec["ids"], np.int32)
    n = spec["new_tokens"]
    runs, tokens = [], []
    for i in range(spec["warmup"] + spec["runs"]):
        params = og.GeneratorParams(model)
        # max_length bounds the shared KV buffer, as our runtime's max_context does; min_length keeps
        # an end-of-text token from cutting the run short.
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        gen = og.Generator(model, params)
        s0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        prefill_ms = (time.perf_counter() - s0) * 1e3
        tokens, steps = [int(gen.get_next_tokens()[0])], []
        for _ in range(n - 1):
            s0 = time.perf_counter()
            gen.generate_next_token()
            steps.append((time.perf_counter() - s0) * 1e3)
            tokens.append(int(gen.get_next_tokens()[0]))
        del gen
        if i >= spec["warmup"]:
            runs.append(harness.one_run(prefill_ms, steps))
    harness.finish_worker(runs, tokens, load_s, rss, {"onnxruntime_genai": og.__version__})


# ---------------------------------------------------------------- the llama.cpp worker

LLAMA_CPP_TYPES = {"fp32": "f32", "int4": "q4_0"}  # our precision -> llama.cpp type (Q4_0: blocks of 32)


def ensure_gguf(checkpoint: Path, llama_cpp: Path, precision: str) -> Path:
    """The checkpoint as GGUF, converted by llama.cpp's own script (f32) and quantizer (Q4_0), once."""
    out_dir = CACHE / "llamacpp"
    out_dir.mkdir(parents=True, exist_ok=True)
    f32 = out_dir / f"{checkpoint.name}-f32.gguf"
    if not f32.is_file():
        print(f"converting {checkpoint} to GGUF with llama.cpp (once) ...", file=sys.stderr, flush=True)
        tmp = f32.with_name(f32.name + ".tmp")
        env = {**os.environ, "PYTHONPATH": str(llama_cpp / "gguf-py")}
        proc = subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(checkpoint),
                               "--outfile", str(tmp), "--outtype", "f32"], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"llama.cpp's convert_hf_to_gguf.py failed:\n{proc.stderr[-1500:]}\n(it needs "
                               f"`pip install sentencepiece` for Qwen2.5-VL checkpoints)")
        tmp.rename(f32)
    kind = LLAMA_CPP_TYPES[precision]
    if kind == "f32":
        return f32
    out = out_dir / f"{checkpoint.name}-{kind}.gguf"
    if not out.is_file():
        tmp = out.with_name(out.name + ".tmp")
        proc = subprocess.run([str(llama_cpp / "build" / "bin" / "llama-quantize"), str(f32), str(tmp), kind.upper()],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"llama-quantize failed:\n{proc.stderr[-1500:]}")
        tmp.rename(out)
    return out


def llama_bench_failure(proc: subprocess.CompletedProcess) -> str:
    """What killed llama-bench, in words: the signal or exit code and the last lines it wrote."""
    code = proc.returncode
    how = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() \
        else f"exit {code}"
    tail = "\n".join((proc.stderr or "").strip().splitlines()[-8:]) or "(nothing on stderr)"
    return f"llama-bench {how}: {tail}"


def crashed_in_repack(proc: subprocess.CompletedProcess) -> bool:
    """llama-bench died of a signal (SIGSEGV/SIGILL/SIGBUS), as llama.cpp's AMX repack path
    (`ggml_backend_amx_mul_mat`) does on Xeon VMs whose AMX tiles are advertised but not usable; it writes
    nothing before dying (`-o json` holds its output until the end). `--repack 0` leaves the CPU's extra
    (repacked) buffer types out, AMX included."""
    return proc.returncode in (-signal.SIGSEGV, -signal.SIGILL, -signal.SIGBUS, 128 + signal.SIGSEGV)


def worker_llamacpp(spec: dict[str, Any]) -> None:
    """llama.cpp's own `llama-bench`: prefill of the prompt length from an empty cache, then decode steps
    at that depth (-d), same thread count; one repetition per timed run. No token ids come back. Its
    context is what each test needs (prompt, or depth + generated tokens), like ours and genai's here.
    If it dies of a signal with the default repack (AMX on Xeon VMs), it is run again with `--repack 0`
    and the result says so."""
    import resource

    bench = Path(spec["llama_cpp"]) / "build" / "bin" / "llama-bench"
    n_prompt, n_gen, reps = len(spec["ids"]), spec["new_tokens"], spec["runs"]
    notes: list[str] = []
    extra: list[str] = list(spec.get("llama_bench_args", []))

    def run(args: list[str]) -> list[float]:
        cmd = [str(bench), "-m", spec["gguf"], "-t", str(spec["threads"]), "-r", str(reps), "-o", "json", *args]
        proc = subprocess.run(cmd + extra, capture_output=True, text=True)
        if proc.returncode != 0 and crashed_in_repack(proc) and "--repack" not in extra:
            notes.append(f"{llama_bench_failure(proc).splitlines()[0]} with the default repack (llama.cpp's AMX "
                         f"path on this CPU); rerun with --repack 0")
            extra.extend(["--repack", "0"])
            proc = subprocess.run(cmd + extra, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(llama_bench_failure(proc))
        return [float(x) for x in json.loads(proc.stdout)[0]["samples_ts"]]

    t0 = time.perf_counter()
    prefill_ts = run(["-p", str(n_prompt), "-n", "0"])
    decode_ts = run(["-p", "0", "-n", str(n_gen - 1), "-d", str(n_prompt)])
    runs = [harness.one_run(n_prompt / pp * 1e3, [1e3 / tg] * (n_gen - 1))
            for pp, tg in zip(prefill_ts, decode_ts, strict=False)]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"runs": runs, "tokens": [], "load_s": time.perf_counter() - t0, "rss_after_load_bytes": None,
                      "peak_rss_bytes": peak, "llama_cpp": str(spec["llama_cpp"]), "llama_bench_args": extra,
                      "notes": notes}), flush=True)


def row_name(name: str, result: dict[str, Any]) -> str:
    """A row's name, with how llama-bench had to be run when it was not its default."""
    args = result.get("llama_bench_args") or []
    if "--repack" in args and result.get("notes"):
        return f"{name} (--repack 0: crashed with the default repack)"
    return name


WORKERS = {**decode.WORKERS, "genai": worker_genai, "checkpoint": worker_checkpoint, "llamacpp": worker_llamacpp}


# ---------------------------------------------------------------- orchestration


def onnx_weight_bytes_per_token(path: Path) -> int:
    """Initializer bytes one decode step reads from an ONNX model: all of them, except that a table only
    ever gathered from (a token embedding) counts one row. Read from the graph, so int4 packing counts
    as stored."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(path), load_external_data=False).graph
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in graph.initializer:
        dims = list(init.dims)
        if init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            nbytes = (int(np.prod(dims)) + 1) // 2
        else:
            nbytes = int(np.prod(dims)) * np.dtype(tensor_dtype_to_np_dtype(init.data_type)).itemsize
        if consumers.get(init.name) and consumers[init.name] <= {"Gather", "GatherBlockQuantized"} and dims:
            nbytes //= max(dims[0], 1)
        total += nbytes
    return total


def focalrt_weight_bytes(bundle: Path) -> int:
    """Decoder initializers plus one embedding row, counted from the graphs like the genai model's."""
    from focalrt.bundle import load

    m = load(bundle).manifest
    decoder = onnx_weight_bytes_per_token(bundle / m["components"]["decoder"]["file"])
    row_bytes = 2 if m["components"]["embed"].get("precision") in ("fp16", "bf16") else 4
    return decoder + int(m["text"]["hidden_size"]) * row_bytes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.common_args(p)
    p.add_argument("--skip-int4", action="store_true", help="only the fp32 rows")
    p.add_argument("--int4-block-size", type=int, default=INT4_BLOCK_SIZE,
                   help=f"int4 weights per scale, for ours and genai's (default {INT4_BLOCK_SIZE}, ours)")
    p.add_argument("--skip-genai", action="store_true", help="leave out onnxruntime-genai")
    p.add_argument("--llama-cpp", type=Path, help="a llama.cpp source tree built with cmake (build/bin/llama-bench "
                                                   "and llama-quantize): adds llama.cpp f32 and Q4_0 rows")
    args = p.parse_args(argv)
    if args.worker:
        WORKERS[args.worker](json.loads(args.spec))
        return {}
    from focalrt.bench.environment import describe, environment
    from focalrt.bench.report import markdown_table, mib
    from focalrt.bench.roofline import measure_bandwidth

    spec, bundle = harness.base_spec(args)
    script = "benchmarks.compare"
    notes: list[str] = []
    sides: dict[str, dict[str, Any]] = {"focalrt fp32": {**spec, "worker": "ours"},
                                        "transformers fp32": {**spec, "worker": "transformers"}}
    weight_bytes = {"focalrt fp32": focalrt_weight_bytes(bundle)}
    weight_bytes["transformers fp32"] = weight_bytes["focalrt fp32"]
    if not args.skip_int4:
        q4, note = int4_bundle(bundle, args.int4_block_size)
        if q4 is None:
            notes.append(note)
        else:
            sides["focalrt int4"] = {**spec, "worker": "ours", "bundle": str(q4)}
            weight_bytes["focalrt int4"] = focalrt_weight_bytes(q4)
    if not args.skip_genai:
        if importlib.util.find_spec("onnxruntime_genai") is None:
            notes.append('onnxruntime-genai is not installed: pip install -e ".[bench]"')
        else:
            checkpoint = ensure_checkpoint(spec)
            for precision in GENAI_PRECISIONS[:1 if args.skip_int4 else 2]:
                model_dir = ensure_genai_model(checkpoint, precision, args.int4_block_size)
                name = f"onnxruntime-genai {precision}"
                sides[name] = {**spec, "worker": "genai", "model_dir": str(model_dir)}
                weight_bytes[name] = onnx_weight_bytes_per_token(model_dir / "model.onnx")

    if args.llama_cpp:
        if not (args.llama_cpp / "build" / "bin" / "llama-bench").is_file():
            raise SystemExit(f"--llama-cpp {args.llama_cpp}: no build/bin/llama-bench there; build llama.cpp with "
                             f"`cmake -B build && cmake --build build --target llama-bench llama-quantize`")
        checkpoint = ensure_checkpoint(spec)
        for precision in GENAI_PRECISIONS[:1 if args.skip_int4 else 2]:
            gguf = ensure_gguf(checkpoint, args.llama_cpp, precision)
            name = f"llama.cpp {precision} ({LLAMA_CPP_TYPES[precision].upper()})"
            sides[name] = {**spec, "worker": "llamacpp", "gguf": str(gguf), "llama_cpp": str(args.llama_cpp)}
            weight_bytes[name] = gguf.stat().st_size

    # Other load on the machine lowers a bandwidth sample; measuring before the first and after every
    # round and keeping the best gives the bound the runtimes had when the machine was quietest.
    print("measuring memory bandwidth ...", file=sys.stderr, flush=True)
    bandwidth_runs = [measure_bandwidth()]
    results = harness.measure_sides(script, sides, args.rounds,
                                   after_round=lambda: bandwidth_runs.append(measure_bandwidth()))
    bandwidth = max(bandwidth_runs, key=lambda b: b["best_gb_s"])
    env = environment(["CPUExecutionProvider"], spec["threads"])

    ours, hf = results["focalrt fp32"], results["transformers fp32"]
    rows, table = [], {}
    for name, r in results.items():
        bound = bandwidth["best_gb_s"] * 1e9 / weight_bytes[name]
        ref = ours if "fp32" in name else results.get("focalrt int4")  # ours at the same precision
        mine = ref is r
        compared = ref is not None and not mine
        entry = {**{k: v for k, v in r.items() if k != "tokens"},
                 "weight_bytes_per_token": weight_bytes[name], "roofline_tokens_per_s": bound,
                 "fraction_of_roofline": r["quiet_decode_tokens_per_s"] / bound,
                 "greedy_tokens_agreeing_with_focalrt_fp32": harness.agreement(r["tokens"], ours["tokens"]),
                 "ours_decode_speedup": (ref["quiet_decode_tokens_per_s"] / r["quiet_decode_tokens_per_s"]
                                         if compared else None),
                 "ours_prefill_speedup": r["quiet_prefill_ms"] / ref["quiet_prefill_ms"] if compared else None}
        table[name] = entry
        notes += [f"{name}: {note}" for note in dict.fromkeys(r.get("notes") or [])]
        rows.append([row_name(name, r), r["quiet_prefill_ms"], r["quiet_decode_tokens_per_s"], r["decode_tokens_per_s"],
                     r["decode_tokens_per_s_best"], f"{entry['fraction_of_roofline']:.0%}", mib(r["peak_rss_bytes"]),
                     f"{entry['ours_prefill_speedup']:.2f}x" if entry["ours_prefill_speedup"] else "-",
                     f"{entry['ours_decode_speedup']:.2f}x" if entry["ours_decode_speedup"] else "-",
                     f"{entry['greedy_tokens_agreeing_with_focalrt_fp32']}/{args.new_tokens}" if r["tokens"]
                     else "-"])
    bound32 = bandwidth["best_gb_s"] * 1e9 / weight_bytes["focalrt fp32"]
    rows.append(["roofline fp32 (bandwidth / weight bytes)", "-", bound32, "-", "-", "100%", "-", "-",
                 f"{ours['quiet_decode_tokens_per_s'] / bound32:.0%} of it", "-"])
    targets = {"decode_vs_transformers_fp32": ours["quiet_decode_tokens_per_s"] / hf["quiet_decode_tokens_per_s"],
               "prefill_vs_transformers_fp32": hf["quiet_prefill_ms"] / ours["quiet_prefill_ms"],
               "decode_fraction_of_roofline_fp32": ours["quiet_decode_tokens_per_s"] / bound32}
    for precision in GENAI_PRECISIONS:
        g, o = results.get(f"onnxruntime-genai {precision}"), results.get(f"focalrt {precision}")
        if g and o:
            targets[f"decode_vs_genai_{precision}"] = o["quiet_decode_tokens_per_s"] / g["quiet_decode_tokens_per_s"]
            targets[f"prefill_vs_genai_{precision}"] = g["quiet_prefill_ms"] / o["quiet_prefill_ms"]
        lc = results.get(f"llama.cpp {precision} ({LLAMA_CPP_TYPES[precision].upper()})")
        if lc and o:
            rate = "quiet_decode_tokens_per_s"
            targets[f"decode_vs_llamacpp_{precision}"] = o[rate] / lc[rate]
            targets[f"prefill_vs_llamacpp_{precision}"] = lc["quiet_prefill_ms"] / o["quiet_prefill_ms"]
    result = {"preset": args.preset, "bundle": str(bundle), "prompt_tokens": len(spec["ids"]),
              "new_tokens": args.new_tokens, "runs_per_round": args.runs, "warmup": args.warmup,
              "rounds": args.rounds, "threads": spec["threads"], "context_budget": spec["max_context"],
              "bandwidth": bandwidth,
              "bandwidth_runs": bandwidth_runs, "environment": env, "rows": table, "targets": targets,
              "notes": notes}

    print(f"\n{args.preset}: prompt {len(spec['ids'])} tokens, {args.new_tokens} new tokens, greedy, batch 1; "
          f"{args.rounds} rounds x {args.runs} runs per row after {args.warmup} warm-up; {spec['threads']} threads; "
          f"bandwidth {bandwidth['best_gb_s']:.1f} GB/s ({bandwidth['best_kernel']}); "
          f"'quiet' = median of the least disturbed round; {CONTEXT_NOTE.format(n=spec['max_context'])}")
    print(describe(env) + "\n")
    print(markdown_table(["runtime", "prefill ms (quiet)", "decode tok/s (quiet)", "decode tok/s (all runs)",
                          "best run tok/s", "of roofline", "peak RSS", "ours: prefill speedup",
                          "ours: decode speedup", "same greedy tokens"], rows))
    print("\ntargets (ours / baseline, quiet medians): "
          + ", ".join(f"{k} {v:.2f}" for k, v in targets.items()))
    for note in notes:
        print(f"- {note}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
