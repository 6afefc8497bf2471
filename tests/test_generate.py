"""The decode loop's hooks: trim, k-token verification, logits processors, sampler, streaming, observers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from focalrt.runtime.generation import planning
from focalrt.runtime.generation.generate import (
    PromptCache,
    Row,
    Sampler,
    batch_positions,
    decode_one_token,
    generate,
    prefill,
    verify,
)
from focalrt.runtime.pipeline import Pipeline

BOX = (170, 80, 280, 200)


def _text_positions(n: int, axes: int) -> np.ndarray:
    pos = np.arange(n, dtype=np.int64)[None]
    return np.repeat(pos, axes, axis=0) if axes > 1 else pos


def _two_rows(pipe: Pipeline, lengths=(19, 31)) -> tuple[PromptCache, np.ndarray]:
    """A fresh two-slot cache with a text prompt of a different length in each row; first logits [2, V]."""
    t = pipe.text_cfg
    cache = PromptCache.allocate(t["num_layers"], 2, t["num_kv_heads"], t["head_dim"], 256)
    rng = np.random.default_rng(0)
    first = []
    for row, n in enumerate(lengths):
        ids = rng.integers(100, 5000, size=n)
        first.append(prefill(pipe.model, cache.view(row, row + 1), ids[None],
                             batch_positions(_text_positions(n, pipe.model.rope_axes), 1))[0])
    return cache, np.stack(first)


def _greedy_steps(pipe: Pipeline, cache: PromptCache, first: np.ndarray, k: int):
    """k batched single steps: the tokens fed [B, k] and the logits after each [B, k, V]."""
    delta = np.zeros(cache.batch, np.int64)
    tokens, logits, step = [], [], first
    for _ in range(k):
        tok = step.argmax(-1)
        tokens.append(tok)
        step = decode_one_token(pipe.model, cache, tok, delta)
        logits.append(step)
    return np.stack(tokens, 1), np.stack(logits, 1)


def test_verify_k_tokens_equals_k_single_steps_rows_at_different_lengths(pipe):
    k = 5
    cache, first = _two_rows(pipe)
    start = cache.lengths.copy()
    tokens, single = _greedy_steps(pipe, cache, first, k)
    assert len({tuple(r) for r in tokens}) == 2, "the rows must differ for the test to mean much"
    cache.trim(k)
    np.testing.assert_array_equal(cache.lengths, start)
    got = verify(pipe.model, cache, tokens, np.zeros(2, np.int64))
    assert got.shape == (2, k, single.shape[-1])
    np.testing.assert_allclose(got, single, atol=1e-4, rtol=0)
    assert (got.argmax(-1) == single.argmax(-1)).all()
    np.testing.assert_array_equal(cache.lengths, start + k)


def test_trim_rolls_one_row_back_and_decoding_resumes_exactly(pipe):
    cache, first = _two_rows(pipe)
    tokens, single = _greedy_steps(pipe, cache, first, 6)
    before = cache.lengths.copy()
    cache.trim(4, rows=[1])  # row 1 forgets its last 4 tokens; row 0 keeps everything
    np.testing.assert_array_equal(cache.lengths, before - [0, 4])
    view = cache.view(1, 2)
    again = [decode_one_token(pipe.model, view, tokens[1:, i], np.zeros(1, np.int64))[0] for i in range(2, 6)]
    np.testing.assert_allclose(np.stack(again), single[1, 2:], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(cache.lengths, before)
    with pytest.raises(ValueError, match="cannot trim"):
        cache.trim(int(cache.lengths.max()) + 1)


def test_draft_accept_then_trim_gives_plain_greedy(pipe):
    """A draft that is right for 2 tokens and then wrong: verify, keep the accepted ones, trim the rest."""
    cache, first = _two_rows(pipe, lengths=(23,))
    cache = cache.view(0, 1)
    tokens, _ = _greedy_steps(pipe, cache, first[:1], 6)
    cache.trim(6)
    draft = tokens.copy()
    draft[0, 3] = (draft[0, 3] + 1) % 5000  # position 3 is wrong
    logits = verify(pipe.model, cache, draft, np.zeros(1, np.int64))
    model_says = np.concatenate([first[:1].argmax(-1), logits[0].argmax(-1)])  # next token after each prefix
    accepted = 0
    while accepted < draft.shape[1] and draft[0, accepted] == model_says[accepted]:
        accepted += 1
    assert accepted == 3
    cache.trim(draft.shape[1] - accepted)
    nxt = model_says[accepted]
    assert nxt == tokens[0, 3]  # the model's own token where the draft went wrong
    rest = decode_one_token(pipe.model, cache, np.array([nxt]), np.zeros(1, np.int64))
    assert rest.argmax(-1)[0] == tokens[0, 4]


def test_a_bundle_without_all_position_logits_refuses_to_verify(pipe):
    cache, _ = _two_rows(pipe)
    old = dataclasses.replace(pipe.model, names=dataclasses.replace(pipe.model.names, logits_to_keep=None))
    with pytest.raises(ValueError, match="re-export"):
        verify(old, cache, np.ones((2, 3), np.int64), np.zeros(2, np.int64))


def test_logits_processor_forces_a_token(pipe, astronaut_bgr):
    free = pipe.describe(astronaut_bgr, box=BOX, max_new_tokens=8)
    forced_token = 1234
    assert forced_token not in free.token_ids[:3]

    def force_at_two(tokens: np.ndarray, logits: np.ndarray) -> np.ndarray:
        if len(tokens) == 2:
            logits[:] = -np.inf
            logits[forced_token] = 0.0
        return logits

    d = pipe.describe(astronaut_bgr, box=BOX, max_new_tokens=8, logits_processors=[force_at_two])
    assert d.token_ids[:2] == free.token_ids[:2]
    assert d.token_ids[2] == forced_token


def test_per_row_processors_in_one_batch(pipe, astronaut_bgr):
    """Row 1 is forced, row 0 is not: each row's processors touch only that row."""
    boxes = [BOX, (190, 120, 260, 170)]
    free = [pipe.describe(astronaut_bgr, box=b, max_new_tokens=6).token_ids for b in boxes]
    plan = planning.plan(pipe.setup, [planning.Request(astronaut_bgr, b) for b in boxes])
    assert len(plan.inputs) == 1  # two regions of one image: one encoder input
    embeds = pipe.encode(plan.inputs[0])
    rows = []
    for region in plan.rows:
        positions, delta = pipe.adapter.positions(region.prompt.token_ids)
        rows.append(Row(region.prompt.token_ids, positions, delta, region.prompt.prefix_len, embeds, 0,
                        pipe.image_token_id))
    seen: list[list[int]] = [[], []]

    def force(tokens, logits):
        logits[:] = -np.inf
        logits[77] = 0.0
        return logits

    cache = pipe.cache.resized(2)
    out = generate(pipe.model, cache, rows, 6, pipe.stop_ids, Sampler(),
                   logits_processors=[[], [force]], on_token=lambda row, tok: seen[row].append(tok))
    assert out.tokens[0] == free[0]
    assert out.tokens[1] == [77] * 6
    assert seen == out.tokens


