"""`Pipeline`: a bundle loaded once, then `describe(image, box, prompt)` per request."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from focalrt.bundle import Bundle, BundleError, load
from focalrt.runtime import prompt as prompts
from focalrt.runtime.families import adapter_for
from focalrt.runtime.generate import (
    KVCache,
    Sampler,
    Sessions,
    TextStream,
    batch_positions,
    decode_batch,
    decode_n_tokens,
    prefill,
)
from focalrt.runtime.preprocess import check_frame, read_image
from focalrt.runtime.sessions import TENSORRT, create_session, resolve_providers
from focalrt.runtime.tensorrt_ep import trt_ep_provider_options


@dataclass
class Description:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    box: tuple[int, int, int, int] | None  # in the input image's pixels, after clipping
    model_box: tuple[int, int, int, int] | None  # in the encoder image's pixels (what the prompt says)
    timings_ms: dict[str, Any] = field(default_factory=dict)
    logits: list[np.ndarray] | None = None  # per generated token, when asked for

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_token_ids": self.prompt_token_ids,
                "finish_reason": self.finish_reason, "box": self.box, "model_box": self.model_box,
                "timings_ms": self.timings_ms}


class Pipeline:
    """Holds the sessions, tokenizer and one preallocated KV cache; not thread-safe."""

    def __init__(self, bundle: Bundle, provider: str | None = None, max_context: int | None = None,
                 threads: int | None = None, max_batch: int = 8):
        self.bundle = bundle
        m = bundle.manifest
        self.adapter = adapter_for(m)
        self.providers = resolve_providers(provider)
        self.device = "cuda" if self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        self.max_batch = max(1, int(max_batch))
        self.max_context = min(max_context or m["text"]["max_context"], m["text"]["max_context"])
        self.vision = self._session("vision", threads)
        self.sessions = Sessions(embed=self._session("embed", threads), decoder=self._session("decoder", threads),
                                 device=self.device, rope_axes=self.adapter.rope_axes)
        tok_path = bundle.path / m["tokenizer"]["file"]
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:
            raise BundleError(f"tokenizer {tok_path} could not be loaded ({e}); re-export the bundle") from None
        self.profile = m["prompt"]
        self.text_cfg = m["text"]
        self.generation = m["generation"]
        self.stop_ids = {self._token_id(t) for t in self.profile["stop_tokens"]}
        self.image_token_id = int(self.text_cfg["image_token_id"])
        self.cache = KVCache.allocate(self.text_cfg["num_layers"], 1, self.text_cfg["num_kv_heads"],
                                      self.text_cfg["head_dim"], self.max_context, self.device)
        self._head_kv: tuple[bytes, list[np.ndarray]] | None = None

    def _session(self, component: str, threads: int | None) -> ort.InferenceSession:
        """One component's session; under TensorRT with shape profiles that fit max_batch rows of max_context.

        Under TensorRT an int8 component loads its `tensorrt_file` (int8 activations with zero point 0, which
        TensorRT requires) when the bundle has one; every other provider keeps the uint8 graph that ORT's CPU
        kernels fuse into integer matmuls.
        """
        path = self.bundle.component_path(component)
        trt = None
        if TENSORRT in self.providers:
            trt = trt_ep_provider_options(self.bundle, component, self.max_batch, self.max_context)
            signed = self.bundle.component(component).get("tensorrt_file")
            if signed:
                path = self.bundle.file(signed["file"])
        return create_session(path, self.providers, threads, trt)

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, provider: str | None = None, max_context: int | None = None,
                    threads: int | None = None, max_batch: int = 8) -> Pipeline:
        return cls(load(path), provider=provider, max_context=max_context, threads=threads, max_batch=max_batch)

    def _token_id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise BundleError(f"{self.bundle.path}: stop token {token!r} is not in the tokenizer")
        return tid

    @property
    def image_size(self) -> int:
        return self.adapter.image_size

    def encode_image(self, image_bgr: np.ndarray, landmarks68: np.ndarray | None = None) -> ort.OrtValue:
        """Vision encoder output, kept on the device for the embedding step."""
        io = self.vision.io_binding()
        for name, value in self.adapter.vision_inputs(image_bgr, landmarks68).items():
            io.bind_cpu_input(name, value)
        io.bind_output("image_embeds", self.device)
        self.vision.run_with_iobinding(io)
        return io.get_outputs()[0]

    def build_prompt(self, image_wh: tuple[int, int], box: tuple[int, int, int, int] | None,
                     instruction: str | None) -> tuple[prompts.Prompt, tuple | None, tuple | None]:
        """Token ids for one region of an image of size `image_wh` that the encoder sees whole."""
        model_box = None
        if box is not None:
            box = prompts.clip_box(tuple(box), *image_wh)
            model_box = prompts.box_to_model(box, image_wh, self.image_size)
        prompt = prompts.encode(self.tokenizer, self.profile, self.adapter.image_tokens, instruction, model_box)
        return prompt, box, model_box

    def _sampler(self, temperature: float | None, top_k: int | None, top_p: float | None,
                 seed: int | None) -> Sampler:
        gen = self.generation
        return Sampler(gen.get("temperature", 0.0) if temperature is None else temperature,
                       gen.get("top_k", 0) if top_k is None else top_k,
                       gen.get("top_p", 1.0) if top_p is None else top_p, seed)

    def _region_views(self, image: np.ndarray, boxes: list[tuple | None]) -> list[tuple[np.ndarray, Any, Any]]:
        """(image the encoder sees, box in its pixels, box in `image` pixels) per region, by region mode.

        `text` shares one view of the whole image (the box goes into the prompt); `draw` outlines each box
        on its own copy; `crop` cuts each box out with some context around it.
        """
        h, w = image.shape[:2]
        mode = self.profile.get("region_mode", "text")
        views: list[tuple[np.ndarray, tuple | None, tuple | None]] = []
        for box in boxes:
            if box is None:
                views.append((image, None, None))
                continue
            box = prompts.clip_box(tuple(box), w, h)
            if mode == "text":
                views.append((image, box, box))
            elif mode == "draw":
                views.append((prompts.draw_box(image, box), box, box))
            else:
                crop, crop_box = prompts.crop_with_context(image, box)
                views.append((crop, crop_box, box))
        return views

    def describe(self, image: np.ndarray | str | os.PathLike, box: tuple[int, int, int, int] | None = None,
                 prompt: str | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 on_text: Callable[[str], None] | None = None, return_logits: bool = False,
                 landmarks68: np.ndarray | None = None) -> Description:
        """Describe `box` (pixels of `image`, BGR array or file) or the whole image when no box.

        This is the plain path: the whole prompt is prefilled in one go and decoded alone, with streaming.
        """
        return self._describe([(image, box, landmarks68)], prompt, max_new_tokens, temperature, top_k, top_p, seed,
                              on_text, return_logits, batched=False)[0]

    def describe_regions(self, image: np.ndarray | str | os.PathLike, boxes: list[tuple[int, int, int, int] | None],
                         prompt: str | None = None, max_new_tokens: int | None = None,
                         temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                         seed: int | None = None, landmarks68: np.ndarray | None = None) -> list[Description]:
        """Describe several regions of one image at the cost of little more than one.

        The encoder runs once per distinct view of the image; the prompt prefix (system, image) is
        prefilled once per view and copied to each region's KV slot; each region prefills only its own
        suffix; then one decode step serves every region still generating.
        """
        return self.describe_views([(image, boxes, landmarks68)], prompt, max_new_tokens, temperature, top_k, top_p,
                                   seed)[0]

    def describe_views(self, views: list[tuple[Any, list[tuple[int, int, int, int] | None], np.ndarray | None]],
                       prompt: str | None = None, max_new_tokens: int | None = None,
                       temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                       seed: int | None = None) -> list[list[Description]]:
        """Several images (e.g. one crop per face), each with its regions and landmarks, in one batch.

        Decode is batched across every region of every image, so three faces with three regions each
        share each decode step. Returns one list of descriptions per image, in order.
        """
        requests = [(image, box, lm) for image, boxes, lm in views for box in boxes]
        flat = self._describe(requests, prompt, max_new_tokens, temperature, top_k, top_p, seed, None, False,
                              batched=True)
        out, i = [], 0
        for _, boxes, _ in views:
            out.append(flat[i:i + len(boxes)])
            i += len(boxes)
        return out

    def _describe(self, requests: list[tuple[Any, Any, np.ndarray | None]], prompt, max_new_tokens, temperature,
                  top_k, top_p, seed, on_text, return_logits, batched: bool) -> list[Description]:
        t_start = time.perf_counter()
        max_new_tokens = int(self.generation["max_new_tokens"] if max_new_tokens is None else max_new_tokens)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        sampler = self._sampler(temperature, top_k, top_p, seed)
        images: dict[int, np.ndarray] = {}
        planned = []
        for image, box, landmarks68 in requests:
            if id(image) not in images:  # read or check each distinct input image once
                images[id(image)] = read_image(image) if isinstance(image, (str, os.PathLike)) else check_frame(image)
            view, view_box, image_box = self._region_views(images[id(image)], [box])[0]
            vh, vw = view.shape[:2]
            p, _, model_box = self.build_prompt((vw, vh), view_box, prompt)
            if p.token_ids.size + 1 > self.max_context:
                raise ValueError(f"the prompt has {p.token_ids.size} tokens but the context holds "
                                 f"{self.max_context}; shorten --prompt or export with a larger --max-context")
            planned.append((view, p, image_box, model_box, landmarks68))
        t_prep = time.perf_counter()

        encoded: dict[int, tuple[ort.OrtValue, float]] = {}
        for view, _, _, _, landmarks68 in planned:
            if id(view) not in encoded:
                t0 = time.perf_counter()
                encoded[id(view)] = (self.encode_image(view, landmarks68), (time.perf_counter() - t0) * 1e3)
        planned = [entry[:4] for entry in planned]
        prep_ms = (t_prep - t_start) * 1e3
        if batched:
            results = []
            for i in range(0, len(planned), self.max_batch):
                results += self._generate_batch(planned[i:i + self.max_batch], encoded, max_new_tokens, sampler,
                                                prep_ms if i == 0 else 0.0)
            return results
        results: list[Description] = []
        for view, p, image_box, model_box in planned:
            t0 = time.perf_counter()
            image_embeds, vision_ms = encoded[id(view)]
            tokens, finish, logits, steps = self._generate(p, image_embeds, max_new_tokens, sampler, on_text,
                                                           return_logits)
            t_end = time.perf_counter()
            first = not results  # the first region carries the shared preparation and encoding
            timings = {"preprocess_and_vision": round(vision_ms if first else 0.0, 3), "prefill": steps["prefill"],
                       "decode": steps["decode"], "decode_steps": steps["decode_steps"],
                       "ttft": round(prep_ms * first + vision_ms * first + steps["prefill"], 3),
                       "total": round((prep_ms + vision_ms) * first + (t_end - t0) * 1e3, 3)}
            results.append(Description(text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                                       token_ids=tokens, prompt_token_ids=p.token_ids.tolist(),
                                       finish_reason=finish, box=image_box, model_box=model_box, timings_ms=timings,
                                       logits=logits if return_logits else None))
        return results

    def _slots(self, n: int) -> KVCache:
        """The first n KV slots; the cache grows (once, to the largest batch seen) when n exceeds it."""
        if self.cache.batch < n:
            t = self.text_cfg
            self.cache = KVCache.allocate(t["num_layers"], n, t["num_kv_heads"], t["head_dim"], self.max_context,
                                          self.device)
        return self.cache.view(0, n)

    def _prefill_prefix(self, slot: KVCache, ids: np.ndarray, positions: np.ndarray,
                        image_embeds: ort.OrtValue) -> None:
        """Prefill system + image into one slot. The part before the image is the same on every frame,
        so on host buffers its KV is computed once per pipeline and copied in afterwards."""
        head = int(np.argmax(ids == self.image_token_id))
        cached = self._head_kv
        if slot.on_host and cached is not None and cached[0] == ids[:head].tobytes():
            for arr, saved in zip(slot.arrays, cached[1], strict=True):
                arr[slot.start, :, :head] = saved
            slot.lengths[0] = head
            prefill(self.sessions, slot, ids[None, head:], batch_positions(positions[..., head:], 1), image_embeds)
            return
        prefill(self.sessions, slot, ids[None], batch_positions(positions, 1), image_embeds)
        if slot.on_host and head > 0:
            self._head_kv = (ids[:head].tobytes(), [arr[slot.start, :, :head].copy() for arr in slot.arrays])

    def _generate_batch(self, planned: list, encoded: dict, max_new_tokens: int, sampler: Sampler,
                        prep_ms: float) -> list[Description]:
        t0 = time.perf_counter()
        n = len(planned)
        cache = self._slots(n)
        cache.lengths[:] = 0
        placed: dict[int, int] = {}  # view -> slot that holds its prefix
        prefill_ms = [0.0] * n
        positions = [self.adapter.positions(p.token_ids) for _, p, _, _ in planned]
        for row, (view, p, _, _) in enumerate(planned):
            t = time.perf_counter()
            ids, pos = p.token_ids[:p.prefix_len], positions[row][0][..., :p.prefix_len]
            src = placed.get(id(view))
            if src is not None and cache.on_host and np.array_equal(planned[src][1].token_ids[:p.prefix_len], ids):
                cache.copy_rows(src, row, p.prefix_len)
            else:
                self._prefill_prefix(cache.view(row, row + 1), ids, pos, encoded[id(view)][0])
                placed.setdefault(id(view), row)
            prefill_ms[row] += (time.perf_counter() - t) * 1e3
        first_logits = []
        for row, (_, p, _, _) in enumerate(planned):
            t = time.perf_counter()
            pos = positions[row][0][..., p.prefix_len:]
            first_logits.append(prefill(self.sessions, cache.view(row, row + 1), p.token_ids[None, p.prefix_len:],
                                        batch_positions(pos, 1))[0])
            prefill_ms[row] += (time.perf_counter() - t) * 1e3
        t_decode = time.perf_counter()
        deltas = np.array([d for _, d in positions], np.int64)
        tokens, finish, step_ms = decode_batch(self.sessions, cache, np.stack(first_logits), deltas, max_new_tokens,
                                               self.stop_ids, sampler)
        decode_ms = (time.perf_counter() - t_decode) * 1e3
        results = []
        seen_views: set[int] = set()
        for row, (view, p, image_box, model_box) in enumerate(planned):
            vision_ms = 0.0 if id(view) in seen_views else encoded[id(view)][1]
            seen_views.add(id(view))
            shared = prep_ms if row == 0 else 0.0
            timings = {"preprocess_and_vision": round(vision_ms, 3), "prefill": round(prefill_ms[row], 3),
                       "decode": round(decode_ms, 3), "decode_steps": [round(x, 3) for x in step_ms],
                       "ttft": round(shared + vision_ms + (t_decode - t0) * 1e3, 3),
                       "total": round(shared + vision_ms + (time.perf_counter() - t0) * 1e3, 3), "batch": n}
            results.append(Description(text=self.tokenizer.decode(tokens[row], skip_special_tokens=True),
                                       token_ids=tokens[row], prompt_token_ids=p.token_ids.tolist(),
                                       finish_reason=finish[row], box=image_box, model_box=model_box,
                                       timings_ms=timings))
        return results

    def _generate(self, p: prompts.Prompt, image_embeds: ort.OrtValue, max_new_tokens: int, sampler: Sampler,
                  on_text: Callable[[str], None] | None, return_logits: bool):
        """Prefill one prompt into the cache, then decode; the plain one-region path."""
        t1 = time.perf_counter()
        positions, delta = self.adapter.positions(p.token_ids)
        cache = self._slots(1)
        cache.lengths[:] = 0
        logits = prefill(self.sessions, cache, p.token_ids[None], batch_positions(positions, 1), image_embeds)
        t2 = time.perf_counter()
        stream = TextStream(self.tokenizer)
        tokens: list[int] = []
        kept_logits: list[np.ndarray] = []
        step_ms: list[float] = []
        finish = "length"
        t_step = time.perf_counter()
        for tok, step_logits in decode_n_tokens(self.sessions, cache, logits, np.array([delta]),
                                                max_new_tokens, self.stop_ids, sampler):
            token = int(tok[0])
            if return_logits:
                kept_logits.append(step_logits[0].copy())
            now = time.perf_counter()
            if tokens:
                step_ms.append((now - t_step) * 1e3)
            t_step = now
            if token in self.stop_ids:
                finish = "stop"
                break
            tokens.append(token)
            delta_text = stream.push(token)
            if on_text and delta_text:
                on_text(delta_text)
        t3 = time.perf_counter()
        steps = {"prefill": round((t2 - t1) * 1e3, 3), "decode": round((t3 - t2) * 1e3, 3),
                 "decode_steps": [round(s, 3) for s in step_ms]}
        return tokens, finish, kept_logits, steps
