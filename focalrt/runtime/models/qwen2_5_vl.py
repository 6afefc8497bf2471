"""Runtime adapter of the Qwen2.5-VL family (Focal-RegionFace): patchified pixels in, 3-axis M-RoPE positions."""

from __future__ import annotations

from typing import Any

import numpy as np

from focalrt.runtime.models.preprocess import patchify, to_model_image
from focalrt.runtime.models.rope import mrope_positions


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
