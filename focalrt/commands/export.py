"""`focalrt export`: model -> bundle (needs the [export] extra)."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("export", help="export a model to a bundle (needs the [export] extra: torch)")
    p.add_argument("what", nargs="?", default="model", choices=["model", "face-models"],
                   help="'model' (default) or 'face-models' (only the face detector and landmarks)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="local checkpoint directory or hub id "
                                     "(Qwen2_5_VLForConditionalGeneration, or a Face-LLaVA checkpoint)")
    src.add_argument("--preset", help="random-weight model of the real architecture: tiny-random, "
                                      "tiny-random-b, small, tiny-random-face-llava, small-random-face-llava")
    p.add_argument("--out", required=True, help="bundle directory to write (atomically)")
    p.add_argument("--family", choices=["qwen2_5_vl", "face_llava"], default=None,
                   help="model family (default: from the preset or checkpoint)")
    p.add_argument("--image-size", type=int, default=None,
                   help="fixed encoder resolution in pixels, a multiple of 28 (default 336)")
    p.add_argument("--max-context", type=int, default=None, help="KV cache length (default 4096)")
    p.add_argument("--profile", help="JSON file with prompt wording: system, region_template, "
                                     "default_instruction, region_mode")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--region-template", help="how a box is worded, with {x1} {y1} {x2} {y2}")
    p.add_argument("--instruction", help="default instruction when none is given at run time")
    p.add_argument("--region-mode", choices=["text", "draw", "crop"], help="how the model sees a region")
    p.add_argument("--no-face-models", action="store_true", help="do not add the face detector/landmarks")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--seed", type=int, default=0, help="seed for --preset weights")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.what == "face-models":
        from focalrt.export.face_models import export_face_models

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(export_face_models(out), indent=2))
        return 0
    if not (args.model or args.preset):
        raise SystemExit("focalrt export: give --model DIR_OR_HUB_ID or --preset tiny-random")
    from focalrt.export.build import export_bundle, load_profile_overrides

    profile = load_profile_overrides(args.profile, system=args.system, region_template=args.region_template,
                                     default_instruction=args.instruction, region_mode=args.region_mode)
    out = export_bundle(args.out, model_id=args.model, preset=args.preset, family=args.family,
                        image_size=args.image_size, max_context=args.max_context, profile=profile,
                        face_models=not args.no_face_models, overwrite=args.overwrite, seed=args.seed)
    print(f"bundle written to {out}")
    return 0