def test_sampler_hook_replaces_sampling(pipe, astronaut_bgr):
    calls = []

    def second_best(logits: np.ndarray) -> np.ndarray:
        calls.append(logits.shape)
        return np.argsort(logits, axis=-1)[:, -2]

    d = pipe.describe(astronaut_bgr, box=BOX, max_new_tokens=6, sampler=second_best, return_logits=True)
    assert len(calls) == len(d.logits) == len(d.token_ids) == 6
    assert d.token_ids == [int(np.argsort(lg)[-2]) for lg in d.logits]
    greedy = pipe.describe(astronaut_bgr, box=BOX, max_new_tokens=6)
    assert d.token_ids != greedy.token_ids


def test_on_token_streams_every_emitted_token(pipe, astronaut_bgr):
    streamed: list[int] = []
    text: list[str] = []
    d = pipe.describe(astronaut_bgr, box=BOX, max_new_tokens=10, on_token=streamed.append, on_text=text.append)
    assert streamed == d.token_ids
    assert "".join(text) == d.text


def test_observers_see_prefill_and_each_decode_step_without_patching(pipe, astronaut_bgr):
    steps: list[tuple[int, int]] = []
    vision: list[tuple] = []

    def on_decoder(seen):
        steps.append((seen.step, seen.new_tokens))

    pipe.model.observers.append(on_decoder)
    pipe.vision_observers.append(lambda feeds: vision.append(tuple(feeds)))
    try:
        d = pipe.describe(astronaut_bgr, box=BOX, max_new_tokens=5)
    finally:
        pipe.model.observers.clear()
        pipe.vision_observers.clear()
    assert steps == [(0, len(d.prompt_token_ids)), (1, 1), (2, 1), (3, 1), (4, 1)]
    assert vision == [("pixel_values",)]


