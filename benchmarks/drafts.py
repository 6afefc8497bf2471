"""Draft decoding, measured: what a k-token verify call costs against one step, and what temporal and
prompt drafts accept and save per description, each mode beside plain decoding in the same run.

    python -m benchmarks.drafts --bundle /tmp/tiny --bundle /tmp/small [--text-bundle /tmp/smollm2] \
        [--frames 10] [--max-new-tokens 24] [--json out.json]

Scenarios (modes interleaved frame by frame, rotating which goes first, so load from other processes
falls on all of them alike):
- clip "moving": the astronaut photo panned and zoomed over the frames (focalrt.demo.pan_zoom_frames);
  region `mouth` of the tracked face, described on every frame.
- clip "static": the same photo on every frame (a fixed camera, a still subject).
- text (a text-only bundle such as SmolLM2-135M-Instruct, greedy, ChatML prompts): a running status line
  rewritten each second, where consecutive prompts differ in a few words (TEXT_STEPS below); each
  answer is drafted by the previous one (temporal) or by the prompt (prompt).
Every mode must give the same text as plain decoding; the table says so per scenario.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from focalrt.bench.measure import RecordingPipeline
from focalrt.runtime.generation.drafts import Drafts
from focalrt.runtime.generation.generate import (
    PromptCache,
    Row,
    Sampler,
    TensorNames,
    TextModel,
    batch_positions,
    decode_one_token,
    generate,
)
from focalrt.runtime.generation.generate import prefill as prefill_prompt
from focalrt.runtime.generation.generate import verify as verify_tokens

MODES = ("off", "temporal", "prompt")
TEXT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TEXT_TEMPLATE = ("Rewrite this camera note as one short sentence: at second {t}, the person at the desk {action}, "
                 "facing the camera, mouth {mouth}.")
TEXT_STEPS = [(1, "is typing", "closed"), (2, "is typing", "closed"), (3, "is typing", "slightly open"),
              (4, "stops typing", "slightly open"), (5, "looks at the screen", "slightly open"),
              (6, "looks at the screen", "closed"), (7, "is typing", "closed"), (8, "is typing", "closed")]


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# ---------------------------------------------------------------- cost of a k-token verify call


def verify_cost(model: TextModel, cfg: dict, ks: range, repeats: int, past: int = 200) -> list[dict]:
    """Median ms of one decode step and of verify over k tokens, after `past` cached tokens (interleaved)."""
    cache = PromptCache.allocate(cfg["num_layers"], 1, cfg["num_kv_heads"], cfg["head_dim"], past + 64)
    ids = np.random.default_rng(0).integers(100, 5000, size=past).astype(np.int64)[None]
    pos = np.arange(past, dtype=np.int64)[None]
    prefill_prompt(model, cache, ids, batch_positions(np.repeat(pos, model.rope_axes, 0), 1))
    zero = np.zeros(1, np.int64)
    times: dict[int, list[float]] = {k: [] for k in [0, *ks]}  # 0: decode_one_token
    order = [0, *ks]
    for rep in range(repeats):
        for k in order[rep % len(order):] + order[:rep % len(order)]:
            t = time.perf_counter()
            if k == 0:
                decode_one_token(model, cache, np.array([7]), zero)
            else:
                verify_tokens(model, cache, np.full((1, k), 7, np.int64), zero)
            times[k].append((time.perf_counter() - t) * 1e3)
            cache.trim(max(k, 1))
    step = median(times[0])
    return [{"k": k, "ms": round(median(times[k]), 3), "vs_step": round(median(times[k]) / step, 3),
             "step_ms": round(step, 3)} for k in ks]


# ---------------------------------------------------------------- clips through RegionRunner


def clip_frames(kind: str, n: int) -> list[np.ndarray]:
    import cv2
    from skimage import data

    from focalrt.demo import pan_zoom_frames

    photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    if kind == "moving":
        return pan_zoom_frames(photo, n)
    still = pan_zoom_frames(photo, 2)[0]
    return [still] * n


def clip_scenario(bundle: str, kind: str, frames: int, max_new_tokens: int) -> dict[str, list[dict]]:
    from focalrt.runtime.pipeline import Pipeline
    from focalrt.runtime.stream.runner import RegionRunner
    from focalrt.runtime.stream.sources import Frame

    pipe = RecordingPipeline(Pipeline.from_bundle(bundle))
    runners = {m: RegionRunner(pipe, regions="mouth", max_new_tokens=max_new_tokens, draft=m) for m in MODES}
    out: dict[str, list[dict]] = {m: [] for m in MODES}
    for i, image in enumerate(clip_frames(kind, frames)):
        for mode in MODES[i % 3:] + MODES[:i % 3]:
            runners[mode].process(Frame(i, float(i), image, 0.0))
            for d in (d for call in pipe.take() for d in call):
                out[mode].append(description_record(d.timings_ms, d.token_ids, d.finish_reason, d.text))
    return out


def description_record(t: dict, tokens: list[int], finish: str, text: str) -> dict:
    return {"decode_ms": t["decode"], "calls": t["decode_calls"], "tokens": len(tokens),
            "chosen": len(tokens) + (finish == "stop"), "proposed": t.get("draft_proposed", 0),
            "accepted": t.get("draft_accepted", 0), "text": text}


# ---------------------------------------------------------------- text scenario (text-only bundle)


def text_scenario(bundle_dir: str, max_new_tokens: int) -> dict[str, list[dict]]:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    path = Path(bundle_dir)
    m = json.loads((path / "manifest.json").read_text())
    t = m["text"]
    comps = m["components"]
    sess = {c: ort.InferenceSession(str(path / comps[c]["file"]), providers=["CPUExecutionProvider"])
            for c in ("embed", "decoder") if c in comps}
    model = TextModel(sess.get("embed"), sess["decoder"], TensorNames.from_manifest(comps, int(t["num_layers"])),
                      int(t["hidden_size"]), rope_axes=1)
    tok = Tokenizer.from_file(str(path / m["tokenizer"]["file"]))
    stop = {tok.token_to_id("<|im_end|>")}
    drafts = {mode: Drafts(mode) for mode in MODES}
    out: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for i, (sec, action, mouth) in enumerate(TEXT_STEPS):
        user = TEXT_TEMPLATE.format(t=sec, action=action, mouth=mouth)
        text = (f"<|im_start|>system\n{TEXT_SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                f"<|im_start|>assistant\n")
        ids = np.array(tok.encode(text, add_special_tokens=False).ids, np.int64)
        for mode in MODES[i % 3:] + MODES[:i % 3]:
            cache = PromptCache.allocate(t["num_layers"], 1, t["num_kv_heads"], t["head_dim"], 512)
            hook = drafts[mode].drafter("status", ids)
            g = generate(model, cache, [Row(ids, np.arange(ids.size, dtype=np.int64)[None], 0)], max_new_tokens,
                         stop, Sampler(), draft=[hook] if hook else None, share_prefix=False)
            drafts[mode].remember("status", g.tokens[0])
            timings = {"decode": g.decode_ms, "decode_calls": len(g.step_ms),
                       "draft_proposed": g.drafted[0], "draft_accepted": g.accepted[0]}
            out[mode].append(description_record(timings, g.tokens[0], g.finish[0], tok.decode(g.tokens[0])))
    return out


# ---------------------------------------------------------------- report


def summarize(name: str, runs: dict[str, list[dict]], skip_first: bool = True) -> list[dict]:
    """One row per mode; the first description of each mode (no history yet, first-call warm-up) is left out."""
    base = runs["off"][1:] if skip_first else runs["off"]
    rows = []
    for mode, recs in runs.items():
        recs = recs[1:] if skip_first else recs
        same = [r["text"] for r in recs] == [r["text"] for r in base]
        proposed, accepted = sum(r["proposed"] for r in recs), sum(r["accepted"] for r in recs)
        calls = sum(r["calls"] + 1 for r in recs)  # + the prefill call that chose the first token
        rows.append({"scenario": name, "mode": mode, "descriptions": len(recs),
                     "tokens_per_description": round(statistics.mean(r["tokens"] for r in recs), 2),
                     "tokens_per_decoder_call": round(sum(r["chosen"] for r in recs) / calls, 3),
                     "acceptance": round(accepted / proposed, 3) if proposed else None,
                     "decode_ms_median": round(median([r["decode_ms"] for r in recs]), 2),
                     "speedup_vs_off": round(median([r["decode_ms"] for r in base])
                                             / median([r["decode_ms"] for r in recs]), 3),
                     "same_text_as_off": same})
    return rows


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", default=[], help="VLM bundle (repeatable: tiny, small)")
    ap.add_argument("--text-bundle", help="text-only bundle for the text scenario (e.g. SmolLM2-135M)")
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--verify-repeats", type=int, default=15)
    ap.add_argument("--skip-verify-cost", action="store_true")
    ap.add_argument("--json", help="write every record here")
    args = ap.parse_args()
    result: dict = {"verify_cost": {}, "scenarios": []}
    for bundle in args.bundle:
        name = Path(bundle).name
        if not args.skip_verify_cost:
            from focalrt.runtime.pipeline import Pipeline

            pipe = Pipeline.from_bundle(bundle)
            cost = verify_cost(pipe.model, pipe.text_cfg, range(1, 9), args.verify_repeats)
            result["verify_cost"][name] = cost
            print(f"\n### verify cost, {name} (200 cached tokens; median of {args.verify_repeats})\n")
            print(table(cost), flush=True)
            del pipe
        for kind in ("moving", "static"):
            rows = summarize(f"{name} {kind} clip", clip_scenario(bundle, kind, args.frames, args.max_new_tokens))
            result["scenarios"] += rows
            print(f"\n{table(rows)}", flush=True)
    if args.text_bundle:
        name = Path(args.text_bundle).name
        rows = summarize(f"{name} text status", text_scenario(args.text_bundle, args.max_new_tokens))
        result["scenarios"] += rows
        print(f"\n{table(rows)}", flush=True)
        if not args.skip_verify_cost:
            import onnxruntime as ort

            m = json.loads((Path(args.text_bundle) / "manifest.json").read_text())
            comps, t = m["components"], m["text"]
            sess = [ort.InferenceSession(str(Path(args.text_bundle) / comps[c]["file"]),
                                         providers=["CPUExecutionProvider"]) if c in comps else None
                    for c in ("embed", "decoder")]
            model = TextModel(*sess, TensorNames.from_manifest(comps, int(t["num_layers"])), int(t["hidden_size"]),
                              rope_axes=1)
            cost = verify_cost(model, t, range(1, 9), args.verify_repeats)
            result["verify_cost"][name] = cost
            print(f"\n### verify cost, {name}\n\n{table(cost)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
