"""Family adapters: the only per-model code in the runtime.

An adapter turns a frame (and optional landmarks) into the vision encoder's inputs, and a prompt's token
ids into the decoder's position ids. Everything else (sessions, KV cache, decode loop, prompts from the
manifest's profile) is shared by every family.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from focalrt.runtime.preprocess import patchify, to_model_image
from focalrt.runtime.rope import mrope_positions


class FamilyAdapter(Protocol):
    image_size: int
    image_tokens: int  # image placeholder tokens the prompt holds
    rope_axes: int  # 3 for M-RoPE ([3, B, S] position ids), 1 for plain RoPE ([B, S])
    uses_landmarks: bool

    def vision_inputs(self, image_bgr: np.ndarray, landmarks68: np.ndarray | None = None) -> dict[str, np.ndarray]:
        ...

    def positions(self, prompt_ids: np.ndarray) -> tuple[np.ndarray, int]:
        """Position ids [axes, S] for the prompt, and the offset of later tokens (index + delta)."""
        ...


class Qwen25VLAdapter:
    rope_axes = 3
    uses_landmarks = False

    def __init__(self, manifest: dict[str, Any]):
        self.pre = manifest["preprocess"]
        self.image_size = int(self.pre["image_size"])
        grid = self.image_size // self.pre["patch_size"] // self.pre["merge_size"]
        self.grid_hw = (grid, grid)
        self.image_tokens = grid * grid
        self.image_token_id = int(manifest["text"]["image_token_id"])

    def vision_inputs(self, image_bgr: np.ndarray, landmarks68: np.ndarray | None = None) -> dict[str, np.ndarray]:
        p = self.pre
        rgb = to_model_image(image_bgr, self.image_size)
        pixels = patchify(rgb, p["mean"], p["std"], p["rescale"], p["patch_size"], p["merge_size"],
                          p["temporal_patch_size"])
        return {"pixel_values": pixels}

    def positions(self, prompt_ids: np.ndarray) -> tuple[np.ndarray, int]:
        return mrope_positions(prompt_ids, self.image_token_id, self.grid_hw)


class TextAdapter:
    """A text-only bundle: no image, plain RoPE, positions 0..S-1."""

    rope_axes = 1
    uses_landmarks = False
    image_size = 0
    image_tokens = 0

    def __init__(self, manifest: dict[str, Any]):
        self.manifest = manifest

    def vision_inputs(self, image_bgr: np.ndarray, landmarks68: np.ndarray | None = None) -> dict[str, np.ndarray]:
        raise ValueError("this is a text-only bundle: it takes no image")

    def positions(self, prompt_ids: np.ndarray) -> tuple[np.ndarray, int]:
        return np.arange(prompt_ids.size, dtype=np.int64)[None], 0


def adapter_for(manifest: dict[str, Any]) -> FamilyAdapter:
    family = manifest["family"]
    if family == "text":
        return TextAdapter(manifest)
    if family == "qwen2_5_vl":
        return Qwen25VLAdapter(manifest)
    if family == "face_llava":
        from focalrt.runtime.face_llava import FaceLlavaAdapter

        return FaceLlavaAdapter(manifest)
    raise ValueError(f"no runtime adapter for family {family!r}")
