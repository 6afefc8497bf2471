"""`focalrt perplexity`: a text bundle's perplexity on a text file, windowed as llama.cpp's llama-perplexity."""

from __future__ import annotations

import json
from pathlib import Path

from focalrt.commands.args import add_parser, add_provider, add_threads, positive_int


def register(sub) -> None:
    p = add_parser(
        sub, "perplexity", help="perplexity of a text bundle on a text file (llama-perplexity's windowing)",
        description="Perplexity as llama.cpp's llama-perplexity measures it. Default: non-overlapping windows "
                    "of --context tokens (a trailing partial window is dropped), each evaluated from an empty "
                    "cache, with BOS as its first token when the tokenizer adds one; only the second half of "
                    "each window is scored. With --stride S (llama-perplexity --ppl-stride): windows of "
                    "context + S/2 tokens every S tokens, each scoring its last S tokens.")
    p.add_argument("bundle", help="a text bundle (focalrt export --preset smollm2-135m, or --model X.gguf)")
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--context", type=positive_int, default=512, help="window length in tokens")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="strided windows as llama-perplexity --ppl-stride")
    p.add_argument("--max-windows", type=positive_int, default=None, help="score only the first N windows")
    add_threads(p)
    add_provider(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from focalrt.runtime.generation.perplexity import measure, text_tokens
    from focalrt.runtime.pipeline import Pipeline

    path = Path(args.text)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--text {path}: cannot read it as UTF-8 text ({e})") from None
    pipe = Pipeline.from_bundle(args.bundle, provider=args.provider, threads=args.threads, max_batch=1)
    if pipe.vision is not None:
        raise ValueError(f"{args.bundle} is an image bundle; perplexity is measured on text-only bundles")
    ids, bos = text_tokens(pipe, text)
    result = measure(pipe, ids, args.context, args.stride, args.max_windows, bos)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.4f} over {result['scored_tokens']} scored tokens in "
              f"{result['windows']} windows of {result['window_tokens']} ({result['tokens']} tokens in the text; "
              f"{result['windowing']})")
    return 0
