"""Draft decoding: proposals (pure functions), and exactness of verification inside the decode loop.

The exactness tests compare `generate` with drafts against the same call without them: greedy output
must be token-for-token identical whatever the drafts are (right, partly right, all wrong), in batches
whose rows accept different lengths, with stops and limits inside accepted spans, near the context end
and with logits processors.
"""

from __future__ import annotations

import numpy as np
import pytest

from focalrt.runtime.generation.drafts import Drafter, Drafts, DraftState, propose, suffix_match
from focalrt.runtime.generation.generate import PromptCache, Row, Sampler, generate
from focalrt.runtime.pipeline import Pipeline

# ---------------------------------------------------------------- proposals


def test_suffix_match_prefers_longest_then_nearest_position():
    history = np.array([5, 6, 7, 1, 2, 5, 6, 9, 4])
    assert suffix_match(np.array([6]), history) == (1, 2)  # 6 at index 1 and 6: index 1 ends nearest to len 1
    assert suffix_match(np.array([3, 3, 3, 3, 3, 3, 5, 6]), history) == (2, 7)  # [5, 6] nearest to position 8
    assert suffix_match(np.array([2, 5, 6]), history) == (3, 7)  # the longer match wins over nearness
    assert suffix_match(np.array([8]), history) == (0, 0)
    assert suffix_match(np.array([4]), history) == (0, 0)  # at the very end: nothing follows it


def test_propose_history_then_prompt_then_nothing():
    history = np.array([10, 11, 12, 13, 14])
    prompt = np.array([1, 2, 3, 4, 5, 6])
    draft, source = propose(np.array([], np.int64), history, prompt, k=3)
    assert draft.tolist() == [10, 11, 12] and source == "history"  # nothing generated: the history's start
    draft, source = propose(np.array([10, 11]), history, prompt, k=8)
    assert draft.tolist() == [12, 13, 14] and source == "history"
    draft, source = propose(np.array([9, 2, 3]), history, prompt, k=2)
    assert draft.tolist() == [4, 5] and source == "prompt"
    draft, source = propose(np.array([9, 3]), history, prompt, k=2)  # one token in common: too weak for the prompt
    assert draft.size == 0 and source == ""
    assert propose(np.array([1, 2]), None, None, k=4)[0].size == 0


def test_k_adapts_to_acceptance_and_states_are_per_region():
    drafts = Drafts("temporal", k=4, k_max=8)
    a = drafts.drafter((1, "mouth"), np.array([1, 2, 3]))
    a.feedback(4, 4)
    assert a.state.k == 6
    a.feedback(6, 6)
    a.feedback(8, 8)
    assert a.state.k == 8  # capped at k_max
    a.feedback(8, 2)
    assert a.state.k == 3  # shrinks to what was accepted plus one
    a.feedback(3, 0)
    assert a.state.k == 1
    b = drafts.drafter((1, "eyes"), np.array([1, 2, 3]))
    assert b.state.k == 4 and b.state is not a.state
    drafts.remember((1, "mouth"), [7, 8, 9])
    assert drafts.drafter((1, "mouth"), np.array([])).propose(np.array([], np.int64), 2).tolist() == [7]  # k is 1
    assert drafts.stats() == {"mode": "temporal", "proposed": 29, "accepted": 20, "acceptance": round(20 / 29, 4)}
    drafts.forget_face(1)
    assert not drafts.states and drafts.stats()["proposed"] == 29
    prompt_only = Drafts("prompt")
    prompt_only.remember((1, "mouth"), [7, 8, 9])
    assert prompt_only.drafter((1, "mouth"), np.array([7, 8, 9, 10])).propose(np.array([], np.int64), 4).size == 0
    assert Drafts("off").drafter((1, "mouth"), np.array([1])) is None
    with pytest.raises(ValueError, match="unknown draft mode 'fast'"):
        Drafts("fast")


# ---------------------------------------------------------------- exactness of verification


