"""Runtime adapter of text-only bundles (a Llama or Qwen2 causal LM, e.g. SmolLM2 from its GGUF)."""

from __future__ import annotations

from typing import Any

import numpy as np


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
