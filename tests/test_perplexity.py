"""`focalrt perplexity`: llama-perplexity's windowing, and the same number as transformers on the same windows.

The text is CPython's own reference documentation as the standard library ships it (pydoc_data.topics,
the text `help()` shows), so every install has it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from focalrt.runtime.generation.perplexity import windows


def cpython_topics_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def test_default_windows_are_non_overlapping_and_score_the_second_half():
    w = windows(1100, 512)
    assert [(x.start, x.length, x.first_scored) for x in w] == [(0, 512, 256), (512, 512, 256)]
    with pytest.raises(ValueError, match="at least 1024"):
        windows(1000, 512)


def test_strided_windows_follow_ppl_stride():
    w = windows(1000, 256, stride=128)  # windows of 256 + 64 = 320 tokens every 128
    assert w[0].length == 320 and w[1].start == 128 and w[0].first_scored == 320 - 128 - 1
    assert len(w) == math.ceil((1000 - 320) / 128)
    assert w[-1].start + w[-1].length <= 1000


def reference_perplexity(model, tokens: list[int], context: int, stride: int | None, max_windows: int) -> float:
    """transformers on each window from scratch, scored as llama-perplexity does (written out independently)."""
    import torch

    nll, count = 0.0, 0
    if stride is None:
        starts, length, first = [i * context for i in range(len(tokens) // context)], context, context // 2
    else:
        length = context + stride // 2
        starts = [i * stride for i in range((len(tokens) - length + stride - 1) // stride)]
        first = length - stride - 1
    for start in starts[:max_windows]:
        window = tokens[start:start + length]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([window])).logits[0].double(), -1)
        for j in range(first, length - 1):
            nll -= float(logp[j, window[j + 1]])
            count += 1
    return math.exp(nll / count)


@pytest.mark.slow
@pytest.mark.parametrize("stride", [None, 64])
def test_perplexity_equals_transformers_on_the_same_windows(smollm2, stride):
    from focalrt.runtime.generation.perplexity import measure, text_tokens
    from focalrt.runtime.pipeline import Pipeline

    bundle, model, tok = smollm2
    pipe = Pipeline.from_bundle(bundle, provider="cpu", max_batch=1)
    text = cpython_topics_text()[:20000]
    ids, bos = text_tokens(pipe, text)
    assert bos is None  # SmolLM2's GGUF says add_bos_token = false
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    ours = measure(pipe, ids, context=128, stride=stride, max_windows=4, bos_id=bos)
    ref = reference_perplexity(model, ids, 128, stride, 4)
    assert ours["windows"] == 4
    assert ours["scored_tokens"] == 4 * (63 if stride is None else 64)
    assert 3 < ours["perplexity"] < 100  # a trained model on English prose, not a random one (~49k)
    np.testing.assert_allclose(ours["perplexity"], ref, rtol=0.005)


@pytest.mark.slow
def test_cli_perplexity_json(smollm2, tmp_path):
    text = tmp_path / "topics.txt"
    text.write_text(cpython_topics_text()[:8000])
    r = subprocess.run([sys.executable, "-m", "focalrt.cli", "perplexity", str(smollm2[0]), "--text", str(text),
                        "--context", "128", "--max-windows", "2", "--json"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"perplexity", "tokens", "windows"} <= set(out) and out["windows"] == 2
    r = subprocess.run([sys.executable, "-m", "focalrt.cli", "perplexity", str(smollm2[0]), "--text", str(text),
                        "--context", "4096"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "needs at least" in r.stderr and "Traceback" not in r.stderr
