"""`Pipeline`: a bundle loaded once, then `describe(image, box, prompt)` per request."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from focalrt.bundle import Bundle, BundleError, load
from focalrt.runtime.backends.sessions import TENSORRT, create_session, device_for, resolve_providers
from focalrt.runtime.backends.tensorrt_ep import trt_ep_provider_options
from focalrt.runtime.faces import crops
from focalrt.runtime.frames import check_frame, read_image
from focalrt.runtime.generation import prompt as prompts
from focalrt.runtime.generation.drafts import Drafts
from focalrt.runtime.generation.generate import (
    LogitsProcessor,
    PromptCache,
    Row,
    Sampler,
    SamplerFn,
    TensorNames,
    TextModel,
    TextStream,
    TokenCallback,
    generate,
)
from focalrt.runtime.models.adapters import adapter_for


@dataclass(frozen=True)
class GenerationOptions:
    """How to sample; None takes the bundle's `generation` default (temperature 0 is greedy)."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    # A JSON schema (dict, file path, or "face_state" for the shipped default; "profile" for the bundle
    # profile's own, else the default) that every answer is constrained to while it decodes (llguidance).
    schema: Any = None


class ImageRegions(NamedTuple):
    """One image for `describe_views` (e.g. a face crop), the boxes to describe in it, and its landmarks."""

    image: Any  # BGR array or image file
    boxes: list[tuple[int, int, int, int] | None]
    landmarks68: np.ndarray | None = None


class VideoClip(NamedTuple):
    """One video window for `describe_video`/`describe_clips`: the frames in time order (BGR, one size, as many
    as the bundle's video encoder takes) and optionally each frame's 68 landmarks in its pixels."""

    frames: list[np.ndarray]
    landmarks68: list[np.ndarray] | None = None


@dataclass
class PlannedRegion:
    """One region ready to generate: the image the encoder sees, its prompt, and the box in both pixels."""

    view: np.ndarray | VideoClip | None  # the encoder's input (frame, crop, copy with the box drawn, or a
    # video window); None: text
    prompt: prompts.Prompt
    image_box: tuple[int, int, int, int] | None  # in the input image's pixels, after clipping
    model_box: tuple[int, int, int, int] | None  # in the encoder image's pixels (what the prompt says)
    landmarks68: np.ndarray | None = None


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
    constrained: bool = False  # decoded under a JSON schema: `state` holds the parsed answer
    state: Any = None  # the parsed JSON object (None when the answer was cut off before it closed)
    state_error: str | None = None  # why `state` is None under a schema

    def to_json(self) -> dict[str, Any]:
        out = {"text": self.text, "token_ids": self.token_ids, "prompt_token_ids": self.prompt_token_ids,
               "finish_reason": self.finish_reason, "box": self.box, "model_box": self.model_box,
               "timings_ms": self.timings_ms}
        return {**out, **self.state_fields()}

    def state_fields(self) -> dict[str, Any]:
        """{"state": parsed object} under a schema ({"state": None, "state_error": why} if it did not close)."""
        if not self.constrained:
            return {}
        return {"state": self.state, **({"state_error": self.state_error} if self.state_error else {})}


def io_record(session: ort.InferenceSession) -> dict[str, Any]:
    """A component record's input and output names, read from the loaded graph."""
    return {"inputs": [{"name": i.name} for i in session.get_inputs()],
            "outputs": [{"name": o.name} for o in session.get_outputs()]}


