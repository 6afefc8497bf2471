"""`focalrt describe`: one image, one region, streamed text or one JSON object.

    focalrt describe BUNDLE --image face.jpg --box 120,80,260,190
    focalrt describe BUNDLE --image face.jpg --json
    focalrt describe BUNDLE --image face.jpg --format json      # answer constrained to the face-state schema
    focalrt describe BUNDLE --video face_clip.mp4                # Face-LLaVA video bundle: 8 frames of the clip
"""

from __future__ import annotations

import json
import sys

from focalrt.commands.args import (
    add_parser,
    add_provider,
    add_schema,
    add_threads,
    non_negative_float,
    non_negative_int,
    positive_int,
    probability,
    schema_choice,
)
from focalrt.runtime.generation.drafts import DEFAULT_DRAFT, DRAFT_HELP, MODES


def register(sub) -> None:
    p = add_parser(sub, "describe", help="describe a region of one image, or answer a prompt (text-only bundle)",
                   description=__doc__)
    p.add_argument("bundle", help="bundle directory written by `focalrt export`")
    p.add_argument("--image", help="image file (JPEG/PNG/...); required unless the bundle is text-only")
    p.add_argument("--video", help="video file of one face (a bundle with a video encoder): its frames spread "
                                   "evenly over the clip, as Face-LLaVA's loader picks them, described together")
    p.add_argument("--box", help="x1,y1,x2,y2 in image pixels (default: the whole image)")
    p.add_argument("--prompt", help="instruction (default: the bundle's)")
    p.add_argument("--system", help="system prompt instead of the bundle's (text-only bundles)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="most tokens to generate (default: the bundle's generation setting)")
    p.add_argument("--temperature", type=non_negative_float, default=None,
                   help="sampling temperature; 0 = greedy (default: the bundle's, greedy for exported presets)")
    p.add_argument("--top-k", type=non_negative_int, default=None,
                   help="sample from the k most likely tokens only; 0 = no limit (default: the bundle's, 0)")
    p.add_argument("--top-p", type=probability, default=None,
                   help="sample from the smallest set of tokens whose probability reaches p (default: 1, off)")
    p.add_argument("--seed", type=non_negative_int, default=None,
                   help="random seed for sampling (default: a fresh seed each run)")
    add_provider(p)
    add_threads(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--draft", choices=MODES, default=DEFAULT_DRAFT, help=DRAFT_HELP)
    add_schema(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from focalrt.commands.notices import warn_if_random
    from focalrt.runtime.faces.regions import parse_box
    from focalrt.runtime.generation.drafts import Drafts
    from focalrt.runtime.pipeline import Pipeline

    if args.video:
        return run_video(args)
    box = parse_box(args.box) if args.box else None
    schema = schema_choice(args)
    pipe = Pipeline.from_bundle(args.bundle, provider=args.provider, threads=args.threads)
    warn_if_random(pipe.bundle)
    if pipe.vision is None and (args.image or box):
        raise ValueError(f"{args.bundle} is a text-only bundle: drop --image/--box and give --prompt TEXT")
    if pipe.vision is not None and not args.image:
        raise ValueError(f"{args.bundle} describes images: give --image FILE")
    if pipe.vision is not None and args.system:
        raise ValueError("--system applies to text-only bundles; an image bundle's system prompt is set at export")
    if schema is not None:
        pipe.grammar(schema)  # a schema llguidance cannot compile fails here, before the image is read
    stream = None if args.json else (lambda s: print(s, end="", flush=True))
    d = pipe.describe(args.image, box=box, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      on_text=stream, system=args.system, drafts=Drafts(args.draft), schema=schema)
    return report(d, args.json, stats_line(args))


def stats_line(args) -> bool:
    """Whether to end with the stats line: for a person at a terminal, or when asked (-v). When stdout goes
    to a pipe or a file, stderr usually still goes to the terminal, where the line would land in the middle
    of the answer as the pipe's reader prints it (`Paris.[stop] 7 tokens...`); the answer alone goes out."""
    return bool(getattr(args, "verbose", False)) or sys.stdout.isatty()


def report(d, as_json: bool, with_stats: bool = True, **extra) -> int:
    """The answer's ending: one JSON object (with `extra`), or, after streamed text, its newline and (when
    `with_stats`) a stats line on stderr."""
    if d.state_error:
        print(f"focalrt describe: warning: {d.state_error}", file=sys.stderr)
    if as_json:
        print(json.dumps({**d.to_json(), **extra}))
    else:
        print(flush=True)  # the streamed text ends its line on stdout, so a pipe or a shell prompt starts clean
        if with_stats:
            t = d.timings_ms
            seen = "".join(f" {k} {v}" for k, v in extra.items())
            print(f"[{d.finish_reason}] {len(d.token_ids)} tokens{seen}; ttft {t['ttft']:.1f} ms, "
                  f"total {t['total']:.1f} ms", file=sys.stderr)
    return 0


def run_video(args) -> int:
    """`--video`: one clip, its frames picked evenly, through the bundle's video encoder."""
    from focalrt.commands.notices import warn_if_random
    from focalrt.runtime.frames import read_video_evenly
    from focalrt.runtime.generation.drafts import Drafts
    from focalrt.runtime.pipeline import Pipeline

    if args.image or args.box or args.system:
        raise ValueError("--video takes a clip cropped to one face (as Face-LLaVA's crop tool makes them): drop "
                         "--image/--box/--system; to follow faces in a camera or long video use "
                         "`focalrt run --video-window`")
    schema = schema_choice(args)
    pipe = Pipeline.from_bundle(args.bundle, provider=args.provider, threads=args.threads)
    warn_if_random(pipe.bundle)
    pipe.require_video()
    frames, indices = read_video_evenly(args.video, pipe.adapter.video_frames)
    stream = None if args.json else (lambda s: print(s, end="", flush=True))
    d = pipe.describe_video(frames, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            on_text=stream, drafts=Drafts(args.draft), schema=schema)
    return report(d, args.json, stats_line(args), video_frames=indices)
