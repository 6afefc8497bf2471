"""Perplexity of a text bundle on a text, windowed the way llama.cpp's `llama-perplexity` does.

Default (llama.cpp `perplexity()`): the tokens are cut into non-overlapping windows of `context` tokens
(a trailing partial window is dropped); if the tokenizer adds a BOS token, the text starts with one and
each window's first token is replaced by it; each window is run from an empty cache and only its second
half is scored: the logits at positions context/2 .. context-2 predict the next token, so a window scores
context - 1 - context/2 tokens, each with at least context/2 tokens of history.

With `stride` (llama.cpp `--ppl-stride`, its `perplexity_v2()`): windows of context + stride/2 tokens
start every `stride` tokens and each scores its last `stride` tokens; no BOS is substituted (llama.cpp
writes it only after evaluating the window).

Perplexity is exp of the mean negative log-likelihood over every scored token. The decoder returns the
logits of the scored positions only (its `logits_to_keep` input), so no LM head runs for the unscored half.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from focalrt.runtime.generation.generate import PromptCache


@dataclass(frozen=True)
class Window:
    start: int  # first token of the window in the token stream
    length: int  # tokens in the window
    first_scored: int  # position in the window whose logits predict the first scored token


def windows(n_tokens: int, context: int, stride: int | None = None) -> list[Window]:
    """The windows llama-perplexity evaluates over `n_tokens` tokens (see the module docstring)."""
    if context < 4:
        raise ValueError(f"--context must be at least 4 tokens, got {context}")
    if stride is None:
        if n_tokens < 2 * context:
            raise ValueError(f"the text has {n_tokens} tokens; a context of {context} needs at least "
                             f"{2 * context} (as llama-perplexity does); give a longer text or a smaller --context")
        return [Window(i * context, context, context // 2) for i in range(n_tokens // context)]
    if not 0 < stride <= context:
        raise ValueError(f"--stride must be in 1..{context} (the context), got {stride}")
    length = context + stride // 2
    if n_tokens <= length:
        raise ValueError(f"the text has {n_tokens} tokens; windows of {length} (context + stride/2) need more")
    count = (n_tokens - length + stride - 1) // stride
    return [Window(i * stride, length, length - stride - 1) for i in range(count)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def measure(pipeline, token_ids: list[int] | np.ndarray, context: int = 512, stride: int | None = None,
            max_windows: int | None = None, bos_id: int | None = None) -> dict:
    """Perplexity of `token_ids` (BOS already prepended when the tokenizer adds one) with a Pipeline's sessions.

    `bos_id` replaces each window's first token in the default mode. Returns perplexity, the token count,
    the windows evaluated, the scored token count and the windowing.
    """
    tokens = np.asarray(token_ids, np.int64)
    plan = windows(tokens.size, context, stride)
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"--max-windows must be >= 1, got {max_windows}")
        plan = plan[:max_windows]
    length = plan[0].length
    if length > pipeline.max_context:
        raise ValueError(f"windows of {length} tokens do not fit the bundle's context of {pipeline.max_context}; "
                         f"use a smaller --context")
    t = pipeline.text_cfg
    cache = PromptCache.allocate(t["num_layers"], 1, t["num_kv_heads"], t["head_dim"], length, pipeline.device)
    model = pipeline.model
    nll, scored = 0.0, 0
    for w in plan:
        ids = tokens[w.start:w.start + w.length].copy()
        if stride is None and bos_id is not None:
            ids[0] = bos_id
        cache.lengths[:] = 0
        keep = w.length - w.first_scored
        positions = np.arange(w.length, dtype=np.int64)[None]
        if model.rope_axes == 3:
            positions = np.broadcast_to(positions[None], (3, 1, w.length))
        logits = model.forward(ids[None], positions, cache, w.length, keep=keep)[0]
        targets = ids[w.first_scored + 1:]  # the token after each scored position but the window's last
        logp = log_softmax(logits[:-1])
        nll -= float(logp[np.arange(targets.size), targets].sum())
        scored += targets.size
    mode = "llama.cpp perplexity: non-overlapping windows, second half scored" if stride is None else \
        "llama.cpp --ppl-stride: windows of context + stride/2 every stride tokens, last stride tokens scored"
    return {"perplexity": float(np.exp(nll / scored)), "tokens": int(tokens.size), "windows": len(plan),
            "scored_tokens": scored, "mean_nll": nll / scored, "context": context, "stride": stride,
            "window_tokens": length, "windowing": mode}


def text_tokens(pipeline, text: str) -> tuple[list[int], int | None]:
    """The text's token ids as llama-perplexity tokenizes it (BOS first when the tokenizer adds one),
    and the BOS id to put at the start of each window (None when there is none)."""
    info = pipeline.bundle.manifest["tokenizer"]
    ids = pipeline.tokenizer.encode(text, add_special_tokens=False).ids
    bos = info.get("bos_token") if info.get("add_bos_token") else None
    if bos is None:
        return ids, None
    bos_id = pipeline.tokenizer.token_to_id(bos)
    return [bos_id, *ids], bos_id