class Pipeline:
    """Holds the sessions, tokenizer and one preallocated KV cache; not thread-safe."""

    def __init__(self, bundle: Bundle, provider: str | None = None, max_context: int | None = None,
                 threads: int | None = None, max_batch: int = 8,
                 session_factory: Callable[[Path], ort.InferenceSession] | None = None, spinning: bool = True):
        """`session_factory` loads each component's ONNX file (default: `sessions.create_session` with the
        chosen providers); calibration passes one that runs FP8 graphs literally. `threads` and `spinning`
        set the sessions' intra-op pools (spinning off when another lane shares the CPU)."""
        self.spinning = spinning
        self.bundle = bundle
        self.session_factory = session_factory
        m = bundle.manifest
        self.adapter = adapter_for(m)
        self.providers = resolve_providers(provider)
        self.device = device_for(self.providers)
        self.max_batch = max(1, int(max_batch))
        self.max_context = min(max_context or m["text"]["max_context"], m["text"]["max_context"])
        self.vision = self._session("vision", threads) if bundle.has_vision else None  # None: text-only
        # Face-LLaVA's video tower (one window of frames -> frame-major image embeddings); None: images only
        self.video = self._session("video", threads) if "video" in m["components"] else None
        embed, decoder = self._session("embed", threads), self._session("decoder", threads)
        # Tensor names by role from the manifest's records; a manifest without them: the graphs' own.
        parts = (("embed", embed), ("decoder", decoder)) + ((("vision", self.vision),) if self.vision else ())
        records = {name: rec if "inputs" in rec and "outputs" in rec else io_record(session)
                   for name, session in parts for rec in [m["components"][name]]}
        self.model = TextModel(embed=embed, decoder=decoder,
                               names=TensorNames.from_manifest(records, int(m["text"]["num_layers"])),
                               hidden_size=int(m["text"]["hidden_size"]), device=self.device,
                               rope_axes=self.adapter.rope_axes)
        # Called with the vision encoder's inputs before each call (calibration records them; read only).
        self.vision_observers: list[Callable[[dict[str, np.ndarray]], None]] = []
        tok_path = bundle.path / m["tokenizer"]["file"]
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:
            raise BundleError(f"tokenizer {tok_path} could not be loaded ({e}); re-export the bundle") from None
        self.profile = m["prompt"]
        self.text_cfg = m["text"]
        self.generation = m["generation"]
        self.stop_ids = {self._token_id(t) for t in self.profile["stop_tokens"]}
        self.image_token_id = int(self.text_cfg.get("image_token_id", -1))  # -1: no image token (text-only)
        self.cache = PromptCache.allocate(self.text_cfg["num_layers"], 1, self.text_cfg["num_kv_heads"],
                                          self.text_cfg["head_dim"], self.max_context, self.device)
        self.grammars: dict[str, Any] = {}  # schema JSON -> CompiledGrammar (llguidance), compiled once

    def _session(self, component: str, threads: int | None) -> ort.InferenceSession:
        """One component's session; under TensorRT with shape profiles that fit max_batch rows of max_context.

        Under TensorRT an int8 component loads its `tensorrt_file` (int8 activations with zero point 0, which
        TensorRT requires) when the bundle has one; every other provider keeps the uint8 graph that ORT's CPU
        kernels fuse into integer matmuls.
        """
        path = self.bundle.component_path(component)
        if self.session_factory is not None:
            return self.session_factory(path)
        trt = None
        if TENSORRT in self.providers:
            trt = trt_ep_provider_options(self.bundle, component, self.max_batch, self.max_context)
            signed = self.bundle.component(component).get("tensorrt_file")
            if signed:
                path = self.bundle.file(signed["file"])
        return create_session(path, self.providers, threads, trt, spinning=self.spinning)

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, provider: str | None = None, max_context: int | None = None,
                    threads: int | None = None, max_batch: int = 8, spinning: bool = True) -> Pipeline:
        return cls(load(path), provider=provider, max_context=max_context, threads=threads, max_batch=max_batch,
                   spinning=spinning)

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
        feeds = self.adapter.vision_inputs(image_bgr, landmarks68)
        for observe in self.vision_observers:
            observe(feeds)
        io = self.vision.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        io.bind_output(self.model.names.vision_embeds, self.device)
        self.vision.run_with_iobinding(io)
        return io.get_outputs()[0]

    def require_video(self) -> None:
        """Raise, naming the fix, unless this bundle has a video encoder."""
        if self.video is None:
            raise ValueError(f"{self.bundle.path} has no video encoder (components.video): video windows need a "
                             f"Face-LLaVA bundle exported from a checkpoint whose mm_video_tower is a local "
                             f"LanguageBind_Video_merge directory (or --preset tiny-random-face-llava-video)")

    def encode_video(self, clip: VideoClip) -> ort.OrtValue:
        """Video encoder output for one window ([frames * tokens_per_frame, hidden]), kept on the device."""
        self.require_video()
        feeds = self.adapter.video_inputs(clip.frames, clip.landmarks68)
        io = self.video.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        io.bind_output(self.video.get_outputs()[0].name, self.device)
        self.video.run_with_iobinding(io)
        return io.get_outputs()[0]

    def build_video_prompt(self, instruction: str | None) -> prompts.Prompt:
        """Token ids for one video window: the frames' placeholders joined as Face-LLaVA joins its <image>s.
        Without an instruction, the bundle's `emotion` task prompt (the authors recommend video for emotion)."""
        self.require_video()
        video = self.adapter.video
        instruction = instruction or (self.profile.get("tasks") or {}).get("emotion")
        return prompts.encode(self.tokenizer, self.profile, self.adapter.video_tokens_per_frame, instruction, None,
                              frames=self.adapter.video_frames, frame_separator=video.get("frame_separator", " "))

    def build_prompt(self, image_wh: tuple[int, int], box: tuple[int, int, int, int] | None,
                     instruction: str | None) -> tuple[prompts.Prompt, tuple | None, tuple | None]:
        """Token ids for one region of an image of size `image_wh` that the encoder sees whole."""
        model_box = None
        if box is not None:
            box = crops.fit_box(tuple(box), *image_wh)
            model_box = crops.box_to_model(box, image_wh, self.image_size)
        prompt = prompts.encode(self.tokenizer, self.profile, self.adapter.image_tokens, instruction, model_box)
        return prompt, box, model_box

    def build_text_prompt(self, instruction: str | None, system: str | None = None) -> prompts.Prompt:
        """Token ids of a text-only bundle's chat prompt: the checkpoint's chat template, no image."""
        profile = self.profile if system is None else {**self.profile, "system": system}
        return prompts.encode(self.tokenizer, profile, 0, instruction, None)  # BOS, if any, is in the template

    def describe_text(self, prompt: str | None = None, options: GenerationOptions | None = None, *,
                      system: str | None = None, **kwargs: Any) -> Description:
        """Answer one prompt with a text-only bundle (no image); `options` and keywords as for `describe`."""
        return self.describe(None, prompt=prompt, options=options, system=system, **kwargs)

    def describe_texts(self, texts: list[str], options: GenerationOptions | None = None, *,
                       system: str | None = None, **sampling: Any) -> list[Description]:
        """Several prompts decoded together, one token per prompt per step (the batched path of `describe`)."""
        return self._describe([(None, None, None)] * len(texts), list(texts), self.options(options, **sampling),
                              system=system)

    def grammar(self, schema: Any):
        """`schema` (dict, JSON file, "face_state", or "profile": the bundle profile's `json_schema`, else the
        default) compiled for this bundle's tokenizer, once; raises GrammarError naming what is wrong."""
        from focalrt.runtime.generation import grammar

        if isinstance(schema, str) and schema == "profile":
            schema = self.profile.get("json_schema") or "face_state"
        schema = grammar.load_schema(schema)
        key = json.dumps(schema, sort_keys=True)
        if key not in self.grammars:
            tok_file = self.bundle.path / self.bundle.manifest["tokenizer"]["file"]
            tok_key = (str(tok_file.resolve()), tok_file.stat().st_mtime_ns)  # llguidance's view: built once
            self.grammars[key] = grammar.compile_schema(schema, self.tokenizer, int(self.text_cfg["vocab_size"]),
                                                        sorted(self.stop_ids), cache_key=tok_key)
        return self.grammars[key]

    def options(self, options: GenerationOptions | None = None, **sampling: Any) -> GenerationOptions:
        """`options` with keyword overrides, then the bundle's `generation` defaults for what is still unset."""
        unknown = set(sampling) - {f.name for f in fields(GenerationOptions)}
        if unknown:
            raise TypeError(f"unknown generation option(s) {sorted(unknown)}; known: "
                            f"{[f.name for f in fields(GenerationOptions)]}")
        o = replace(options or GenerationOptions(), **{k: v for k, v in sampling.items() if v is not None})
        gen = self.generation
        return replace(o, max_new_tokens=int(gen["max_new_tokens"] if o.max_new_tokens is None else o.max_new_tokens),
                       temperature=gen.get("temperature", 0.0) if o.temperature is None else o.temperature,
                       top_k=gen.get("top_k", 0) if o.top_k is None else o.top_k,
                       top_p=gen.get("top_p", 1.0) if o.top_p is None else o.top_p)

    def describe(self, image: np.ndarray | str | os.PathLike, box: tuple[int, int, int, int] | None = None,
                 prompt: str | None = None, options: GenerationOptions | None = None, *,
                 on_text: Callable[[str], None] | None = None, return_logits: bool = False,
                 landmarks68: np.ndarray | None = None, sampler: SamplerFn | None = None,
                 logits_processors: list[LogitsProcessor] | None = None,
                 on_token: Callable[[int], None] | None = None, drafts: Drafts | None = None,
                 draft_key: Any = None, system: str | None = None, **sampling: Any) -> Description:
        """Describe `box` (pixels of `image`, BGR array or file) or the whole image when no box. A text-only
        bundle takes `image=None` and answers `prompt` (with `system` instead of the bundle's system prompt).

        A batch of one through the same loop as `describe_views`; the whole prompt is prefilled in one
        call. `options` (or the keywords max_new_tokens, temperature, top_k, top_p, seed) say how to
        sample; `sampler` replaces the sampler they build; `logits_processors` rewrite the logits before
        each sampling step; `on_text` streams text and `on_token` token ids. `drafts` proposes draft
        tokens (from `draft_key`'s last description, or the prompt): same output, fewer decoder calls.
        """
        stream = TextStream(self.tokenizer) if on_text else None

        def emit(_row: int, token: int) -> None:
            if on_token is not None:
                on_token(token)
            if stream is not None and (delta := stream.push(token)):
                on_text(delta)

        return self._describe([(image, box, landmarks68)], prompt, self.options(options, **sampling), sampler=sampler,
                              processors=[logits_processors or []], on_token=emit, return_logits=return_logits,
                              share_prefix=False, drafts=drafts, draft_keys=[draft_key], system=system)[0]

    def describe_video(self, frames: list[np.ndarray], prompt: str | None = None,
                       options: GenerationOptions | None = None, *, landmarks68: list[np.ndarray] | None = None,
                       **kwargs: Any) -> Description:
        """Describe a video window: `frames` (BGR, time order, the bundle's `preprocess.video.frames` of them,
        one size) go through the video encoder together; `landmarks68` gives each frame's points (or None).
        Other keywords as for `describe`."""
        return self.describe(VideoClip(list(frames), None if landmarks68 is None else list(landmarks68)),
                             prompt=prompt, options=options, **kwargs)

    def describe_clips(self, clips: list[VideoClip], prompt: str | None = None,
                       options: GenerationOptions | None = None, **sampling: Any) -> list[Description]:
        """Several video windows (e.g. one per tracked face) in one batch: one decode step serves them all."""
        return self._describe([(clip, None, None) for clip in clips], prompt, self.options(options, **sampling))

    def describe_regions(self, image: np.ndarray | str | os.PathLike, boxes: list[tuple[int, int, int, int] | None],
                         prompt: str | None = None, options: GenerationOptions | None = None, *,
                         landmarks68: np.ndarray | None = None, **sampling: Any) -> list[Description]:
        """Describe several regions of one image at the cost of little more than one.

        The encoder runs once per distinct view of the image; the prompt prefix (system, image) is
        prefilled once per view and copied to each region's KV slot; each region prefills only its own
        suffix; then one decode step serves every region still generating.
        """
        return self.describe_views([ImageRegions(image, boxes, landmarks68)], prompt, options, **sampling)[0]

    def describe_views(self, views: list[ImageRegions], prompt: str | None = None,
                       options: GenerationOptions | None = None, *, drafts: Drafts | None = None,
                       draft_keys: list[list[Any]] | None = None, **sampling: Any) -> list[list[Description]]:
        """Several images (e.g. one crop per face), each with its regions and landmarks, in one batch.

        Decode is batched across every region of every image, so three faces with three regions each
        share each decode step. Plain (image, boxes, landmarks68) tuples work as well. Returns one list of
        descriptions per image, in order. `drafts` with `draft_keys` (one key per box, e.g. (face id,
        region)) drafts each region from its last description.
        """
        requests = [(image, box, lm) for image, boxes, lm in views for box in boxes]
        keys = [key for per_view in draft_keys for key in per_view] if draft_keys else None
        flat = self._describe(requests, prompt, self.options(options, **sampling), drafts=drafts, draft_keys=keys)
        out, i = [], 0
        for _, boxes, _ in views:
            out.append(flat[i:i + len(boxes)])
            i += len(boxes)
        return out

    def plan(self, requests: list[tuple[Any, Any, np.ndarray | None]], prompt: str | list[str] | None,
             system: str | None = None) -> list[PlannedRegion]:
        """Each (image, box, landmarks) as the view the encoder sees and the prompt for its region; a text-only
        request (image None) has no view and the chat prompt of `prompt` (one per request when a list)."""
        images: dict[int, np.ndarray] = {}
        planned = []
        for i, (image, box, landmarks68) in enumerate(requests):
            if (image is None) != (self.vision is None):
                raise ValueError(f"{self.bundle.path} is a text-only bundle: it takes a prompt and no image"
                                 if self.vision is None else "this bundle describes images: give an image")
            if isinstance(image, VideoClip):
                p = self.build_video_prompt(prompt[i] if isinstance(prompt, list) else prompt)
                if p.token_ids.size + 1 > self.max_context:
                    raise ValueError(f"a video window's prompt has {p.token_ids.size} tokens but the context holds "
                                     f"{self.max_context}; export with a larger --max-context")
                planned.append(PlannedRegion(image, p, None, None, None))
                continue
            if image is None:
                p = self.build_text_prompt(prompt[i] if isinstance(prompt, list) else prompt, system)
                if p.token_ids.size + 1 > self.max_context:
                    raise ValueError(f"the prompt has {p.token_ids.size} tokens but the context holds "
                                     f"{self.max_context}; shorten the prompt or export with a larger --max-context")
                planned.append(PlannedRegion(None, p, None, None, None))
                continue
            if id(image) not in images:  # read or check each distinct input image once
                images[id(image)] = read_image(image) if isinstance(image, (str, os.PathLike)) else check_frame(image)
            mode = self.profile.get("region_mode", "text")
            view, view_box, image_box = crops.region_view(images[id(image)], box, mode)
            vh, vw = view.shape[:2]
            if landmarks68 is not None and view_box is not None and view_box != image_box:  # a crop: its pixels
                landmarks68 = crops.landmarks_in_view(landmarks68, image_box, view_box)
            if view_box is not None and self.profile.get("region_mode") == "face_crop":  # the square cuts the box
                view_box = (max(0, view_box[0]), max(0, view_box[1]), min(vw, view_box[2]), min(vh, view_box[3]))
            p, _, model_box = self.build_prompt((vw, vh), view_box, prompt)
            if p.token_ids.size + 1 > self.max_context:
                raise ValueError(f"the prompt has {p.token_ids.size} tokens but the context holds "
                                 f"{self.max_context}; shorten --prompt or export with a larger --max-context")
            planned.append(PlannedRegion(view, p, image_box, model_box, landmarks68))
        return planned

    def _describe(self, requests: list[tuple[Any, Any, np.ndarray | None]], prompt: str | list[str] | None,
                  options: GenerationOptions, sampler: SamplerFn | None = None,
                  processors: list[list[LogitsProcessor]] | None = None, on_token: TokenCallback | None = None,
                  return_logits: bool = False, share_prefix: bool = True, drafts: Drafts | None = None,
                  draft_keys: list[Any] | None = None, system: str | None = None) -> list[Description]:
        t_start = time.perf_counter()
        if options.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {options.max_new_tokens}")
        sampler = sampler or Sampler(options.temperature, options.top_k, options.top_p, options.seed)
        compiled = self.grammar(options.schema) if options.schema is not None else None
        if compiled is not None:  # one matcher per row: every region and face follows the grammar on its own
            processors = [[*(processors[i] if processors else []), compiled.processor()] for i in range(len(requests))]
        planned = self.plan(requests, prompt, system)
        prep_ms = (time.perf_counter() - t_start) * 1e3
        # view -> (image embeddings, encoder ms); a text-only request has no view and no image
        encoded: dict[int, tuple[ort.OrtValue | None, float]] = {id(None): (None, 0.0)}
        for region in planned:
            if id(region.view) not in encoded:
                t0 = time.perf_counter()
                embeds = (self.encode_video(region.view) if isinstance(region.view, VideoClip)
                          else self.encode_image(region.view, region.landmarks68))
                encoded[id(region.view)] = (embeds, (time.perf_counter() - t0) * 1e3)
        results: list[Description] = []
        for i in range(0, len(planned), self.max_batch):
            chunk = slice(i, i + self.max_batch)
            keys = draft_keys[chunk] if draft_keys else [None] * len(planned[chunk])
            results += self._generate(planned[chunk], encoded, options.max_new_tokens, sampler,
                                      processors[chunk] if processors else None, on_token, return_logits,
                                      share_prefix, prep_ms if i == 0 else 0.0, drafts, keys)
        if compiled is not None:
            for d in results:
                parse_state(d, options.max_new_tokens)
        return results

    def _generate(self, planned: list[PlannedRegion], encoded: dict[int, tuple[ort.OrtValue, float]],
                  max_new_tokens: int, sampler: SamplerFn, processors: list[list[LogitsProcessor]] | None,
                  on_token: TokenCallback | None, return_logits: bool, share_prefix: bool,
                  prep_ms: float, drafts: Drafts | None = None, keys: list[Any] | None = None) -> list[Description]:
        """One batch through `generate.generate`, and a Description per row with its timings."""
        t0 = time.perf_counter()
        n = len(planned)
        if self.cache.batch < n:  # grows once, to the largest batch seen
            self.cache = self.cache.resized(n)
        rows = []
        for region in planned:
            positions, delta = self.adapter.positions(region.prompt.token_ids)
            if region.view is None:  # text-only: no image, the whole prompt is prefilled
                rows.append(Row(region.prompt.token_ids, positions, delta))
                continue
            rows.append(Row(region.prompt.token_ids, positions, delta, region.prompt.prefix_len,
                            encoded[id(region.view)][0], id(region.view), self.image_token_id))
        if drafts is not None and drafts.mode != "off" and self.model.names.logits_to_keep is None:
            warnings.warn("this bundle's decoder returns the last token's logits only, so drafts cannot be "
                          "verified; decoding without them (re-export the bundle to use --draft)", stacklevel=2)
            drafts.mode = "off"
        hooks = ([drafts.drafter(key, region.prompt.token_ids) for key, region in zip(keys, planned, strict=True)]
                 if drafts is not None and drafts.mode != "off" else None)
        out = generate(self.model, self.cache, rows, max_new_tokens, self.stop_ids, sampler, processors, on_token,
                       return_logits, share_prefix, hooks)
        if drafts is not None:
            for key, tokens in zip(keys, out.tokens, strict=True):
                drafts.remember(key, tokens)
        t_decode = time.perf_counter() - out.decode_ms / 1e3  # when the first token was chosen
        results = []
        seen_views: set[int] = set()
        for row, region in enumerate(planned):
            vision_ms = 0.0 if id(region.view) in seen_views else encoded[id(region.view)][1]
            seen_views.add(id(region.view))
            shared = prep_ms if row == 0 else 0.0
            timings = {"preprocess_and_vision": round(vision_ms, 3), "prefill": round(out.prefill_ms[row], 3),
                       "decode": round(out.decode_ms, 3), "decode_steps": [round(x, 3) for x in out.step_ms],
                       "decode_calls": len(out.step_ms),
                       **({"draft_proposed": out.drafted[row], "draft_accepted": out.accepted[row]} if hooks else {}),
                       "ttft": round(shared + vision_ms + (t_decode - t0) * 1e3, 3),
                       "total": round(shared + vision_ms + (time.perf_counter() - t0) * 1e3, 3), "batch": n}
            results.append(Description(text=self.tokenizer.decode(out.tokens[row], skip_special_tokens=True),
                                       token_ids=out.tokens[row], prompt_token_ids=region.prompt.token_ids.tolist(),
                                       finish_reason=out.finish[row], box=region.image_box,
                                       model_box=region.model_box, timings_ms=timings,
                                       logits=out.logits[row] if out.logits is not None else None))
        return results


def parse_state(d: Description, max_new_tokens: int) -> None:
    """Fill `d.state` from a schema-constrained answer; the grammar makes it parse unless it was cut off."""
    d.constrained = True
    try:
        d.state = json.loads(d.text)
    except json.JSONDecodeError:
        d.state = None
        d.state_error = (f"the answer stopped at max_new_tokens={max_new_tokens} before its JSON closed; "
                         f"raise --max-new-tokens" if d.finish_reason == "length" else
                         f"the answer is not JSON although it was constrained: {d.text[:80]!r}")
