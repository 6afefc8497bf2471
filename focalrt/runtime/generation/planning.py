"""Planning: each request becomes the encoder input it needs and the prompt for its region.

Pure functions of the requests and the bundle's `PromptSetup`; nothing runs a session here. "Plan" means
only this in the runtime: the camera loop's choice of which regions are due is scheduling
(`stream/scheduling.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from tokenizers import Tokenizer

from focalrt.runtime.faces import crops
from focalrt.runtime.frames import check_frame, read_image
from focalrt.runtime.generation import prompt as prompts
from focalrt.runtime.models.adapters import FamilyAdapter

Box = tuple[int, int, int, int]


class VideoClip(NamedTuple):
    """One video window: the frames in time order (BGR, one size, as many as the bundle's video encoder
    takes) and optionally each frame's 68 landmarks in its pixels."""

    frames: list[np.ndarray]
    landmarks68: list[np.ndarray] | None = None


@dataclass(frozen=True)
class Request:
    """One thing to describe, the unit of `Pipeline.describe_batch`.

    An image region (`image` a BGR array or an image file, `box` in its pixels or None for the whole image,
    `landmarks68` in its pixels), a video window (`image` a `VideoClip`), or, for a text-only bundle, a
    prompt alone (`image` None). `prompt` replaces the bundle's instruction; `draft_key` names the series of
    descriptions that drafts continue (e.g. (face id, region)).
    """

    image: Any = None
    box: Box | None = None
    landmarks68: np.ndarray | None = None
    prompt: str | None = None
    draft_key: Any = None


@dataclass(frozen=True)
class PromptSetup:
    """What planning reads from a loaded bundle."""

    tokenizer: Tokenizer
    profile: dict[str, Any]
    adapter: FamilyAdapter
    max_context: int
    vision: bool  # False: a text-only bundle
    video: bool  # the bundle has a video encoder
    source: str  # the bundle's path, for messages


@dataclass(frozen=True)
class Planned:
    """One request ready to generate: its encoder input (an index into `Plan.inputs`; None for text), its
    prompt, and its box in the input image's pixels (after clipping) and in the encoder image's pixels."""

    encoder_input: int | None
    prompt: prompts.Prompt
    image_box: Box | None = None
    model_box: Box | None = None


@dataclass(frozen=True)
class EncoderInput:
    """What one encoder call takes: an image the encoder sees (the frame, a crop, or a copy with the box
    drawn) with its landmarks in its pixels, or a video window."""

    pixels: np.ndarray | VideoClip
    landmarks68: np.ndarray | None = None


@dataclass(frozen=True)
class Plan:
    """The distinct encoder inputs (regions of one image in `text` mode share one) and one row per request."""

    inputs: list[EncoderInput]
    rows: list[Planned]


def require_video(setup: PromptSetup) -> None:
    """Raise, naming the fix, unless the bundle has a video encoder."""
    if not setup.video:
        raise ValueError(f"{setup.source} has no video encoder (components.video): video windows need a "
                         f"Face-LLaVA bundle exported from a checkpoint whose mm_video_tower is a local "
                         f"LanguageBind_Video_merge directory (or --preset tiny-random-face-llava-video)")


def check_fits(setup: PromptSetup, prompt: prompts.Prompt, what: str, fix: str) -> prompts.Prompt:
    """`prompt` unless it leaves no room for one new token in the context."""
    if prompt.token_ids.size + 1 > setup.max_context:
        raise ValueError(f"{what} has {prompt.token_ids.size} tokens but the context holds {setup.max_context}; "
                         f"{fix}export with a larger --max-context")
    return prompt


def image_prompt(setup: PromptSetup, image_wh: tuple[int, int], box: Box | None,
                 instruction: str | None) -> tuple[prompts.Prompt, Box | None, Box | None]:
    """(prompt, box fitted to the image, box in the encoder's pixels) for one region of an image of size
    `image_wh` that the encoder sees whole."""
    model_box = None
    if box is not None:
        box = crops.fit_box(tuple(box), *image_wh)
        model_box = crops.box_to_model(box, image_wh, setup.adapter.image_size)
    prompt = prompts.encode(setup.tokenizer, setup.profile, setup.adapter.image_tokens, instruction, model_box)
    return prompt, box, model_box


def text_prompt(setup: PromptSetup, instruction: str | None, system: str | None = None) -> prompts.Prompt:
    """A text-only bundle's chat prompt (the checkpoint's chat template, BOS included if it has one)."""
    profile = setup.profile if system is None else {**setup.profile, "system": system}
    return prompts.encode(setup.tokenizer, profile, 0, instruction, None)


def video_prompt(setup: PromptSetup, instruction: str | None) -> prompts.Prompt:
    """One video window's prompt: the frames' placeholders joined as Face-LLaVA joins its <image>s. Without an
    instruction, the bundle's `emotion` task prompt (the authors recommend video for emotion)."""
    require_video(setup)
    adapter = setup.adapter
    instruction = instruction or (setup.profile.get("tasks") or {}).get("emotion")
    return prompts.encode(setup.tokenizer, setup.profile, adapter.video_tokens_per_frame, instruction, None,
                          frames=adapter.video_frames, frame_separator=adapter.video.get("frame_separator", " "))


def plan(setup: PromptSetup, requests: list[Request], system: str | None = None) -> Plan:
    """Every request as an encoder input and a prompt. Requests on the same image object share its reading
    and, when they see the same pixels (`text` mode), one encoder input."""
    inputs: list[EncoderInput] = []
    rows: list[Planned] = []
    images: list[tuple[Any, np.ndarray]] = []  # (caller's image, checked pixels): each read once

    def input_index(pixels: Any, landmarks68: np.ndarray | None) -> int:
        for i, seen in enumerate(inputs):
            if seen.pixels is pixels and seen.landmarks68 is landmarks68:
                return i
        inputs.append(EncoderInput(pixels, landmarks68))
        return len(inputs) - 1

    for r in requests:
        if (r.image is None) == setup.vision:
            raise ValueError("this bundle describes images: give an image" if setup.vision else
                             f"{setup.source} is a text-only bundle: it takes a prompt and no image")
        if isinstance(r.image, VideoClip):
            p = check_fits(setup, video_prompt(setup, r.prompt), "a video window's prompt", "")
            rows.append(Planned(input_index(r.image, None), p))
            continue
        if r.image is None:
            p = check_fits(setup, text_prompt(setup, r.prompt, system), "the prompt", "shorten the prompt or ")
            rows.append(Planned(None, p))
            continue
        pixels = next((checked for image, checked in images if image is r.image), None)
        if pixels is None:
            pixels = read_image(r.image) if isinstance(r.image, (str, os.PathLike)) else check_frame(r.image)
            images.append((r.image, pixels))
        mode = setup.profile.get("region_mode", "text")
        view, view_box, image_box = crops.region_view(pixels, r.box, mode)
        vh, vw = view.shape[:2]
        landmarks68 = r.landmarks68
        if landmarks68 is not None and view_box is not None and view_box != image_box:  # a crop: its pixels
            landmarks68 = crops.landmarks_in_view(landmarks68, image_box, view_box)
        if view_box is not None and mode == "face_crop":  # the square may cut the box
            view_box = (max(0, view_box[0]), max(0, view_box[1]), min(vw, view_box[2]), min(vh, view_box[3]))
        p, _, model_box = image_prompt(setup, (vw, vh), view_box, r.prompt)
        check_fits(setup, p, "the prompt", "shorten --prompt or ")
        rows.append(Planned(input_index(view, landmarks68), p, image_box, model_box))
    return Plan(inputs, rows)
