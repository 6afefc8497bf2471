"""Face-LLaVA: our ONNX runtime against the eager PyTorch reference on the same weights, one run.

    python -m benchmarks.face_llava                                   # tiny-random-face-llava, exported anew
    python -m benchmarks.face_llava --preset small-random-face-llava  # 0.5B-sized decoder
    python -m benchmarks.face_llava --bundle DIR                      # a bundle exported from a preset
    python -m benchmarks.face_llava --bundle DIR --model CKPT         # a bundle exported from CKPT

    python -m benchmarks.face_llava --preset small-random-face-llava-video  # + the cost of a video window

Both sides get the same face crop (the astronaut, 224 px), the same 68 landmarks and the same prompt
ids, and decode greedily for --new-tokens tokens. The reference runs transformers' Llava + our landmark
pathway eagerly with a DynamicCache: vision, one prefill forward, then one forward per token. Each side is
warmed up once, then timed once; the token ids of the two must agree.

A bundle with a video encoder (components.video) is also timed on one video window: the 8 face crops of a
moving face with their landmarks, through the video tower (8 frames x 257 tokens) and one prefill of the
~2,100-token prompt, then the same decode; its row says what a window costs next to one image.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from focalrt.runtime.pipeline import Pipeline


def face_inputs() -> tuple[np.ndarray, np.ndarray]:
    """The astronaut's face as a 224-px square crop and fixed landmarks inside it (speed ignores values)."""
    from skimage.data import astronaut

    frame = cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR)
    crop = cv2.resize(frame[60:190, 160:290], (224, 224), interpolation=cv2.INTER_AREA)
    landmarks = np.random.default_rng(0).uniform(30, 194, (68, 2)).astype(np.float32)
    return crop, landmarks


