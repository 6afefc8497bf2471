"""The decode loop: prefill, decode one token, decode n tokens. Read it top to bottom.

The KV cache is one buffer per layer and per key/value, [batch, kv_heads, max_context, head_dim],
allocated once. The same buffer is bound as the decoder's `past_key_values.*` input and `present.*`
output; the exported GroupQueryAttention writes the new positions in place. Tensors stay on the
session's device (IO binding) and only the last-token logits come back to the host for sampling.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort


@dataclass
class KVCache:
    """Rows (slots) of KV cache, each holding one sequence; a view covers a contiguous range of them.

    On the CPU the buffers are numpy arrays wrapped without a copy, so slots can be copied on the host
    (shared prefixes, compaction); on a GPU they live on the device and only whole views are bound.
    """

    buffers: list[ort.OrtValue]  # one per layer and key/value, [slots, kv_heads, max_context, head_dim]
    arrays: list[np.ndarray] | None  # the host memory behind `buffers` (CPU only)
    input_names: list[str]
    output_names: list[str]
    max_context: int
    lengths: np.ndarray  # valid tokens per row of this view (a view into the parent's lengths)
    device: str = "cpu"
    start: int = 0  # first slot of this view

    @classmethod
    def allocate(cls, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_context: int,
                 device: str = "cpu", dtype=np.float32) -> KVCache:
        shape = [batch, kv_heads, max_context, head_dim]
        if device == "cpu":
            arrays = [np.zeros(shape, dtype) for _ in range(2 * num_layers)]
            buffers = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        else:
            arrays = None
            buffers = [ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0)
                       for _ in range(2 * num_layers)]
        ins = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
        outs = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
        return cls(buffers, arrays, ins, outs, max_context, np.zeros(batch, np.int64), device)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def on_host(self) -> bool:
        return self.arrays is not None

    def view(self, start: int, stop: int) -> KVCache:
        """Slots [start, stop) as their own cache; writes through to this one."""
        return KVCache(self.buffers, self.arrays, self.input_names, self.output_names, self.max_context,
                       self.lengths[start:stop], self.device, self.start + start)

    def bind(self, io: ort.IOBinding) -> None:
        """Bind each buffer's rows of this view as both past input and present output (in place)."""
        full = self.buffers[0].shape()
        dtype = np.float16 if self.buffers[0].data_type() == "tensor(float16)" else np.float32
        slot_bytes = int(np.prod(full[1:])) * np.dtype(dtype).itemsize
        shape = [self.batch, *full[1:]]
        for name_in, name_out, buf in zip(self.input_names, self.output_names, self.buffers, strict=True):
            ptr = buf.data_ptr() + self.start * slot_bytes
            io.bind_input(name_in, self.device, 0, dtype, shape, ptr)
            io.bind_output(name_out, self.device, 0, dtype, shape, ptr)

    def copy_rows(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (host buffers only)."""
        if self.arrays is None:
            raise RuntimeError("KV slots can only be copied in host memory")
        a, b = self.start + src, self.start + dst
        for arr in self.arrays:
            arr[b, :, :length] = arr[a, :, :length]
        self.lengths[dst] = length

    def attention_mask(self, new_tokens: int) -> np.ndarray:
        """Right-padded mask over valid past plus `new_tokens` per row."""
        total = self.lengths + new_tokens
        return (np.arange(int(total.max()))[None, :] < total[:, None]).astype(np.int64)


@dataclass
class Sessions:
    embed: ort.InferenceSession
    decoder: ort.InferenceSession
    device: str = "cpu"
    rope_axes: int = 3  # M-RoPE position ids are [3, B, S]; plain RoPE ones [B, S]
    _empty_image: ort.OrtValue | None = None

    def embed_tokens(self, input_ids: np.ndarray, image_embeds: ort.OrtValue | None = None) -> ort.OrtValue:
        """Token embeddings [B, S, H] on the device, with image embeddings at the image-pad positions."""
        if image_embeds is None:
            # The graph gathers from image_embeds even where no image token is present: feed one zero row.
            if self._empty_image is None:
                hidden = self.decoder.get_inputs()[0].shape[2]
                self._empty_image = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, hidden), np.float32), self.device, 0)
            image_embeds = self._empty_image
        io = self.embed.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
        io.bind_ortvalue_input("image_embeds", image_embeds)
        io.bind_output("inputs_embeds", self.device)
        self.embed.run_with_iobinding(io)
        return io.get_outputs()[0]

    def run_decoder(self, inputs_embeds: ort.OrtValue, position_ids: np.ndarray, cache: KVCache,
                    new_tokens: int) -> np.ndarray:
        """One decoder call over `new_tokens` per row; returns last-token logits [B, V] on the host."""
        io = self.decoder.io_binding()
        io.bind_ortvalue_input("inputs_embeds", inputs_embeds)
        io.bind_cpu_input("attention_mask", cache.attention_mask(new_tokens))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        io.bind_output("logits", "cpu")  # first: get_outputs() follows binding order
        cache.bind(io)
        self.decoder.run_with_iobinding(io)
        cache.lengths += new_tokens
        return io.get_outputs()[0].numpy()[:, -1, :]


def prefill(sessions: Sessions, cache: KVCache, input_ids: np.ndarray, position_ids: np.ndarray,
            image_embeds: ort.OrtValue | None = None) -> np.ndarray:
    """Run the whole prompt [B, S] (rows of equal length) through the decoder; logits of its last token."""
    if int(cache.lengths.max()) + input_ids.shape[1] > cache.max_context:
        raise ValueError(f"prompt of {input_ids.shape[1]} tokens does not fit the remaining context "
                         f"({cache.max_context - int(cache.lengths.max())} tokens)")
    embeds = sessions.embed_tokens(input_ids, image_embeds)
    return sessions.run_decoder(embeds, position_ids, cache, input_ids.shape[1])


def batch_positions(positions: np.ndarray, batch: int) -> np.ndarray:
    """[axes, S] positions of one prompt -> the decoder's [3, B, S] (M-RoPE) or [B, S] (plain RoPE)."""
    if positions.ndim == 1 or positions.shape[0] == 1:
        return np.broadcast_to(positions.reshape(1, -1), (batch, positions.size))
    return np.broadcast_to(positions[:, None, :], (positions.shape[0], batch, positions.shape[1]))


def decode_one_token(sessions: Sessions, cache: KVCache, token_ids: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Feed one token per row at that row's next position; logits for the token after it, [B, V]."""
    index = (cache.lengths + delta)[:, None]  # [B, 1]
    positions = index if sessions.rope_axes == 1 else np.broadcast_to(index[None], (3, cache.batch, 1))
    embeds = sessions.embed_tokens(token_ids.reshape(-1, 1))
    return sessions.run_decoder(embeds, positions, cache, 1)


@dataclass
class Sampler:
    """Greedy when temperature is 0; otherwise temperature / top-k / top-p with a seeded generator."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling settings temperature={self.temperature} top_k={self.top_k} "
                             f"top_p={self.top_p}: need temperature>=0, top_k>=0, 0<top_p<=1")
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """[B, V] logits -> [B] token ids."""
        if self.temperature == 0:
            return logits.argmax(-1)
        return np.array([self._sample_row(row) for row in logits], np.int64)

    def _sample_row(self, logits: np.ndarray) -> int:
        z = logits.astype(np.float64) / self.temperature
        if self.top_k:
            kth = np.partition(z, -self.top_k)[-self.top_k]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p < 1:
            order = np.argsort(-p)
            keep = np.cumsum(p[order]) - p[order] < self.top_p
            mask = np.zeros_like(p, bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0)
            p /= p.sum()
        return int(self.rng.choice(p.size, p=p))


def decode_n_tokens(sessions: Sessions, cache: KVCache, first_logits: np.ndarray, delta: np.ndarray,
                    max_new_tokens: int, stop_ids: set[int], sampler: Sampler,
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (tokens [B], logits [B, V]) per step until every row stopped or hit its limit.

    A row that produced a stop token or reached the end of the context stops; finished rows keep being
    fed (their output ignored) so the batch stays rectangular. `cache.lengths` tells each row's length.
    """
    logits = first_logits
    done = np.zeros(cache.batch, bool)
    for step in range(max_new_tokens):
        tokens = sampler(logits)
        yield tokens, logits
        done |= np.isin(tokens, list(stop_ids))
        if done.all() or step == max_new_tokens - 1 or int(cache.lengths.max()) >= cache.max_context:
            return
        logits = decode_one_token(sessions, cache, tokens, delta)


def decode_batch(sessions: Sessions, cache: KVCache, first_logits: np.ndarray, delta: np.ndarray,
                 max_new_tokens: int, stop_ids: set[int], sampler: Sampler,
                 ) -> tuple[list[list[int]], list[str], list[float]]:
    """Decode every row of `cache` together, one token per row per step; rows that finish drop out.

    On host buffers the rows still running are compacted into the front slots, so each step binds only
    live sequences; device buffers keep finished rows in place and ignore their output. Returns per-row
    tokens (stop token excluded), finish reasons and the wall time of each step.
    """
    tokens: list[list[int]] = [[] for _ in range(cache.batch)]
    finish = ["length"] * cache.batch
    done = [False] * cache.batch
    rows = list(range(cache.batch))  # rows[slot] = the sequence held in that slot
    view, delta, logits = cache, delta.copy(), first_logits
    step_ms: list[float] = []
    for step in range(max_new_tokens):
        t0 = time.perf_counter()
        next_ids = sampler(logits)
        live = []
        for slot, row in enumerate(rows):
            if done[row]:
                continue
            token = int(next_ids[slot])
            if token in stop_ids:
                finish[row], done[row] = "stop", True
                continue
            tokens[row].append(token)
            # Every bound row is written at its next position, so the longest one bounds the batch.
            if step == max_new_tokens - 1 or int(view.lengths.max()) >= cache.max_context:
                done[row] = True
                continue
            live.append(slot)
        if not live:
            break
        if cache.on_host and len(live) < len(rows):
            for new_slot, old_slot in enumerate(live):
                if new_slot != old_slot:
                    view.copy_rows(old_slot, new_slot, int(view.lengths[old_slot]))
            rows, next_ids, delta = [rows[s] for s in live], next_ids[live], delta[live]
            view = cache.view(0, len(live))
        logits = decode_one_token(sessions, view, next_ids, delta)
        step_ms.append((time.perf_counter() - t0) * 1e3)
    return tokens, finish, step_ms


class TextStream:
    """Incremental detokenizer: emits only complete characters as new tokens arrive."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        delta, self.text = text[len(self.text):], text
        return delta
