"""The decode loop, top to bottom: the text model, the prompt cache, prefill, one step, k-token
verification, sampling, and `generate`, the one loop every caller uses (gpt-fast / mlx-lm style).

- `TextModel` holds the decoder session (token ids in: one call a step) with its tensor names from the
  manifest, and the observers that see every decoder call (calibration records through them); bundles
  exported before the decoder embedded its tokens also run their embedding session first.
- `PromptCache` owns the KV: one buffer per layer and per key/value, [slots, kv_heads, capacity,
  head_dim]; on the CPU the capacity starts at `KV_START_POSITIONS` and grows (doubling) to what the rows
  need, up to max_context. The same buffer is bound as the decoder's past input and present output; the
  exported GroupQueryAttention writes the new positions in place. It also owns
  prefix reuse (copying a shared prompt prefix between slots, and the prompt head that is the same on
  every frame) and `trim`, which rolls rows back.
- `generate` prefills a batch of rows (sharing each image's prefix when asked), gives each row a
  `Decoding` record and runs `decode`: per step `choose`, `propose` (drafts), `feed`. The hooks are
  mlx-lm's: a `sampler` ([B, V] logits -> [B] ids), per-row `logits_processors`
  ((tokens so far, logits [V]) -> logits [V]) and an `on_token(row, token)` callback for streaming.
- `verify` feeds k tokens per row in one decoder call and returns logits for each (draft decoding;
  text scoring uses the same all-position logits through `TextModel.forward(..., keep=S)`).

Tensors stay on the session's device (IO binding); only the logits come back to the host for sampling.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from focalrt.bundle import BundleError

# ---------------------------------------------------------------- tensor names, from the manifest


@dataclass(frozen=True)
class TensorNames:
    """Tensor names by role, read from the manifest's component records (defaults: what every export writes).

    Roles follow the order the exporter declares (`export/gqa.py::decoder_io_names`): the vision output;
    the decoder's token ids, image embeddings (vision families), attention mask, position ids,
    `logits_to_keep` and the past KV pairs; its outputs are logits, then the present KV pairs. A bundle
    exported before the decoder embedded its tokens has an embedding component (token ids, image
    embeddings -> embeddings) and a decoder taking `inputs_embeds` first (and `logits_to_keep` only if
    exported since k-token verification); `inputs_embeds` names that input, and is None otherwise.
    """

    vision_embeds: str = "image_embeds"  # the vision encoder's output
    token_ids: str = "input_ids"  # the decoder's (or the old embedding component's) token ids
    image_embeds: str | None = "image_embeds"  # None: a text-only bundle takes token ids alone
    token_embeds: str = "inputs_embeds"  # the old embedding component's output
    inputs_embeds: str | None = None  # the old decoder's embeddings input; None: the decoder embeds its tokens
    attention_mask: str = "attention_mask"
    position_ids: str = "position_ids"
    logits_to_keep: str | None = "logits_to_keep"  # None: the decoder returns the last token's logits only
    logits: str = "logits"
    past: tuple[str, ...] = ()
    present: tuple[str, ...] = ()

    @classmethod
    def from_manifest(cls, components: dict[str, Any], num_layers: int) -> TensorNames:
        """Names from the components' recorded inputs and outputs; components without records get the defaults."""
        default_past = tuple(f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value"))
        default_present = tuple(f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value"))
        vision, embed, decoder = (components.get(c, {}) for c in ("vision", "embed", "decoder"))
        v_out = [o["name"] for o in vision.get("outputs", [])]
        d_in = [i["name"] for i in decoder.get("inputs", [])]
        d_out = [o["name"] for o in decoder.get("outputs", [])]
        kv = 2 * num_layers
        names = cls(past=default_past, present=default_present)
        if v_out:
            names = replace(names, vision_embeds=v_out[0])
        if "embed" in components:
            return names.with_embedding_component(embed, d_in, d_out, num_layers)
        if not d_in:
            return names
        if len(d_in) not in (kv + 4, kv + 5) or len(d_out) != kv + 1:
            raise BundleError(f"the manifest's decoder record lists {len(d_in)} inputs and {len(d_out)} outputs; a "
                              f"{num_layers}-layer decoder has {kv + 4} or {kv + 5} inputs and {kv + 1} outputs "
                              f"(token ids[, image embeddings], mask, positions, logits_to_keep, KV; logits, KV): "
                              f"re-export the bundle")
        image = d_in[1] if len(d_in) == kv + 5 else None
        return replace(names, token_ids=d_in[0], image_embeds=image, inputs_embeds=None,
                       attention_mask=d_in[-kv - 3], position_ids=d_in[-kv - 2], logits_to_keep=d_in[-kv - 1],
                       past=tuple(d_in[-kv:]), logits=d_out[0], present=tuple(d_out[1:]))

    def with_embedding_component(self, embed: dict[str, Any], d_in: list[str], d_out: list[str],
                                 num_layers: int) -> TensorNames:
        """The names of a bundle exported before the decoder embedded its tokens (embed.onnx + decoder.onnx)."""
        e_in = [i["name"] for i in embed.get("inputs", [])]
        e_out = [o["name"] for o in embed.get("outputs", [])]
        kv = 2 * num_layers
        names = replace(self, inputs_embeds="inputs_embeds", logits_to_keep=None)
        if len(e_in) in (1, 2) and e_out:
            names = replace(names, token_ids=e_in[0], image_embeds=e_in[1] if len(e_in) == 2 else None,
                            token_embeds=e_out[0])
        if d_in and (len(d_in) not in (kv + 3, kv + 4) or len(d_out) != kv + 1):
            raise BundleError(f"the manifest's decoder record lists {len(d_in)} inputs and {len(d_out)} outputs; a "
                              f"{num_layers}-layer decoder has {kv + 3} or {kv + 4} inputs and {kv + 1} outputs "
                              f"(embeddings, mask, positions[, logits_to_keep], KV; logits, KV): re-export the bundle")
        if d_in:
            names = replace(names, inputs_embeds=d_in[0], attention_mask=d_in[1], position_ids=d_in[2],
                            logits_to_keep=d_in[3] if len(d_in) == kv + 4 else None,
                            past=tuple(d_in[-kv:]), logits=d_out[0], present=tuple(d_out[1:]))
        return names


# ---------------------------------------------------------------- the prompt cache (KV slots)

# Positions a host KV cache starts with: a region prompt (image tokens + text) and its answer fit, and the
# buffers double from there as rows need, up to max_context.
KV_START_POSITIONS = 256


@dataclass
class PromptCache:
    """Rows (slots) of KV cache, each holding one sequence; a view covers a contiguous range of them.

    On the CPU the buffers are numpy arrays wrapped without a copy, so slots can be copied on the host
    (shared prefixes, compaction); on a GPU they live on the device and only whole views are bound.
    Everything past a row's length is ignored by attention and overwritten by the next write, which is
    why `trim` only has to move the length back.
    """

    buffers: list[ort.OrtValue]  # one per layer and key/value, [slots, kv_heads, capacity, head_dim]
    arrays: list[np.ndarray] | None  # the host memory behind `buffers` (CPU only)
    max_context: int  # the most positions a row may hold; host buffers grow to it as rows need (`reserve`)
    lengths: np.ndarray  # valid tokens per row of this view (a view into the parent's lengths)
    device: str = "cpu"
    start: int = 0  # first slot of this view
    heads: dict[bytes, list[np.ndarray]] = field(default_factory=dict)  # prompt head ids -> its KV (host)

    @classmethod
    def allocate(cls, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_context: int,
                 device: str = "cpu", dtype=np.float32, capacity: int | None = None) -> PromptCache:
        """Buffers for `batch` rows of up to `max_context` positions. On the CPU they start at `capacity`
        positions (default `KV_START_POSITIONS`) and grow as rows need; a device cache is allocated whole
        (its buffers are bound by pointer and TensorRT's shape profiles are built for `max_context`)."""
        if device == "cpu":
            capacity = min(max_context, capacity or KV_START_POSITIONS)
        shape = [batch, kv_heads, capacity if device == "cpu" else max_context, head_dim]
        if device == "cpu":
            arrays = [np.zeros(shape, dtype) for _ in range(2 * num_layers)]
            buffers = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        else:
            arrays = None
            buffers = [ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0)
                       for _ in range(2 * num_layers)]
        return cls(buffers, arrays, max_context, np.zeros(batch, np.int64), device)

    def resized(self, batch: int) -> PromptCache:
        """A new cache of `batch` slots with this one's layout; the remembered prompt head carries over."""
        _, kv_heads, _, head_dim = self.buffers[0].shape()
        dtype = np.float16 if self.buffers[0].data_type() == "tensor(float16)" else np.float32
        new = PromptCache.allocate(len(self.buffers) // 2, batch, kv_heads, head_dim, self.max_context, self.device,
                                   dtype)
        new.heads = self.heads
        return new

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        """Positions the buffers hold now (up to `max_context`)."""
        return int(self.buffers[0].shape()[2])

    def reserve(self, positions: int) -> bool:
        """Make every row able to hold `positions` positions, growing the host buffers (at least doubling,
        up to `max_context`) and keeping their contents; True when the buffers were replaced.

        Why: a request needs prompt + new tokens, usually far below the bundle's context, so the cache
        holds what the work needs rather than the maximum for every slot. The buffer lists are updated in
        place, so every view of this cache sees the new buffers; bindings made over the old ones are stale
        (`TextModel.decoder_binding` notices).
        """
        have = self.capacity
        if positions <= have:
            return False
        if positions > self.max_context:
            raise ValueError(f"{positions} positions do not fit the context of {self.max_context}")
        if self.arrays is None:
            raise RuntimeError("device KV buffers are allocated at max_context and cannot grow")
        size = min(self.max_context, max(positions, 2 * have))
        for i, old in enumerate(self.arrays):
            grown = np.zeros((*old.shape[:2], size, old.shape[3]), old.dtype)
            grown[:, :, :have] = old
            self.arrays[i] = grown
            self.buffers[i] = ort.OrtValue.ortvalue_from_numpy(grown)
        return True

    @property
    def on_host(self) -> bool:
        return self.arrays is not None

    def view(self, start: int, stop: int) -> PromptCache:
        """Slots [start, stop) as their own cache; writes through to this one. ("view" here means a range of
        slots, as a numpy view; images handed to the encoders are "encoder inputs", see planning.py.)"""
        return PromptCache(self.buffers, self.arrays, self.max_context, self.lengths[start:stop], self.device,
                           self.start + start, self.heads)

    def bind(self, io: ort.IOBinding, past: Sequence[str], present: Sequence[str]) -> None:
        """Bind each buffer's rows of this view as both past input and present output (in place)."""
        full = self.buffers[0].shape()
        dtype = np.float16 if self.buffers[0].data_type() == "tensor(float16)" else np.float32
        slot_bytes = int(np.prod(full[1:])) * np.dtype(dtype).itemsize
        shape = [self.batch, *full[1:]]
        for name_in, name_out, buf in zip(past, present, self.buffers, strict=True):
            ptr = buf.data_ptr() + self.start * slot_bytes
            io.bind_input(name_in, self.device, 0, dtype, shape, ptr)
            io.bind_output(name_out, self.device, 0, dtype, shape, ptr)

    def attention_mask(self, new_tokens: int) -> np.ndarray:
        """Right-padded mask over valid past plus `new_tokens` per row."""
        total = self.lengths + new_tokens
        return (np.arange(int(total.max()))[None, :] < total[:, None]).astype(np.int64)

    def copy_rows(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (host buffers only)."""
        if self.arrays is None:
            raise RuntimeError("KV slots can only be copied in host memory")
        a, b = self.start + src, self.start + dst
        for arr in self.arrays:
            arr[b, :, :length] = arr[a, :, :length]
        self.lengths[dst] = length

    def trim(self, n: int | Sequence[int] | np.ndarray, rows: Sequence[int] | None = None) -> None:
        """Roll rows back by `n` positions (one count for all, or one per row): the next write lands there.

        Draft decoding uses it to drop rejected tokens after `verify`. Nothing is copied or cleared.
        """
        index = np.arange(self.batch) if rows is None else np.asarray(rows, np.int64)
        counts = np.broadcast_to(np.asarray(n, np.int64), index.shape)
        if (counts < 0).any() or (counts > self.lengths[index]).any():
            raise ValueError(f"cannot trim {counts.tolist()} positions from rows of length "
                             f"{self.lengths[index].tolist()}")
        self.lengths[index] -= counts

    def restore_head(self, ids: np.ndarray, row: int = 0) -> int:
        """Copy the remembered KV of the prompt head `ids` into `row`; the positions restored (0: none)."""
        saved = self.heads.get(ids.tobytes()) if self.on_host and ids.size else None
        if saved is None:
            return 0
        self.reserve(int(ids.size))
        for arr, kv in zip(self.arrays, saved, strict=True):
            arr[self.start + row, :, :ids.size] = kv
        self.lengths[row] = ids.size
        return int(ids.size)

    def remember_head(self, ids: np.ndarray, row: int = 0) -> None:
        """Keep the KV of `row`'s first ids.size positions (host only; one head is kept, the latest)."""
        if self.on_host and ids.size:
            self.heads.clear()
            self.heads[ids.tobytes()] = [arr[self.start + row, :, :ids.size].copy() for arr in self.arrays]


# ---------------------------------------------------------------- the text model (embedding + decoder)


@dataclass(frozen=True)
class DecoderInputs:
    """What one decoder call receives, as its observers see it just before it runs.

    `token_ids` are the tokens fed ([B, S]) and `image_embeds` the image rows placed at their image tokens
    (one zero row when the call has no image; None for a text-only bundle); a bundle with an embedding
    component feeds the decoder `inputs_embeds` (its output), None otherwise. `cache` is the bound view
    with its lengths before the call; `step` is 0 for prefill calls and n for the n-th decode step of a
    generation. Observers must not modify anything.
    """

    token_ids: np.ndarray
    image_embeds: ort.OrtValue | None
    inputs_embeds: ort.OrtValue | None
    attention_mask: np.ndarray
    position_ids: np.ndarray
    cache: PromptCache
    new_tokens: int
    keep: int
    step: int
    names: TensorNames


DecoderObserver = Callable[[DecoderInputs], None]


@dataclass
class TextModel:
    """The decoder session of one bundle (and the embedding session of a bundle exported before the decoder
    embedded its tokens); `observers` see every decoder call's inputs."""

    embed: ort.InferenceSession | None
    decoder: ort.InferenceSession
    names: TensorNames
    hidden_size: int
    device: str = "cpu"
    rope_axes: int = 3  # M-RoPE position ids are [3, B, S]; plain RoPE ones [B, S]
    observers: list[DecoderObserver] = field(default_factory=list)
    empty_image: ort.OrtValue | None = None
    # Decoder IO bindings with a KV view's 2 x layers buffers already bound, by (first slot, rows), for the
    # buffers in `bound_buffers`: binding 60 buffers costs ~1 ms a step, 5-10% of a 135M int4 step.
    bindings: dict[tuple[int, int], ort.IOBinding] = field(default_factory=dict)
    bound_buffers: list | None = None

    def no_image(self) -> ort.OrtValue:
        """One zero row for the image input of a call without an image: the graph gathers from it anyway."""
        if self.empty_image is None:
            zeros = np.zeros((1, self.hidden_size), np.float32)
            self.empty_image = ort.OrtValue.ortvalue_from_numpy(zeros, self.device, 0)
        return self.empty_image

    def embed_tokens(self, input_ids: np.ndarray, image_embeds: ort.OrtValue | None = None) -> ort.OrtValue:
        """The embedding component's output [B, S, H] on the device (bundles that have one)."""
        n = self.names
        if self.embed is None:
            raise ValueError("this bundle's decoder embeds its own token ids; it has no embedding component")
        io = self.embed.io_binding()
        io.bind_cpu_input(n.token_ids, np.ascontiguousarray(input_ids, np.int64))
        if n.image_embeds is not None:  # a text-only bundle's embedding takes token ids alone
            io.bind_ortvalue_input(n.image_embeds, image_embeds if image_embeds is not None else self.no_image())
        io.bind_output(n.token_embeds, self.device)
        self.embed.run_with_iobinding(io)
        return io.get_outputs()[0]

    def forward(self, token_ids: np.ndarray, position_ids: np.ndarray, cache: PromptCache, new_tokens: int,
                keep: int = 1, step: int = 0, image_embeds: ort.OrtValue | None = None) -> np.ndarray:
        """One decoder call over `new_tokens` token ids per row ([B, new_tokens]), with `image_embeds` placed
        at the image tokens; logits of each row's last `keep` tokens [B, keep, V]."""
        n = self.names
        if keep != 1 and n.logits_to_keep is None:
            raise ValueError("this bundle's decoder returns the last token's logits only (it was exported before "
                             "k-token verification); re-export it with `focalrt export` to verify or score "
                             "several tokens in one call")
        token_ids = np.ascontiguousarray(token_ids, np.int64)
        cache.reserve(int(cache.lengths.max()) + new_tokens)
        mask = cache.attention_mask(new_tokens)
        position_ids = np.ascontiguousarray(position_ids, np.int64)
        embeds = self.embed_tokens(token_ids, image_embeds) if n.inputs_embeds is not None else None
        if embeds is None and n.image_embeds is not None and image_embeds is None:
            image_embeds = self.no_image()
        if self.observers:
            seen = DecoderInputs(token_ids, image_embeds, embeds, mask, position_ids, cache, new_tokens, keep, step, n)
            for observe in self.observers:
                observe(seen)
        io = self.decoder_binding(cache)
        if embeds is not None:
            io.bind_ortvalue_input(n.inputs_embeds, embeds)
        else:
            io.bind_cpu_input(n.token_ids, token_ids)
            if n.image_embeds is not None:
                io.bind_ortvalue_input(n.image_embeds, image_embeds)
        io.bind_cpu_input(n.attention_mask, mask)
        io.bind_cpu_input(n.position_ids, position_ids)
        if n.logits_to_keep is not None:
            io.bind_cpu_input(n.logits_to_keep, np.array([keep], np.int64))
        io.bind_output(n.logits, "cpu")  # unallocated again: the logits' shape changes with the call
        self.decoder.run_with_iobinding(io)
        cache.lengths += new_tokens
        return io.get_outputs()[0].numpy()

    def decoder_binding(self, cache: PromptCache) -> ort.IOBinding:
        """The decoder binding for this KV view, its buffers bound once (in place: past in, present out)."""
        if self.bound_buffers is None or cache.buffers[0] is not self.bound_buffers[0]:
            # another cache (resized, grown, or another pipeline's): start over
            self.bindings.clear()
            self.bound_buffers = list(cache.buffers)
        key = (cache.start, cache.batch)
        io = self.bindings.get(key)
        if io is None:
            if len(self.bindings) >= 16:  # views come and go with batch shapes; keep the recent ones
                self.bindings.pop(next(iter(self.bindings)))
            io = self.decoder.io_binding()
            io.bind_output(self.names.logits, "cpu")  # first: get_outputs() follows binding order
            cache.bind(io, self.names.past, self.names.present)
            self.bindings[key] = io
        return io


# ---------------------------------------------------------------- prefill, one step, k-token verification


def batch_positions(positions: np.ndarray, batch: int) -> np.ndarray:
    """[axes, S] positions of one prompt -> the decoder's [3, B, S] (M-RoPE) or [B, S] (plain RoPE)."""
    if positions.ndim == 1 or positions.shape[0] == 1:
        return np.broadcast_to(positions.reshape(1, -1), (batch, positions.size))
    return np.broadcast_to(positions[:, None, :], (positions.shape[0], batch, positions.shape[1]))


def prefill(model: TextModel, cache: PromptCache, input_ids: np.ndarray, position_ids: np.ndarray,
            image_embeds: ort.OrtValue | None = None) -> np.ndarray:
    """Run the prompt [B, S] (rows of equal length) through the decoder; logits of its last token [B, V]."""
    if int(cache.lengths.max()) + input_ids.shape[1] > cache.max_context:
        raise ValueError(f"prompt of {input_ids.shape[1]} tokens does not fit the remaining context "
                         f"({cache.max_context - int(cache.lengths.max())} tokens)")
    return model.forward(input_ids, position_ids, cache, input_ids.shape[1], image_embeds=image_embeds)[:, -1, :]


def step_positions(model: TextModel, cache: PromptCache, delta: np.ndarray, k: int = 1) -> np.ndarray:
    """Positions of each row's next k tokens: [B, k], or [3, B, k] for M-RoPE (all axes equal for text)."""
    index = (cache.lengths + delta)[:, None] + np.arange(k)[None, :]
    return index if model.rope_axes == 1 else np.broadcast_to(index[None], (3, *index.shape))


def decode_one_token(model: TextModel, cache: PromptCache, token_ids: np.ndarray, delta: np.ndarray,
                     step: int = 1) -> np.ndarray:
    """Feed one token per row at that row's next position; logits for the token after it, [B, V]."""
    ids = np.asarray(token_ids).reshape(-1, 1)
    return model.forward(ids, step_positions(model, cache, delta), cache, 1, step=step)[:, 0, :]


def verify(model: TextModel, cache: PromptCache, token_ids: np.ndarray, delta: np.ndarray,
           step: int = 0) -> np.ndarray:
    """Feed k tokens per row ([B, k]) at each row's next positions; logits after each of them, [B, k, V].

    `logits[:, i]` equals what `decode_one_token` would return after feeding tokens 0..i one at a time.
    The cache then holds all k; `cache.trim` drops the rejected ones. ONNX Runtime's GroupQueryAttention
    takes several new tokens over a past only for one row at a time, so a batch makes one call per row.
    """
    token_ids = np.asarray(token_ids, np.int64)
    k = token_ids.shape[1]
    if int(cache.lengths.max()) + k > cache.max_context:
        raise ValueError(f"{k} tokens do not fit the remaining context "
                         f"({cache.max_context - int(cache.lengths.max())} tokens)")
    out = []
    for row in range(cache.batch):
        view = cache.view(row, row + 1)
        positions = step_positions(model, view, delta[row:row + 1], k)
        out.append(model.forward(token_ids[row:row + 1], positions, view, k, keep=k, step=step)[0])
    return np.stack(out)


# ---------------------------------------------------------------- sampling


@dataclass
class Sampler:
    """Greedy when temperature is 0; otherwise temperature / top-k / top-p with a seeded generator.

    Any callable from [B, V] logits to [B] token ids can stand in for it (`generate(sampler=...)`).
    """

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
        return np.array([self.sample_row(row) for row in logits], np.int64)

    def sample_row(self, logits: np.ndarray) -> int:
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


SamplerFn = Callable[[np.ndarray], np.ndarray]  # [B, V] logits -> [B] ids
LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (tokens so far [n], logits [V]) -> logits
TokenCallback = Callable[[int, int], None]  # (row, token id), for every emitted token (stop tokens excluded)


class DraftHook(Protocol):
    """Proposes tokens for `decode` to verify (drafts.Drafter is one); hears how many were accepted."""

    def propose(self, generated: np.ndarray, limit: int) -> np.ndarray:
        """Up to `limit` token ids to follow `generated` (the row's emitted ids so far)."""
        ...

    def feedback(self, proposed: int, accepted: int) -> None:
        """Of the `proposed` draft tokens the verifier judged, `accepted` were the model's own."""
        ...


# ---------------------------------------------------------------- the loop


@dataclass
class Row:
    """One sequence to generate: its prompt, the image its prompt holds, and how positions continue."""

    token_ids: np.ndarray  # [S] int64
    positions: np.ndarray  # [axes, S]
    delta: int  # a generated token at absolute index i sits at position i + delta
    prefix_len: int = 0  # tokens up to and including the image, shared by rows of the same image
    image_embeds: ort.OrtValue | None = None
    image_key: Hashable | None = None  # rows with equal keys (and equal prefixes) share the prefix's KV
    image_token_id: int | None = None  # the prompt head (tokens before the image) is remembered across calls


@dataclass
class Generation:
    """What `generate` produced, per row, and where the time went."""

    tokens: list[list[int]]  # generated ids, stop token excluded
    finish: list[str]  # "stop" or "length" (new-token limit or context end)
    logits: list[list[np.ndarray]] | None  # raw model logits of every sampled step (stop step included)
    prefill_ms: list[float]
    decode_ms: float
    step_ms: list[float]  # one entry per decoder step after prefill (a step may feed several tokens per row)
    drafted: list[int] = field(default_factory=list)  # per row: draft tokens the verifier judged
    accepted: list[int] = field(default_factory=list)  # per row: of which the model agreed with


@dataclass
class Decoding:
    """One row while it decodes: what it generated, how it ended, and what its next decoder call feeds.

    The loop keeps the rows still running in a list whose order is their slot order in the cache, so a
    row's slot is its place in that list; everything else about the row lives here.
    """

    row: int  # its index in `generate`'s rows, and in the Generation's lists
    delta: int  # a generated token at absolute index i sits at position i + delta
    processors: Sequence[LogitsProcessor] = ()
    drafter: DraftHook | None = None
    kept: list[np.ndarray] | None = None  # raw logits of every sampled step, when asked for
    tokens: list[int] = field(default_factory=list)
    finish: str = "length"
    done: bool = False
    drafted: int = 0  # draft tokens the verifier judged
    accepted: int = 0  # of which the model agreed with
    logits: np.ndarray | None = None  # [positions fed, V]: the logits its last call returned
    next_id: int = 0  # the token its next call feeds
    draft: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # fed after next_id


def prefill_rows(model: TextModel, cache: PromptCache, rows: Sequence[Row],
                 share_prefix: bool) -> tuple[np.ndarray, list[float]]:
    """Prefill every row into its slot: logits of each prompt's last token [B, V], and ms per row.

    With `share_prefix` (host buffers), the prefix (system + image) is prefilled once per image and
    copied into the slots of the other rows of that image, each of which then prefills only its own
    suffix; the prompt head before the image is restored from the cache when it was seen before.
    Otherwise each row's whole prompt goes through the decoder in one call.
    """
    placed: dict[Hashable, int] = {}  # image -> slot holding its prefix
    first: list[np.ndarray] = []
    ms: list[float] = []
    for i, row in enumerate(rows):
        t = time.perf_counter()
        slot, ids, n = cache.view(i, i + 1), row.token_ids, row.prefix_len
        if not (share_prefix and cache.on_host and 0 < n < ids.size):
            first.append(prefill(model, slot, ids[None], batch_positions(row.positions, 1), row.image_embeds)[0])
            ms.append((time.perf_counter() - t) * 1e3)
            continue
        src = placed.get(row.image_key)
        if src is not None and np.array_equal(rows[src].token_ids[:n], ids[:n]):
            cache.copy_rows(src, i, n)
        else:
            image_at = int(np.argmax(ids == row.image_token_id)) if row.image_token_id is not None else 0
            head = ids[:image_at]
            done = slot.restore_head(head)
            prefill(model, slot, ids[None, done:n], batch_positions(row.positions[..., done:n], 1), row.image_embeds)
            if not done:
                slot.remember_head(head)
            placed.setdefault(row.image_key, i)
        first.append(prefill(model, slot, ids[None, n:], batch_positions(row.positions[..., n:], 1))[0])
        ms.append((time.perf_counter() - t) * 1e3)
    return np.stack(first), ms


def choose(rows: list[Decoding], cache: PromptCache, max_new_tokens: int, stop_ids: set[int],
           sampler: SamplerFn, on_token: TokenCallback | None) -> None:
    """Step 1: every live row picks its tokens from the logits it was fed, position by position.

    The rows still choosing are sampled together. At each position: keep the raw logits (if asked), let the
    row's processors rewrite them, sample, emit (`on_token`). A sampled token equal to the drafted one is
    accepted and the row reads the next position; otherwise (or after its last drafted token) it is the row's
    next token to feed, and its cache is trimmed past the rejected drafts. So processors and sampler see
    exactly the calls plain decoding makes (accepted tokens only, in order), and the output is the same:
    with a greedy sampler token for token, with a random one in distribution (accepting a drafted token
    exactly when a sample equals it is the speculative rule min(1, p/q) for a one-token draft). A row stops
    on a stop token (not emitted), at `max_new_tokens`, or when its own context is full.
    """
    choosing = [(slot, r) for slot, r in enumerate(rows) if not r.done]
    judged = {slot: 0 for slot, _ in choosing}
    agreed = dict(judged)
    pos = 0
    while choosing:
        for _, r in choosing:
            if r.kept is not None:
                r.kept.append(r.logits[pos].copy())
            for process in r.processors:
                r.logits[pos] = process(np.asarray(r.tokens, np.int64), r.logits[pos])
        sampled = sampler(np.stack([r.logits[pos] for _, r in choosing]))
        still = []
        for (slot, r), token in zip(choosing, (int(t) for t in sampled), strict=True):
            m = r.draft.size
            agree = pos < m and token == int(r.draft[pos])
            agreed[slot], judged[slot] = agreed[slot] + int(agree), min(m, pos + 1)
            if token in stop_ids:
                r.finish, r.done = "stop", True
                continue
            r.tokens.append(token)
            if on_token is not None:
                on_token(r.row, token)
            written_at = int(cache.lengths[slot]) - (m - pos)  # after the row's accepted tokens
            if len(r.tokens) >= max_new_tokens or written_at >= cache.max_context:
                r.done = True
            elif agree:
                still.append((slot, r))
            else:
                r.next_id = token
                cache.trim(m - pos, rows=[slot])
        choosing, pos = still, pos + 1
    for slot, r in enumerate(rows):
        if judged.get(slot):
            r.drafted += judged[slot]
            r.accepted += agreed[slot]
            r.drafter.feedback(judged[slot], agreed[slot])


def propose(rows: list[Decoding], cache: PromptCache, max_new_tokens: int) -> None:
    """Step 2: what each live row's draft hook proposes, within its token and context limits."""
    for slot, r in enumerate(rows):
        r.draft = np.zeros(0, np.int64)
        if r.drafter is not None and not r.done:
            limit = min(max_new_tokens - len(r.tokens), cache.max_context - int(cache.lengths[slot]) - 1)
            if limit > 0:
                r.draft = np.asarray(r.drafter.propose(np.asarray(r.tokens, np.int64), limit), np.int64)[:limit]


def feed(model: TextModel, cache: PromptCache, rows: list[Decoding], step: int) -> None:
    """Step 3, the one place that decides how a step is fed: one batched call of one token per row when no
    row drafted, every row is live (device buffers cannot compact) and the longest row has room (all rows
    are bound at its length); else one call per live row over [next token + its draft] (ONNX Runtime's
    GroupQueryAttention takes several new tokens over a past only one row at a time, so rows of different
    draft lengths need no padding). Either way each row gets the logits of every position it was fed."""
    live = [not r.done for r in rows]
    if (all(live) and not any(r.draft.size for r in rows)
            and int(cache.lengths[:len(rows)].max()) < cache.max_context):
        ids = np.array([r.next_id for r in rows], np.int64)
        delta = np.array([r.delta for r in rows], np.int64)
        logits = decode_one_token(model, cache, ids, delta, step=step)
        for slot, r in enumerate(rows):
            r.logits = logits[slot:slot + 1]
        return
    for slot, r in enumerate(rows):
        if r.done:
            continue
        tokens = np.concatenate([np.array([r.next_id], np.int64), r.draft])[None]
        r.logits = verify(model, cache.view(slot, slot + 1), tokens, np.array([r.delta], np.int64), step=step)[0]


def compact(cache: PromptCache, rows: list[Decoding]) -> list[Decoding]:
    """On host buffers, the rows still running moved into the front slots (so a step binds only live
    sequences); device buffers keep every row in place and finished rows are skipped."""
    live = [slot for slot, r in enumerate(rows) if not r.done]
    if not cache.on_host or len(live) == len(rows):
        return rows
    for new_slot, old_slot in enumerate(live):
        if new_slot != old_slot:
            cache.copy_rows(old_slot, new_slot, int(cache.lengths[old_slot]))
    return [rows[slot] for slot in live]


def decode(model: TextModel, cache: PromptCache, rows: list[Decoding], max_new_tokens: int, stop_ids: set[int],
           sampler: SamplerFn, on_token: TokenCallback | None = None) -> list[float]:
    """Decode `rows` (row i in slot i of `cache`, each holding its prefill logits) until each stops or hits a
    limit; drafts only change speed. Each step: choose, draft, feed. Returns each step's milliseconds."""
    step_ms: list[float] = []
    for step in range(1, max_new_tokens + 1):  # every step emits at least one token per live row
        t0 = time.perf_counter()
        choose(rows, cache.view(0, len(rows)), max_new_tokens, stop_ids, sampler, on_token)
        rows = compact(cache, rows)
        if all(r.done for r in rows):
            break
        view = cache.view(0, len(rows))
        propose(rows, view, max_new_tokens)
        feed(model, view, rows, step)
        step_ms.append((time.perf_counter() - t0) * 1e3)
    return step_ms


def generate(model: TextModel, cache: PromptCache, rows: Sequence[Row], max_new_tokens: int, stop_ids: set[int],
             sampler: SamplerFn, logits_processors: Sequence[Sequence[LogitsProcessor]] | None = None,
             on_token: TokenCallback | None = None, keep_logits: bool = False,
             share_prefix: bool = True, draft: Sequence[DraftHook | None] | None = None) -> Generation:
    """Prefill `rows` into the first len(rows) slots of `cache`, then decode them together, drafting per row
    through `draft` (see `choose` and `feed`). Each row gets the tokens it gets alone."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if cache.batch < len(rows):
        raise ValueError(f"{len(rows)} rows do not fit a cache of {cache.batch} slots")
    if logits_processors is not None and len(logits_processors) != len(rows):
        raise ValueError(f"logits_processors has {len(logits_processors)} entries for {len(rows)} rows; "
                         f"give one list of processors per row")
    if draft is not None and len(draft) != len(rows):
        raise ValueError(f"draft has {len(draft)} entries for {len(rows)} rows; give one hook (or None) per row")
    view = cache.view(0, len(rows))
    view.lengths[:] = 0
    first, prefill_ms = prefill_rows(model, view, rows, share_prefix)
    states = [Decoding(i, int(row.delta), logits_processors[i] if logits_processors else (),
                       draft[i] if draft else None, [] if keep_logits else None, logits=first[i:i + 1])
              for i, row in enumerate(rows)]
    t0 = time.perf_counter()
    step_ms = decode(model, view, states, max_new_tokens, stop_ids, sampler, on_token)
    return Generation([r.tokens for r in states], [r.finish for r in states],
                      [r.kept for r in states] if keep_logits else None, prefill_ms,
                      (time.perf_counter() - t0) * 1e3, step_ms, [r.drafted for r in states],
                      [r.accepted for r in states])


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