def window_inputs(frames: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`frames` 224-px face crops of the astronaut panning and zooming, and landmarks for each."""
    from skimage.data import astronaut

    from focalrt.demo import pan_zoom_frames

    frame = cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR)
    crops = [cv2.resize(f[60:190, 160:290], (224, 224), interpolation=cv2.INTER_AREA)
             for f in pan_zoom_frames(frame, frames)]
    rng = np.random.default_rng(0)
    return crops, [rng.uniform(30, 194, (68, 2)).astype(np.float32) for _ in crops]


def run_ours(pipe: Pipeline, crop, landmarks, new_tokens: int, video: bool = False) -> dict:
    """One description timed after a warm-up; `video`: `crop` and `landmarks` are a window's lists."""
    describe = pipe.describe_video if video else pipe.describe
    describe(crop, landmarks68=landmarks, max_new_tokens=2)  # warm-up
    d = describe(crop, landmarks68=landmarks, max_new_tokens=new_tokens)
    t = d.timings_ms
    steps = t["decode_steps"]
    return {"vision_ms": t["preprocess_and_vision"], "prefill_ms": t["prefill"], "ttft_ms": t["ttft"],
            "decode_tok_s": 1e3 * len(steps) / sum(steps) if steps else None, "tokens": d.token_ids,
            "prompt_tokens": len(d.prompt_token_ids), "prompt_token_ids": d.prompt_token_ids}


def run_reference(model, features, prompt_ids: list[int], new_tokens: int) -> dict:
    """`features()` computes the image (or window) features [1, N, hidden] the prompt's image tokens take."""
    import torch
    from transformers import DynamicCache

    def once(n: int) -> dict:
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            t0 = time.perf_counter()
            embeds = model.embed(ids, features())
            t1 = time.perf_counter()
            cache = DynamicCache(config=model.config.text_config)
            out = model.llava(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = int(out.logits[0, -1].argmax())
            t2 = time.perf_counter()
            tokens, steps = [token], []
            for _ in range(n - 1):
                s = time.perf_counter()
                step = model.llava.get_input_embeddings()(torch.tensor([[token]]))
                out = model.llava(inputs_embeds=step, past_key_values=out.past_key_values, use_cache=True)
                token = int(out.logits[0, -1].argmax())
                tokens.append(token)
                steps.append(time.perf_counter() - s)
        return {"vision_ms": (t1 - t0) * 1e3, "prefill_ms": (t2 - t1) * 1e3, "ttft_ms": (t2 - t0) * 1e3,
                "decode_tok_s": len(steps) / sum(steps) if steps else None, "tokens": tokens}

    once(2)  # warm-up
    return once(new_tokens)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-random-face-llava",
                   help="random-weight preset to export and compare (default tiny-random-face-llava)")
    p.add_argument("--bundle", type=Path, default=None, help="an existing Face-LLaVA bundle")
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory the bundle came from")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="threads for both sides (default: all cores)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode speed needs at least one decode step)")

    import torch

    from focalrt.export.build import export_bundle
    from focalrt.export.face_llava import build_random_model, load_face_llava_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = args.bundle
    if bundle is None:
        bundle = Path(tempfile.mkdtemp(prefix="focalrt-face-llava-")) / "bundle"
        print(f"exporting {args.preset} to {bundle} ...", file=sys.stderr)
        export_bundle(bundle, preset=args.preset, face_models=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    if manifest["family"] != "face_llava":
        sys.exit(f"{bundle} is a {manifest['family']} bundle, not face_llava")
    source = manifest["source"]
    if args.model is not None:
        model = load_face_llava_checkpoint(args.model)
    elif source.get("preset"):
        model = build_random_model(source["preset"], source.get("seed") or 0)
    else:
        sys.exit(f"{bundle} was exported from {source['model']}; pass that checkpoint with --model")
    model.config.image_token_id = manifest["text"]["image_token_id"]

    crop, landmarks = face_inputs()
    pipe = Pipeline.from_bundle(bundle, provider="cpu", threads=args.threads)
    ours = run_ours(pipe, crop, landmarks, args.new_tokens)
    pixels = torch.from_numpy(pipe.adapter.vision_inputs(crop)["pixel_values"])
    ref_landmarks = torch.from_numpy(landmarks / 224)[None] if model.landmarks is not None else None
    ref = run_reference(model, lambda: model.image_features(pixels, ref_landmarks), ours.pop("prompt_token_ids"),
                        args.new_tokens)

    report = {"bundle": str(bundle), "source": source["model"], "new_tokens": args.new_tokens,
              "prompt_tokens": ours["prompt_tokens"], "tokens_match": ours["tokens"] == ref["tokens"],
              "threads": args.threads or "all", "machine": platform.machine(), "processor": platform.processor(),
              "ours": {k: v for k, v in ours.items() if k != "tokens"},
              "pytorch": {k: v for k, v in ref.items() if k != "tokens"}}
    rows = [("ours", report["ours"]), ("pytorch", report["pytorch"])]
    if pipe.video is not None:
        frames, window_landmarks = window_inputs(pipe.adapter.video_frames)
        ours_w = run_ours(pipe, frames, window_landmarks, args.new_tokens, video=True)
        feeds = pipe.adapter.video_inputs(frames, window_landmarks)
        vpixels = torch.from_numpy(feeds["pixel_values"])
        vlandmarks = torch.from_numpy(feeds["landmarks"]) if model.landmarks is not None else None
        hidden = model.config.text_config.hidden_size
        ref_w = run_reference(model, lambda: model.video_features(vpixels, vlandmarks).reshape(1, -1, hidden),
                              ours_w.pop("prompt_token_ids"), args.new_tokens)
        report["window"] = {"frames": len(frames), "prompt_tokens": ours_w["prompt_tokens"],
                            "tokens_match": ours_w["tokens"] == ref_w["tokens"],
                            "ours": {k: v for k, v in ours_w.items() if k != "tokens"},
                            "pytorch": {k: v for k, v in ref_w.items() if k != "tokens"},
                            "ttft_ratio_window_to_image": ours_w["ttft_ms"] / report["ours"]["ttft_ms"]}
        rows += [("ours window", report["window"]["ours"]), ("pt window", report["window"]["pytorch"])]
    print(f"{report['source']}: prompt {report['prompt_tokens']} tokens, {args.new_tokens} new, "
          f"tokens match: {report['tokens_match']}")
    if "window" in report:
        w = report["window"]
        print(f"video window: {w['frames']} frames, prompt {w['prompt_tokens']} tokens, tokens match: "
              f"{w['tokens_match']}, TTFT {w['ttft_ratio_window_to_image']:.1f}x an image's")
    print(f"{'':<12}{'vision ms':>11}{'prefill ms':>12}{'TTFT ms':>10}{'decode tok/s':>14}")
    for name, r in rows:
        print(f"{name:<12}{r['vision_ms']:>11.1f}{r['prefill_ms']:>12.1f}{r['ttft_ms']:>10.1f}"
              f"{r['decode_tok_s']:>14.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
