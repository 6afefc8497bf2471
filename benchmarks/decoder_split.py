"""Where a decode step goes: our decoder graph against onnxruntime-genai's, bare and in each runtime.

    python benchmarks/decoder_split.py --bundle B --genai DIR [--kv 128] [--steps 64] [--rounds 5]
    python benchmarks/decoder_split.py --bundle B --genai DIR --profile OUT   # + per-operator profile

Four loops over the same prompt token ids, all in this one process, interleaved (rounds alternate the
order), each with a KV buffer of the same `--kv` positions (default: prompt + steps, what genai's
`max_length` is in benchmarks/compare.py):
  - ours, bare: our graph(s) in plain ONNX Runtime sessions with one IO binding kept across steps (the
    KV buffers bound in place as past and present), greedy argmax; an old bundle runs embed.onnx and then
    decoder.onnx per step, a bundle whose decoder embeds its tokens runs one call;
  - genai, bare: genai's model.onnx the same way (its past and present bound to one buffer, as genai does
    with past_present_share_buffer);
  - ours, runtime: `decode_one_token` over a `PromptCache` of `--kv` positions (what `focalrt` runs);
  - genai, runtime: `og.Generator` with max_length = `--kv`.
"bare vs runtime" is the cost of each runtime's loop; "ours bare vs genai bare" is the graph alone.
With `--profile OUT`, each bare graph is run again under ONNX Runtime's profiler and the time per
operator type is printed per decode step (and the raw traces kept in OUT).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

QUESTION = "Write a short story about a robot who learns to paint."


def session(path: Path, threads: int, profile: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if profile is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile)
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


class BareLoop:
    """A decoder graph's prefill + greedy steps with persistent KV buffers bound in place.

    Works for genai's model.onnx (input_ids, attention_mask, past_key_values.*; position_ids if it has
    them) and for ours (the decoder embeds its tokens, or embed.onnx runs first and feeds inputs_embeds).
    """

    def __init__(self, decoder: ort.InferenceSession, kv: int, heads: int, head_dim: int,
                 embed: ort.InferenceSession | None = None):
        self.decoder, self.embed = decoder, embed
        names = [i.name for i in decoder.get_inputs()]
        self.past = [n for n in names if n.startswith("past_key_values")]
        self.present = [o.name for o in decoder.get_outputs() if o.name.startswith("present")]
        self.first = names[0]  # input_ids, or inputs_embeds for a decoder fed by embed.onnx
        self.has_positions = "position_ids" in names
        self.keep = "logits_to_keep" if "logits_to_keep" in names else None
        self.image = "image_embeds" if "image_embeds" in names else None
        self.buffers = [np.zeros((1, heads, kv, head_dim), np.float32) for _ in self.past]
        self.values = [ort.OrtValue.ortvalue_from_numpy(b) for b in self.buffers]
        self.io = decoder.io_binding()
        self.io.bind_output("logits", "cpu")
        for name_in, name_out, value in zip(self.past, self.present, self.values, strict=True):
            self.io.bind_ortvalue_input(name_in, value)
            self.io.bind_ortvalue_output(name_out, value)
        hidden = int(decoder.get_inputs()[0].shape[2]) if self.first == "inputs_embeds" else 0
        self.empty_image = np.zeros((1, max(hidden, 1)), np.float32)
        if self.image:
            width = next(i.shape for i in decoder.get_inputs() if i.name == self.image)[1]
            self.empty_image = np.zeros((1, int(width)), np.float32)
        self.length = 0

    def call(self, ids: np.ndarray) -> int:
        n = ids.shape[1]
        total = self.length + n
        io = self.io
        if self.first == "inputs_embeds":
            embeds = self.embed.run(None, {"input_ids": ids} if len(self.embed.get_inputs()) == 1 else
                                    {"input_ids": ids, "image_embeds": self.empty_image})[0]
            io.bind_cpu_input("inputs_embeds", embeds)
        else:
            io.bind_cpu_input(self.first, ids)
        if self.image:
            io.bind_cpu_input(self.image, self.empty_image)
        io.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        if self.has_positions:
            io.bind_cpu_input("position_ids", np.arange(self.length, total, dtype=np.int64)[None])
        if self.keep:
            io.bind_cpu_input(self.keep, np.array([1], np.int64))
        io.bind_output("logits", "cpu")
        self.decoder.run_with_iobinding(io)
        self.length = total
        return int(io.get_outputs()[0].numpy()[0, -1].argmax())

    def generate(self, ids: list[int], steps: int) -> tuple[float, list[float], list[int]]:
        self.length = 0
        t = time.perf_counter()
        token = self.call(np.asarray([ids], np.int64))
        prefill = (time.perf_counter() - t) * 1e3
        out, times = [token], []
        for _ in range(steps - 1):
            t = time.perf_counter()
            token = self.call(np.array([[token]], np.int64))
            times.append((time.perf_counter() - t) * 1e3)
            out.append(token)
        return prefill, times, out


def ours_bare(bundle: Path, kv: int, threads: int, profile: Path | None = None) -> BareLoop:
    m = json.loads((bundle / "manifest.json").read_text())["components"]
    decoder = session(bundle / m["decoder"]["file"], threads, profile)
    embed = session(bundle / m["embed"]["file"], threads) if "embed" in m else None
    text = json.loads((bundle / "manifest.json").read_text())["text"]
    return BareLoop(decoder, kv, text["num_kv_heads"], text["head_dim"], embed)


def genai_bare(model_dir: Path, kv: int, threads: int, profile: Path | None = None) -> BareLoop:
    cfg = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    return BareLoop(session(model_dir / cfg["filename"], threads, profile), kv, cfg["num_key_value_heads"],
                    cfg["head_size"])


class OursRuntime:
    """`focalrt`'s own loop: Pipeline's TextModel, `prefill` + `decode_one_token` over a kv-position cache."""

    def __init__(self, bundle: Path, kv: int, threads: int):
        from focalrt.runtime.generation.generate import PromptCache
        from focalrt.runtime.pipeline import Pipeline

        self.pipe = Pipeline.from_bundle(bundle, provider="cpu", threads=threads, max_context=kv)
        t = self.pipe.text_cfg
        self.cache = PromptCache.allocate(t["num_layers"], 1, t["num_kv_heads"], t["head_dim"], kv)

    def generate(self, ids: list[int], steps: int) -> tuple[float, list[float], list[int]]:
        from focalrt.bench.measure import text_positions
        from focalrt.runtime.generation.generate import batch_positions, decode_one_token, prefill

        model, cache = self.pipe.model, self.cache
        cache.lengths[:] = 0
        arr = np.asarray(ids, np.int64)[None]
        t = time.perf_counter()
        token = prefill(model, cache, arr, batch_positions(text_positions(arr.shape[1], model.rope_axes), 1))
        token = token.argmax(-1)
        prefill_ms = (time.perf_counter() - t) * 1e3
        delta, out, times = np.zeros(1, np.int64), [int(token[0])], []
        for _ in range(steps - 1):
            t = time.perf_counter()
            token = decode_one_token(model, cache, token, delta).argmax(-1)
            times.append((time.perf_counter() - t) * 1e3)
            out.append(int(token[0]))
        return prefill_ms, times, out


class GenaiRuntime:
    def __init__(self, model_dir: Path, kv: int, threads: int):
        import onnxruntime_genai as og

        self.og, self.kv = og, kv
        config = og.Config(str(model_dir))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)

    def generate(self, ids: list[int], steps: int) -> tuple[float, list[float], list[int]]:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.kv, min_length=self.kv, do_sample=False)
        gen = self.og.Generator(self.model, params)
        t = time.perf_counter()
        gen.append_tokens(np.asarray(ids, np.int32))
        gen.generate_next_token()
        prefill_ms = (time.perf_counter() - t) * 1e3
        out, times = [int(gen.get_next_tokens()[0])], []
        for _ in range(steps - 1):
            t = time.perf_counter()
            gen.generate_next_token()
            times.append((time.perf_counter() - t) * 1e3)
            out.append(int(gen.get_next_tokens()[0]))
        return prefill_ms, times, out


def operator_profile(loop: BareLoop, ids: list[int], steps: int) -> dict[str, tuple[float, int]]:
    """Per operator type: microseconds per decode step and nodes run per step, from ORT's profiler."""
    loop.generate(ids, steps)
    trace = Path(loop.decoder.end_profiling())
    events = json.loads(trace.read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode_runs = runs[-(steps - 1):]  # the last generate's decode steps (the prefill and earlier runs excluded)
    start, end = decode_runs[0]["ts"], decode_runs[-1]["ts"] + decode_runs[-1]["dur"]
    per_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and start <= e["ts"] <= end:
            op = e.get("args", {}).get("op_name", "?")
            per_op[op][0] += e["dur"]
            per_op[op][1] += 1
    n = len(decode_runs)
    total_run = sum(r["dur"] for r in decode_runs) / n
    table = {op: (us / n, int(count / n)) for op, (us, count) in per_op.items()}
    table["(model_run, whole step)"] = (total_run, 0)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="our text bundle (fp32, int8 or int4)")
    p.add_argument("--genai", type=Path, required=True, help="an onnxruntime-genai model directory")
    p.add_argument("--kv", type=int, help="KV buffer positions on every side (default: prompt + steps)")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", type=Path, help="also profile each bare graph per operator; traces go here")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    from focalrt.bench.environment import describe, environment
    from focalrt.runtime.pipeline import Pipeline

    ids = Pipeline.from_bundle(args.bundle, provider="cpu").build_text_prompt(QUESTION).token_ids.tolist()
    kv = args.kv or len(ids) + args.steps
    loops: dict[str, Any] = {"ours, bare": ours_bare(args.bundle, kv, args.threads),
                             "genai, bare": genai_bare(args.genai, kv, args.threads),
                             "ours, runtime": OursRuntime(args.bundle, kv, args.threads),
                             "genai, runtime": GenaiRuntime(args.genai, kv, args.threads)}
    for loop in loops.values():  # warm-up
        loop.generate(ids, 8)
    steps: dict[str, list[float]] = {name: [] for name in loops}
    prefill: dict[str, list[float]] = {name: [] for name in loops}
    tokens: dict[str, list[int]] = {}
    order = list(loops)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            pre, times, toks = loops[name].generate(ids, args.steps)
            prefill[name].append(pre)
            steps[name].append(float(np.median(times)))
            tokens[name] = toks
    env = environment(["CPUExecutionProvider"], args.threads)
    print(f"prompt {len(ids)} tokens, {args.steps} steps, KV buffer {kv} positions on every side, "
          f"{args.rounds} interleaved rounds, {args.threads} threads")
    print(describe(env))
    base = min(steps["genai, bare"])
    print("\n| loop | decode step ms (median of round medians) | best round | vs genai bare | prefill ms | "
          "tokens equal to genai runtime |\n|---|---|---|---|---|---|")
    for name in loops:
        same = sum(a == b for a, b in zip(tokens[name], tokens["genai, runtime"], strict=False))
        print(f"| {name} | {np.median(steps[name]):.2f} | {min(steps[name]):.2f} | "
              f"{np.median(steps[name]) / np.median(steps['genai, bare']):.2f}x | {np.median(prefill[name]):.1f} | "
              f"{same}/{args.steps} |")
    result: dict[str, Any] = {"kv": kv, "prompt_tokens": len(ids), "steps_ms": steps, "prefill_ms": prefill,
                              "genai_bare_best_ms": base, "environment": env}
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        profiles = {"ours": operator_profile(ours_bare(args.bundle, kv, args.threads, args.profile / "ours"),
                                             ids, args.steps),
                    "genai": operator_profile(genai_bare(args.genai, kv, args.threads, args.profile / "genai"),
                                              ids, args.steps)}
        ops = sorted(set(profiles["ours"]) | set(profiles["genai"]),
                     key=lambda o: -max(profiles["ours"].get(o, (0, 0))[0], profiles["genai"].get(o, (0, 0))[0]))
        print("\nper decode step, by operator type (ONNX Runtime profiler; kernel time, us, and nodes run)\n"
              "| operator | ours us | ours nodes | genai us | genai nodes |\n|---|---|---|---|---|")
        for op in ops:
            a, b = profiles["ours"].get(op, (0.0, 0)), profiles["genai"].get(op, (0.0, 0))
            print(f"| {op} | {a[0]:.0f} | {a[1]} | {b[0]:.0f} | {b[1]} |")
        result["profile"] = profiles
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
