"""`focalrt describe`: one image, one region, streamed text or one JSON object."""

from __future__ import annotations

import json
import sys

from focalrt.runtime.drafts import DEFAULT_DRAFT, DRAFT_HELP, MODES


def register(sub) -> None:
    p = sub.add_parser("describe", help="describe a region of one image")
    p.add_argument("bundle")
    p.add_argument("--image", required=True, help="image file (JPEG/PNG/...)")
    p.add_argument("--box", help="x1,y1,x2,y2 in image pixels (default: the whole image)")
    p.add_argument("--prompt", help="instruction (default: the bundle's)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--provider", default=None, help="cpu, cuda or tensorrt (default: best available)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--draft", choices=MODES, default=DEFAULT_DRAFT, help=DRAFT_HELP)
    p.set_defaults(func=run)


def run(args) -> int:
    from focalrt.runtime.drafts import Drafts
    from focalrt.runtime.pipeline import Pipeline
    from focalrt.runtime.regions import parse_box

    box = parse_box(args.box) if args.box else None
    pipe = Pipeline.from_bundle(args.bundle, provider=args.provider)
    stream = None if args.json else (lambda s: print(s, end="", flush=True))
    d = pipe.describe(args.image, box=box, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      on_text=stream, drafts=Drafts(args.draft))
    if args.json:
        print(json.dumps(d.to_json()))
    else:
        t = d.timings_ms
        print(f"\n[{d.finish_reason}] {len(d.token_ids)} tokens; ttft {t['ttft']:.1f} ms, "
              f"total {t['total']:.1f} ms", file=sys.stderr)
    return 0