class Scripted:
    """A draft hook that proposes from a fixed script: what the model will say, or a corruption of it."""

    def __init__(self, script: list[int], k: int = 4) -> None:
        self.script, self.k = list(script), k
        self.proposed = self.accepted = 0

    def propose(self, generated: np.ndarray, limit: int) -> np.ndarray:
        n = len(generated)
        return np.array(self.script[n:n + min(self.k, limit)], np.int64)

    def feedback(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted


def text_rows(pipe: Pipeline, lengths: list[int], seed: int = 0) -> list[Row]:
    """Rows of random text prompts (no image), plain positions."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        ids = rng.integers(100, 5000, size=n).astype(np.int64)
        pos = np.arange(n, dtype=np.int64)[None]
        positions = np.repeat(pos, pipe.model.rope_axes, axis=0) if pipe.model.rope_axes > 1 else pos
        rows.append(Row(ids, positions, 0))
    return rows


def run(pipe: Pipeline, rows: list[Row], max_new_tokens: int, stop_ids=(), draft=None, processors=None,
        sampler=None, max_context: int = 256):
    t = pipe.text_cfg
    cache = PromptCache.allocate(t["num_layers"], len(rows), t["num_kv_heads"], t["head_dim"], max_context)
    return generate(pipe.model, cache, rows, max_new_tokens, set(stop_ids), sampler or Sampler(), processors,
                    draft=draft)


def corrupt(script: list[int], at: set[int]) -> list[int]:
    return [(t + 1) % 5000 if i in at else t for i, t in enumerate(script)]


@pytest.mark.parametrize("case", ["right", "partly", "wrong"])
def test_greedy_output_identical_whatever_the_draft(pipe, case):
    rows = text_rows(pipe, [21])
    plain = run(pipe, rows, 24)
    free = plain.tokens[0]
    script = {"right": free, "partly": corrupt(free, {3, 9, 10, 17}), "wrong": corrupt(free, set(range(24)))}[case]
    hook = Scripted(script, k=5)
    got = run(pipe, rows, 24, draft=[hook])
    assert got.tokens == plain.tokens and got.finish == plain.finish
    assert got.drafted == [hook.proposed] and got.accepted == [hook.accepted]
    assert hook.proposed > 0
    if case == "right":
        assert hook.accepted == hook.proposed and len(got.step_ms) < len(plain.step_ms) // 3
    elif case == "partly":
        assert 0 < hook.accepted < hook.proposed
    else:
        assert hook.accepted == 0 and len(got.step_ms) == len(plain.step_ms)


def test_stop_and_token_limit_inside_an_accepted_span(pipe):
    rows = text_rows(pipe, [17], seed=1)
    free = run(pipe, rows, 20).tokens[0]
    stop = free[6]
    assert stop not in free[:6]
    plain = run(pipe, rows, 20, stop_ids={stop})
    assert plain.tokens[0] == free[:6] and plain.finish == ["stop"]
    got = run(pipe, rows, 20, stop_ids={stop}, draft=[Scripted(free, k=8)])  # the stop sits mid-draft
    assert got.tokens == plain.tokens and got.finish == ["stop"]
    assert len(got.step_ms) == 1  # one verify call covered the first 6 tokens and the stop
    limited = run(pipe, rows, 7, draft=[Scripted(free, k=8)])
    assert limited.tokens[0] == free[:7] and limited.finish == ["length"] and len(limited.step_ms) == 1


def test_batched_rows_accept_different_lengths(pipe):
    rows = text_rows(pipe, [19, 31, 24], seed=2)
    alone = [run(pipe, [r], 16).tokens[0] for r in rows]
    assert len({tuple(t) for t in alone}) == 3, "the rows must diverge for the test to mean much"
    hooks = [Scripted(alone[0], k=6), Scripted(corrupt(alone[1], {2, 5, 11}), k=3), None]
    got = run(pipe, rows, 16, draft=hooks)
    assert got.tokens == alone
    assert got.accepted[0] == got.drafted[0] > 0 and 0 < got.accepted[1] < got.drafted[1] and got.drafted[2] == 0
    plain = run(pipe, rows, 16)
    assert plain.tokens == alone


def test_rows_stopping_at_different_times_in_a_drafted_batch(pipe):
    rows = text_rows(pipe, [18, 22], seed=3)
    free = [run(pipe, [r], 14).tokens[0] for r in rows]
    stop = free[0][4]
    plain = run(pipe, rows, 14, stop_ids={stop})
    got = run(pipe, rows, 14, stop_ids={stop}, draft=[Scripted(free[0], k=8), Scripted(free[1], k=2)])
    assert got.tokens == plain.tokens and got.finish == plain.finish
    assert got.finish[0] == "stop"


def test_context_near_its_end(pipe):
    rows = text_rows(pipe, [30], seed=4)
    plain = run(pipe, rows, 40, max_context=38)
    assert plain.finish == ["length"] and len(plain.tokens[0]) < 40
    free = run(pipe, rows, 40).tokens[0]
    for k in (1, 3, 8):
        got = run(pipe, rows, 40, max_context=38, draft=[Scripted(free, k=k)])
        assert got.tokens == plain.tokens and got.finish == plain.finish


def test_processors_see_the_calls_of_plain_decoding(pipe):
    """A stateful processor (it logs what it was shown) sees only accepted tokens, in order, as without drafts."""
    rows = text_rows(pipe, [20], seed=5)
    free = run(pipe, rows, 12).tokens[0]

    def forcing(log: list):
        def process(tokens: np.ndarray, logits: np.ndarray) -> np.ndarray:
            log.append(tokens.tolist())
            if len(tokens) == 5:
                logits[:] = -np.inf
                logits[77] = 0.0
            return logits
        return process

    plain_log, draft_log = [], []
    plain = run(pipe, rows, 12, processors=[[forcing(plain_log)]])
    got = run(pipe, rows, 12, processors=[[forcing(draft_log)]], draft=[Scripted(free, k=4)])
    assert plain.tokens[0][5] == 77 != free[5]
    assert got.tokens == plain.tokens and draft_log == plain_log


def test_sampling_with_drafts_draws_the_same_tokens(pipe):
    """temperature > 0: a drafted token is accepted when the sample equals it, so a seeded single row
    draws the same random numbers in the same order and gives the same tokens."""
    rows = text_rows(pipe, [20], seed=6)
    greedy = run(pipe, rows, 16).tokens[0]
    plain = run(pipe, rows, 16, sampler=Sampler(temperature=0.7, seed=11))
    hook = Scripted(greedy, k=4)
    got = run(pipe, rows, 16, sampler=Sampler(temperature=0.7, seed=11), draft=[hook])
    assert got.tokens == plain.tokens and hook.proposed > 0


def test_temporal_drafts_through_the_pipeline(pipe, astronaut_bgr):
    """Describing the same region twice: the second time the first description drafts it, all accepted."""
    box = (170, 80, 280, 200)
    plain = pipe.describe(astronaut_bgr, box=box, max_new_tokens=12)
    drafts = Drafts("temporal")
    first = pipe.describe_images([(astronaut_bgr, [box], None)], max_new_tokens=12, drafts=drafts,
                               draft_keys=[["mouth"]])[0][0]
    again = pipe.describe_images([(astronaut_bgr, [box], None)], max_new_tokens=12, drafts=drafts,
                               draft_keys=[["mouth"]])[0][0]
    assert first.token_ids == again.token_ids == plain.token_ids
    assert again.timings_ms["decode_calls"] < plain.timings_ms["decode_calls"] // 2
    t = again.timings_ms  # the first token comes from prefill, and one more is the model's own after a draft
    assert t["draft_accepted"] == t["draft_proposed"] >= len(plain.token_ids) - 2
    assert drafts.stats()["accepted"] >= t["draft_accepted"]


@pytest.mark.slow  # exports or loads a model
def test_smollm2_greedy_identical_with_drafts(request):
    """Trained weights (SmolLM2-135M bundle, from the `smollm2` fixture when present): two prompts that
    differ in one word; the first answer drafts the second, which must equal plain greedy."""
    try:
        bundle = request.getfixturevalue("smollm2")[0]
    except pytest.FixtureLookupError:
        pytest.skip("needs the smollm2 bundle fixture (text-only bundles)")
    p = Pipeline.from_bundle(bundle)
    answers = []
    for city in ("Paris", "Lyon"):
        ids = np.array(p.tokenizer.encode(f"Describe {city} in two sentences.").ids, np.int64)
        pos = np.arange(ids.size, dtype=np.int64)[None]
        row = Row(ids, np.repeat(pos, p.model.rope_axes, axis=0) if p.model.rope_axes > 1 else pos, 0)
        plain = run(p, [row], 40, stop_ids=p.stop_ids, max_context=p.max_context)
        hook = Drafter(DraftState(np.array(answers[-1] if answers else [], np.int64)), ids)
        got = run(p, [row], 40, stop_ids=p.stop_ids, draft=[hook], max_context=p.max_context)
        assert got.tokens == plain.tokens
        answers.append(plain.tokens[0])


# ---------------------------------------------------------------- run, describe and bench with --draft


@pytest.fixture(scope="module")
def clip(tmp_path_factory, astronaut_bgr):
    from focalrt.demo import pan_zoom_frames, write_clip

    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", pan_zoom_frames(astronaut_bgr, 4))


def test_run_keeps_a_history_per_face_and_region(tiny_bundle, clip, pipe):
    from focalrt.runtime.stream.runner import RegionRunner, iter_events
    from focalrt.runtime.stream.sources import open_source

    texts = {}
    for mode in ("off", "temporal"):
        runner = RegionRunner(pipe, regions="mouth,left_eye", max_new_tokens=6, draft=mode)
        with open_source(str(clip)) as frames:
            texts[mode] = [(e["face_id"], e["region"], e["text"]) for e in iter_events(runner, frames)]
        if mode == "temporal":
            assert set(runner.drafts.states) == {(1, "mouth"), (1, "left_eye")}
            assert runner.drafts.stats()["proposed"] > 0
    assert texts["temporal"] == texts["off"] and len(texts["off"]) == 8


def test_describe_and_bench_take_draft(tiny_bundle, capsys, tmp_path):
    import json

    from focalrt import cli
    from focalrt.data import __file__ as data_init  # noqa: F401  (the packaged astronaut photo lives there)

    image = str(__import__("pathlib").Path(data_init).parent / "astronaut.jpg")
    out = {}
    for mode in ("off", "prompt"):
        assert cli.main(["describe", str(tiny_bundle), "--image", image, "--box", "170,80,280,200",
                         "--max-new-tokens", "6", "--json", "--draft", mode]) == 0
        out[mode] = json.loads(capsys.readouterr().out)
    assert out["prompt"]["token_ids"] == out["off"]["token_ids"]
    json_path = tmp_path / "bench.json"
    # A still image: each frame's description repeats the last, so the drafts are proposed and accepted.
    assert cli.main(["bench", str(tiny_bundle), "--source", image, "--regions", "mouth", "--runs", "2",
                     "--warmup", "1", "--max-new-tokens", "6", "--contexts", "16", "--context-steps", "2",
                     "--region-counts", "1", "--face-counts", "1", "--scaling-runs", "1", "--scaling-tokens", "2",
                     "--draft", "temporal", "--json", str(json_path)]) == 0
    report = capsys.readouterr().out
    assert "draft acceptance" in report and "draft tokens accepted / proposed" in report
    drafts = json.loads(json_path.read_text())["drafts"]
    assert drafts["mode"] == "temporal" and drafts["accepted"] == drafts["proposed"] > 0


def test_batched_rows_near_the_context_end_get_their_own_tokens(pipe):
    """A row's context ends where its own does: in a batch, a shorter prompt goes on after a longer one is
    full, with exactly the tokens it gets alone."""
    rows = text_rows(pipe, [30, 20], seed=5)
    alone = [run(pipe, [r], 40, max_context=38) for r in rows]
    got = run(pipe, rows, 40, max_context=38)
    assert got.tokens == [a.tokens[0] for a in alone] and got.finish == [a.finish[0] for a in alone]
    assert len(got.tokens[0]) < len(got.tokens[1]) < 40
