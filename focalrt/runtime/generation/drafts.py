"""Draft tokens for speculative decoding: a region's last description drafts its next one.

On a camera the same face region is described again and again, and the words barely change between
refreshes. `propose` aligns what has been generated so far with a token history by the longest suffix
match (prompt-lookup decoding) and proposes the tokens that followed it there. The history is, in order
of preference: the region's last emitted tokens (mode "temporal"), then the prompt ("prompt" mode, and
temporal's fallback), then nothing. The decode loop (`generate.decode(draft=...)`) verifies the draft in
one decoder call and keeps only what the model itself would have produced, so drafts change speed,
never output.

`Drafts` is the per-run store: one `DraftState` per key (face id, region), which keeps the last tokens
and the draft length k, adapted to acceptance (grow by 2 when a whole draft is accepted, otherwise
shrink to what was accepted plus one; as Hugging Face's assistant-length heuristic does).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

MODES = ("off", "temporal", "prompt")
DEFAULT_DRAFT = "temporal"  # the CLI default: measured faster here (docs/benchmarks.md, "Draft decoding")
DRAFT_HELP = ("draft decoding: temporal = a region's last description drafts its next one (prompt lookup as "
              "fallback), prompt = n-gram lookup in the prompt, off; same output, fewer decoder calls "
              f"(default {DEFAULT_DRAFT})")
MAX_MATCH = 8  # longest suffix tried when aligning (longer matches are rarely more telling)


def suffix_match(generated: np.ndarray, history: np.ndarray, min_match: int = 1,
                 max_match: int = MAX_MATCH) -> tuple[int, int]:
    """(match length, index in `history` just after the match) of the longest suffix of `generated` found
    in `history` with at least one token after it; (0, 0) when nothing matches.

    Among matches of equal length the one ending nearest to len(generated) wins: a region's new
    description tends to say the same things at about the same place as the last one.
    """
    n = len(generated)
    for m in range(min(max_match, n, len(history) - 1), min_match - 1, -1):
        tail = generated[n - m:]
        windows = np.lib.stride_tricks.sliding_window_view(history[:-1], m)  # matches with a token after them
        ends = np.flatnonzero((windows == tail).all(axis=1)) + m
        if ends.size:
            return m, int(ends[np.argmin(np.abs(ends - n))])
    return 0, 0


def propose(generated: np.ndarray, history: np.ndarray | None, prompt: np.ndarray | None, k: int,
            min_prompt_match: int = 2) -> tuple[np.ndarray, str]:
    """Up to k draft tokens to follow `generated`, and where they came from ("history", "prompt" or "").

    History: before any token is generated the draft is the history's start; after, the tokens that
    followed the longest suffix match. Prompt: the same lookup, but only on matches of at least
    `min_prompt_match` tokens (a single shared token in a long prompt is noise).
    """
    generated = np.asarray(generated, np.int64)
    if k < 1:
        return np.zeros(0, np.int64), ""
    if history is not None and len(history):
        history = np.asarray(history, np.int64)
        if not len(generated):
            return history[:k].copy(), "history"
        m, at = suffix_match(generated, history)
        if m:
            return history[at:at + k].copy(), "history"
    if prompt is not None and len(prompt) and len(generated) >= min_prompt_match:
        prompt = np.asarray(prompt, np.int64)
        m, at = suffix_match(generated, prompt, min_match=min_prompt_match)
        if m:
            return prompt[at:at + k].copy(), "prompt"
    return np.zeros(0, np.int64), ""


@dataclass
class DraftState:
    """What one region keeps between its descriptions: its last tokens, draft length and totals."""

    history: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    k: int = 4
    proposed: int = 0  # draft tokens offered to the verifier, over the run
    accepted: int = 0  # of which the model agreed with


@dataclass
class Drafter:
    """One row's drafting during one generation: the `draft` hook of `generate.decode`."""

    state: DraftState
    prompt: np.ndarray | None
    use_history: bool = True
    k_min: int = 1
    k_max: int = 8

    def propose(self, generated: np.ndarray, limit: int) -> np.ndarray:
        """Draft tokens to follow `generated` (emitted ids so far), at most `limit` of them."""
        history = self.state.history if self.use_history else None
        return propose(generated, history, self.prompt, min(self.state.k, limit))[0]

    def feedback(self, proposed: int, accepted: int) -> None:
        """How the verifier took the last draft; k grows on full acceptance and shrinks otherwise."""
        s = self.state
        s.proposed += proposed
        s.accepted += accepted
        s.k = min(self.k_max, s.k + 2) if accepted == proposed else max(self.k_min, accepted + 1)


@dataclass
class Drafts:
    """The run's draft store: a `DraftState` per key, e.g. (face id, region name)."""

    mode: str = "off"
    k: int = 4
    k_max: int = 8
    states: dict[Hashable, DraftState] = field(default_factory=dict)  # key None: one-off requests, no history
    retired: list[int] = field(default_factory=lambda: [0, 0])  # proposed, accepted of forgotten keys

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown draft mode {self.mode!r}; choose one of {', '.join(MODES)}")

    def drafter(self, key: Hashable | None, prompt_ids: np.ndarray) -> Drafter | None:
        """The drafter for one description of `key` (None: no history kept, prompt lookup only)."""
        if self.mode == "off":
            return None
        state = self.states.setdefault(key, DraftState(k=self.k))
        return Drafter(state, np.asarray(prompt_ids, np.int64), use_history=self.mode == "temporal",
                       k_max=self.k_max)

    def remember(self, key: Hashable | None, tokens: list[int]) -> None:
        """Keep `tokens` (a finished description) as the history that drafts `key`'s next one."""
        if self.mode == "temporal" and key is not None:
            self.states.setdefault(key, DraftState(k=self.k)).history = np.asarray(tokens, np.int64)

    def forget_face(self, face_id: int) -> None:
        """Drop the states of a face the tracker retired (keys (face_id, region)); their totals stay counted."""
        for key in [k for k in self.states if isinstance(k, tuple) and k and k[0] == face_id]:
            gone = self.states.pop(key)
            self.retired[0] += gone.proposed
            self.retired[1] += gone.accepted

    def stats(self) -> dict[str, float | int | str | None]:
        """Acceptance over the run: draft tokens proposed, accepted, and their ratio."""
        proposed = int(sum(s.proposed for s in self.states.values()) + self.retired[0])
        accepted = int(sum(s.accepted for s in self.states.values()) + self.retired[1])
        return {"mode": self.mode, "proposed": proposed, "accepted": accepted,
                "acceptance": round(accepted / proposed, 4) if proposed else None}
