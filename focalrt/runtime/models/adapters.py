"""Family adapters: the only per-model code in the runtime, one module per family, chosen from `ADAPTERS`.

An adapter turns a frame (and optional landmarks) into the vision encoder's inputs, and a prompt's token
ids into the decoder's position ids. Everything else (sessions, KV cache, decode loop, prompts from the
manifest's profile) is shared by every family.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import numpy as np


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


# manifest "family" -> (runtime module, adapter class); modules load only for the family in use
ADAPTERS = {"qwen2_5_vl": ("focalrt.runtime.models.qwen2_5_vl", "Qwen25VLAdapter"),
            "face_llava": ("focalrt.runtime.models.face_llava", "FaceLlavaAdapter"),
            "text": ("focalrt.runtime.models.text", "TextAdapter")}


def adapter_for(manifest: dict[str, Any]) -> FamilyAdapter:
    family = manifest["family"]
    if family not in ADAPTERS:
        raise ValueError(f"no runtime adapter for family {family!r}; this focalrt knows {sorted(ADAPTERS)}")
    module, name = ADAPTERS[family]
    return getattr(importlib.import_module(module), name)(manifest)