def test_generation_options_and_keywords_are_the_same_request(pipe, astronaut_bgr):
    from focalrt.runtime.pipeline import GenerationOptions, ImageRegions

    opts = GenerationOptions(max_new_tokens=5, temperature=0.8, top_k=20, seed=3)
    a = pipe.describe(astronaut_bgr, box=BOX, options=opts)
    b = pipe.describe(astronaut_bgr, box=BOX, max_new_tokens=5, temperature=0.8, top_k=20, seed=3)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 5
    views = pipe.describe_images([ImageRegions(astronaut_bgr, [BOX])], options=GenerationOptions(max_new_tokens=4))
    assert views[0][0].token_ids == pipe.describe(astronaut_bgr, box=BOX, max_new_tokens=4).token_ids
    with pytest.raises(TypeError, match="unknown generation option"):
        pipe.describe(astronaut_bgr, box=BOX, max_tokens=4)


def test_cached_decoder_bindings_follow_the_cache_they_were_made_for(pipe):
    """The decoder keeps its KV bindings between calls; a second cache (new buffers) must not decode into the
    first one's memory, and going back to the first must resume it exactly."""
    cache_a, first_a = _two_rows(pipe)
    tokens_a, logits_a = _greedy_steps(pipe, cache_a, first_a, 3)
    cache_b, first_b = _two_rows(pipe, lengths=(23, 11))  # other buffers, same view shapes
    _greedy_steps(pipe, cache_b, first_b, 2)
    more_a = _greedy_steps(pipe, cache_a, logits_a[:, -1], 3)
    fresh, fresh_first = _two_rows(pipe)
    np.testing.assert_array_equal(_greedy_steps(pipe, fresh, fresh_first, 3)[0], tokens_a)
    expected = _greedy_steps(pipe, fresh, logits_a[:, -1], 3)
    np.testing.assert_array_equal(more_a[0], expected[0])
    np.testing.assert_allclose(more_a[1], expected[1], atol=1e-4)


def test_a_host_cache_grows_to_what_the_rows_need_and_decodes_the_same(pipe, astronaut_bgr):
    """KV sized to the work: a cache starting at 8 positions grows (keeping what it holds) through a region
    prompt and its answer, and gives the tokens a cache of the whole context gives; it never passes the
    context, and rows that need less never make it grow."""
    t = pipe.text_cfg
    whole = pipe.describe(astronaut_bgr, box=BOX, max_new_tokens=8)
    small = PromptCache.allocate(t["num_layers"], 1, t["num_kv_heads"], t["head_dim"], pipe.max_context, capacity=8)
    assert small.capacity == 8
    full, pipe.cache = pipe.cache, small
    try:
        grown = pipe.describe(astronaut_bgr, box=BOX, max_new_tokens=8)
    finally:
        pipe.cache = full
    assert grown.token_ids == whole.token_ids
    need = len(whole.prompt_token_ids) + 8
    assert need - 1 <= small.capacity < 2 * need and small.capacity < pipe.max_context
    assert small.buffers[0].shape()[2] == small.arrays[0].shape[2] == small.capacity
    view = small.view(0, 1)
    assert not view.reserve(small.capacity)  # enough already: nothing replaced
    with pytest.raises(ValueError, match="do not fit the context"):
        view.reserve(pipe.max_context + 1)
    assert view.reserve(small.capacity + 1) and small.buffers[0] is view.buffers[0]  # a view grows the whole cache
