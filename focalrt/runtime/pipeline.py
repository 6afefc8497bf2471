"""`Pipeline`: a bundle loaded once, then `describe(image, box, prompt)` or `describe_batch(requests)`.

A facade: sessions load through `backends/sessions.py`, requests become encoder inputs and prompts in
`generation/planning.py`, schemas compile in `generation/grammar.py`, and tokens come from
`generation/generate.py`. What stays here is the order of those steps and the `Description` they make.
"""

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
from focalrt.runtime.backends.sessions import device_for, load_component, resolve_providers
from focalrt.runtime.generation import planning
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
from focalrt.runtime.generation.grammar import CompiledGrammar, SchemaCache
from focalrt.runtime.generation.planning import EncoderInput, Planned, Request, VideoClip
from focalrt.runtime.models.adapters import adapter_for

Box = tuple[int, int, int, int]

__all__ = ["Description", "GenerationOptions", "ImageRegions", "Pipeline", "Request", "VideoClip", "parse_state"]


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
    """One image for `describe_images` (e.g. a face crop), the boxes to describe in it, and its landmarks."""

    image: Any  # BGR array or image file
    boxes: list[tuple[int, int, int, int] | None]
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
    """Holds the sessions, tokenizer and one KV cache; not thread-safe. (The camera loop around it is
    `stream/runner.py`; "pipeline" here means the model's, not the frame's.)

    `describe_batch(requests)` is the one entry point; `describe` (one request, with streaming) and the
    `describe_*` conveniences build requests for it.
    """

    def __init__(self, bundle: Bundle, provider: str | None = None, max_context: int | None = None,
                 threads: int | None = None, max_batch: int = 8,
                 session_factory: Callable[[Path], ort.InferenceSession] | None = None, spinning: bool = True):
        """`session_factory` loads each component's ONNX file (default: `sessions.load_component` with the
        chosen providers); calibration passes one that runs FP8 graphs literally. `threads` and `spinning`
        set the sessions' intra-op pools (spinning off when another lane shares the CPU)."""
        self.spinning = spinning
        self.bundle = bundle
        m = bundle.manifest
        self.adapter = adapter_for(m)
        self.providers = resolve_providers(provider)
        self.device = device_for(self.providers)
        self.max_batch = max(1, int(max_batch))
        self.max_context = min(max_context or m["text"]["max_context"], m["text"]["max_context"])

        def session(component: str) -> ort.InferenceSession:
            if session_factory is not None:
                return session_factory(bundle.component_path(component))
            return load_component(bundle, component, self.providers, threads, self.max_batch, self.max_context,
                                  spinning=spinning)

        self.vision = session("vision") if bundle.has_vision else None  # None: text-only
        # Face-LLaVA's video tower (one window of frames -> frame-major image embeddings); None: images only
        self.video = session("video") if "video" in m["components"] else None
        # The decoder embeds its token ids; a bundle exported before that has an embedding component too.
        embed = session("embed") if "embed" in m["components"] else None
        decoder = session("decoder")
        # Tensor names by role from the manifest's records; a manifest without them: the graphs' own.
        parts = ((("embed", embed),) if embed else ()) + (("decoder", decoder),) + \
            ((("vision", self.vision),) if self.vision else ())
        records = {name: rec if "inputs" in rec and "outputs" in rec else io_record(sess)
                   for name, sess in parts for rec in [m["components"][name]]}
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
        self.stop_ids = {self.token_id(t) for t in self.profile["stop_tokens"]}
        self.image_token_id = int(self.text_cfg.get("image_token_id", -1))  # -1: no image token (text-only)
        self.cache = PromptCache.allocate(self.text_cfg["num_layers"], 1, self.text_cfg["num_kv_heads"],
                                          self.text_cfg["head_dim"], self.max_context, self.device)
        self.schemas = SchemaCache(self.tokenizer, tok_path, int(self.text_cfg["vocab_size"]), self.stop_ids,
                                   self.profile.get("json_schema"))

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, provider: str | None = None, max_context: int | None = None,
                    threads: int | None = None, max_batch: int = 8, spinning: bool = True) -> Pipeline:
        return cls(load(path), provider=provider, max_context=max_context, threads=threads, max_batch=max_batch,
                   spinning=spinning)

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise BundleError(f"{self.bundle.path}: stop token {token!r} is not in the tokenizer")
        return tid

    @property
    def setup(self) -> planning.PromptSetup:
        """What planning reads: this pipeline's tokenizer, prompt profile, adapter and context, as they are now."""
        return planning.PromptSetup(self.tokenizer, self.profile, self.adapter, self.max_context,
                                    vision=self.vision is not None, video=self.video is not None,
                                    source=str(self.bundle.path))

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

    def encode_video(self, clip: VideoClip) -> ort.OrtValue:
        """Video encoder output for one window ([frames * tokens_per_frame, hidden]), kept on the device."""
        planning.require_video(self.setup)
        feeds = self.adapter.video_inputs(clip.frames, clip.landmarks68)
        io = self.video.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        io.bind_output(self.video.get_outputs()[0].name, self.device)
        self.video.run_with_iobinding(io)
        return io.get_outputs()[0]

    def encode(self, encoder_input: EncoderInput) -> ort.OrtValue:
        """One planned encoder input through the video or the vision encoder."""
        if isinstance(encoder_input.pixels, VideoClip):
            return self.encode_video(encoder_input.pixels)
        return self.encode_image(encoder_input.pixels, encoder_input.landmarks68)

    def require_video(self) -> None:
        """Raise, naming the fix, unless this bundle has a video encoder."""
        planning.require_video(self.setup)

    def build_text_prompt(self, instruction: str | None, system: str | None = None) -> prompts.Prompt:
        """Token ids of a text-only bundle's chat prompt: the checkpoint's chat template, no image."""
        return planning.text_prompt(self.setup, instruction, system)

    def grammar(self, schema: Any) -> CompiledGrammar:
        """`schema` (dict, JSON file, "face_state", or "profile": the bundle profile's `json_schema`, else the
        default) compiled for this bundle's tokenizer, once; raises GrammarError naming what is wrong."""
        return self.schemas.get(schema)

    def options(self, options: GenerationOptions | None = None, **sampling: Any) -> GenerationOptions:
        """A new `options` with keyword overrides, then the bundle's `generation` defaults for what is unset."""
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

    # ------------------------------------------------------------------------------------ the public surface

    def describe_batch(self, requests: list[Request], options: GenerationOptions | None = None, *,
                       sampler: SamplerFn | None = None,
                       logits_processors: list[list[LogitsProcessor]] | None = None,
                       on_token: TokenCallback | None = None, return_logits: bool = False,
                       drafts: Drafts | None = None, system: str | None = None, share_prefix: bool = True,
                       **sampling: Any) -> list[Description]:
        """Describe every request in one batch (chunks of `max_batch` rows); one Description per request.

        The encoder runs once per distinct encoder input (the regions of one image share it in `text` mode);
        with `share_prefix` the prompt prefix (system, image) is prefilled once per input and copied to each
        region's KV slot; then one decode step serves every row still generating. `options` (or the keywords
        max_new_tokens, temperature, top_k, top_p, seed, schema) say how to sample, `sampler` replaces the
        sampler they build, `logits_processors` (one list per request) rewrite the logits before each step,
        `on_token(row, token)` sees each token. `drafts` proposes draft tokens per request from its
        `draft_key`'s last description: same output, fewer decoder calls. `system` replaces a text bundle's
        system prompt. Nothing the caller passed is changed.
        """
        t_start = time.perf_counter()
        options = self.options(options, **sampling)
        if options.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {options.max_new_tokens}")
        if logits_processors is not None and len(logits_processors) != len(requests):
            raise ValueError(f"logits_processors has {len(logits_processors)} entries for {len(requests)} "
                             f"requests; give one list per request")
        sampler = sampler or Sampler(options.temperature, options.top_k, options.top_p, options.seed)
        compiled = self.grammar(options.schema) if options.schema is not None else None
        processors = [list(logits_processors[i]) if logits_processors else [] for i in range(len(requests))]
        if compiled is not None:  # one matcher per row: every region and face follows the grammar on its own
            for row in processors:
                row.append(compiled.processor())
        plan = planning.plan(self.setup, requests, system)
        prep_ms = (time.perf_counter() - t_start) * 1e3
        embeds, encode_ms = [], []
        for encoder_input in plan.inputs:
            t0 = time.perf_counter()
            embeds.append(self.encode(encoder_input))
            encode_ms.append((time.perf_counter() - t0) * 1e3)
        drafts = self.usable_drafts(drafts)
        results: list[Description] = []
        encoded: set[int] = set()  # encoder inputs whose time a Description already reports
        for i in range(0, len(requests), self.max_batch):
            chunk = slice(i, i + self.max_batch)
            results += self.generate_chunk(plan.rows[chunk], requests[chunk], embeds, encode_ms, encoded, options,
                                           sampler, processors[chunk] if logits_processors or compiled else None,
                                           on_token, return_logits, share_prefix, prep_ms if i == 0 else 0.0,
                                           drafts)
        if compiled is not None:
            for d in results:
                parse_state(d, options.max_new_tokens)
        return results

    def describe(self, image: np.ndarray | str | os.PathLike | VideoClip | None, box: Box | None = None,
                 prompt: str | None = None, options: GenerationOptions | None = None, *,
                 on_text: Callable[[str], None] | None = None, return_logits: bool = False,
                 landmarks68: np.ndarray | None = None, sampler: SamplerFn | None = None,
                 logits_processors: list[LogitsProcessor] | None = None,
                 on_token: Callable[[int], None] | None = None, drafts: Drafts | None = None,
                 draft_key: Any = None, system: str | None = None, **sampling: Any) -> Description:
        """Describe `box` (pixels of `image`, BGR array or file) or the whole image when no box; a text-only
        bundle takes `image=None` and answers `prompt`. One request through `describe_batch`, its whole prompt
        prefilled in one call; `on_text` streams its text and `on_token` its token ids."""
        stream = TextStream(self.tokenizer) if on_text else None

        def emit(_row: int, token: int) -> None:
            if on_token is not None:
                on_token(token)
            if stream is not None and (delta := stream.push(token)):
                on_text(delta)

        request = Request(image, box, landmarks68, prompt, draft_key)
        return self.describe_batch([request], options, sampler=sampler, logits_processors=[logits_processors or []],
                                   on_token=emit, return_logits=return_logits, drafts=drafts, system=system,
                                   share_prefix=False, **sampling)[0]

    def describe_text(self, prompt: str | None = None, options: GenerationOptions | None = None, *,
                      system: str | None = None, **kwargs: Any) -> Description:
        """Answer one prompt with a text-only bundle; keywords as for `describe`."""
        return self.describe(None, prompt=prompt, options=options, system=system, **kwargs)

    def describe_texts(self, texts: list[str], options: GenerationOptions | None = None, *,
                       system: str | None = None, **sampling: Any) -> list[Description]:
        """Several prompts of a text-only bundle decoded together."""
        return self.describe_batch([Request(prompt=t) for t in texts], options, system=system, **sampling)

    def describe_video(self, frames: list[np.ndarray], prompt: str | None = None,
                       options: GenerationOptions | None = None, *, landmarks68: list[np.ndarray] | None = None,
                       **kwargs: Any) -> Description:
        """Describe one video window (the bundle's `preprocess.video.frames` BGR frames of one size, in time
        order, and optionally each frame's landmarks); keywords as for `describe`."""
        clip = VideoClip(list(frames), None if landmarks68 is None else list(landmarks68))
        return self.describe(clip, prompt=prompt, options=options, **kwargs)

    def describe_clips(self, clips: list[VideoClip], prompt: str | None = None,
                       options: GenerationOptions | None = None, **sampling: Any) -> list[Description]:
        """Several video windows (e.g. one per tracked face) decoded together."""
        return self.describe_batch([Request(clip, prompt=prompt) for clip in clips], options, **sampling)

    def describe_regions(self, image: np.ndarray | str | os.PathLike, boxes: list[Box | None],
                         prompt: str | None = None, options: GenerationOptions | None = None, *,
                         landmarks68: np.ndarray | None = None, **sampling: Any) -> list[Description]:
        """Several regions of one image at the cost of little more than one (see `describe_batch`)."""
        return self.describe_images([ImageRegions(image, boxes, landmarks68)], prompt, options, **sampling)[0]

    def describe_images(self, images: list[ImageRegions], prompt: str | None = None,
                        options: GenerationOptions | None = None, *, drafts: Drafts | None = None,
                        draft_keys: list[list[Any]] | None = None, **sampling: Any) -> list[list[Description]]:
        """Several images (e.g. one crop per face), each with its regions and landmarks, in one batch; one list
        of descriptions per image. `draft_keys` holds one key per box (e.g. (face id, region))."""
        requests = [Request(image, box, lm, prompt, draft_keys[i][b] if draft_keys else None)
                    for i, (image, boxes, lm) in enumerate(images) for b, box in enumerate(boxes)]
        flat = self.describe_batch(requests, options, drafts=drafts, **sampling)
        out, start = [], 0
        for _, boxes, _ in images:
            out.append(flat[start:start + len(boxes)])
            start += len(boxes)
        return out

    # ------------------------------------------------------------------------------------ one batch of rows

    def usable_drafts(self, drafts: Drafts | None) -> Drafts | None:
        """`drafts` unless they are off or this bundle cannot verify them (then warned, once per place)."""
        if drafts is None or drafts.mode == "off":
            return None
        if self.model.names.logits_to_keep is None:
            warnings.warn("this bundle's decoder returns the last token's logits only, so drafts cannot be "
                          "verified; decoding without them (re-export the bundle to use --draft)", stacklevel=3)
            return None
        return drafts

    def generate_chunk(self, planned: list[Planned], requests: list[Request], embeds: list[ort.OrtValue],
                       encode_ms: list[float], encoded: set[int], options: GenerationOptions, sampler: SamplerFn,
                       processors: list[list[LogitsProcessor]] | None, on_token: TokenCallback | None,
                       return_logits: bool, share_prefix: bool, prep_ms: float,
                       drafts: Drafts | None) -> list[Description]:
        """Up to `max_batch` planned rows through `generate.generate`, and a Description per row with its
        timings (an encoder input's time goes to the first row that uses it)."""
        t0 = time.perf_counter()
        n = len(planned)
        if self.cache.batch < n:  # grows once, to the largest batch seen
            self.cache = self.cache.resized(n)
        rows = []
        for region in planned:
            positions, delta = self.adapter.positions(region.prompt.token_ids)
            if region.encoder_input is None:  # text-only: no image, the whole prompt is prefilled
                rows.append(Row(region.prompt.token_ids, positions, delta))
                continue
            rows.append(Row(region.prompt.token_ids, positions, delta, region.prompt.prefix_len,
                            embeds[region.encoder_input], region.encoder_input, self.image_token_id))
        hooks = ([drafts.drafter(r.draft_key, region.prompt.token_ids)
                  for r, region in zip(requests, planned, strict=True)] if drafts is not None else None)
        out = generate(self.model, self.cache, rows, options.max_new_tokens, self.stop_ids, sampler, processors,
                       on_token, return_logits, share_prefix, hooks)
        if drafts is not None:
            for r, tokens in zip(requests, out.tokens, strict=True):
                drafts.remember(r.draft_key, tokens)
        t_decode = time.perf_counter() - out.decode_ms / 1e3  # when the first token was chosen
        results = []
        for row, region in enumerate(planned):
            vision_ms = 0.0
            if region.encoder_input is not None and region.encoder_input not in encoded:
                vision_ms = encode_ms[region.encoder_input]
                encoded.add(region.encoder_input)
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
