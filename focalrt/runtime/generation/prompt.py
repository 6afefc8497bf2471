"""Prompt text from the manifest's profile: the image prefix that regions share and each region's suffix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Prompt:
    token_ids: np.ndarray  # [S] int64, image pad tokens expanded
    text: str
    prefix_len: int  # tokens up to and including the image: shared by every region of one image


def render(profile: dict[str, Any], image_tokens: int, instruction: str | None,
           model_box: Box | None, frames: int = 1, frame_separator: str = " ") -> tuple[str, str]:
    """The prompt text, split into the image prefix and the per-region suffix. A video window has `frames`
    placeholders of `image_tokens` each, joined by `frame_separator` (Face-LLaVA's "<image> <image> ...").

    A text-only profile (no {image} in its template) splits before the instruction instead, so the
    system turn is the prefix that requests share.
    """
    instruction = instruction or profile["default_instruction"]
    if "{image}" not in profile["template"]:
        head, tail = profile["template"].split("{instruction}", 1)
        system = profile.get("system", "")
        return (head.format(system=system, instruction=instruction),
                ("{instruction}" + tail).format(system=system, instruction=instruction))
    region = ""
    if model_box is not None:  # draw/crop profiles word the region without coordinates
        x1, y1, x2, y2 = model_box
        region = profile["region_template"].format(x1=x1, y1=y1, x2=x2, y2=y2)
    image = frame_separator.join([profile["image_token"] * image_tokens] * frames)
    text = profile["template"].format(system=profile.get("system", ""), image=image, region=region,
                                      instruction=instruction)
    cut = text.index(image) + len(image)
    return text[:cut], text[cut:]


def encode(tokenizer: Tokenizer, profile: dict[str, Any], image_tokens: int, instruction: str | None,
           model_box: Box | None, frames: int = 1, frame_separator: str = " ") -> Prompt:
    prefix, suffix = render(profile, image_tokens, instruction, model_box, frames, frame_separator)
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=False).ids
    suffix_ids = tokenizer.encode(suffix, add_special_tokens=False).ids
    ids = np.asarray(prefix_ids + suffix_ids, np.int64)
    # Never an empty shared prefix: the batched path prefills it on its own.
    return Prompt(ids, prefix + suffix, max(1, len(prefix_ids)))
