"""The export family interface: what `build.export_bundle` needs from each model family, and the table of them.

Each family module (`qwen2_5_vl`, `face_llava`, `text`) offers the same functions:

    FAMILY: str                                            the manifest's "family"
    load_source(model_id, preset, seed) -> Source          build a preset's model or load a checkpoint
    export_options(source, *, image_size, max_context, profile) -> Options   checked before anything is written
    write_bundle_tokenizer(source, out) -> dict            tokenizer.json + the manifest's tokenizer entry
    export_vision(model, out, image_size) -> dict          vision.onnx, validated (None: a text-only family)
    export_video(model, out) -> dict | None                optional: video.onnx, validated (None: no video tower)
    export_decoder(model, out, max_context) -> dict        decoder.onnx (token ids in, the embedding inside), validated
    manifest_sections(source, options, tok) -> dict        the family's "architecture", "preprocess", "text"

The driver owns everything they share: the temporary directory and its atomic rename, the order of the
steps, the face models and the manifest's common sections.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

# family name -> module; imported on use, so `focalrt export` pays only for the family it exports.
FAMILIES: dict[str, str] = {
    "qwen2_5_vl": "focalrt.export.qwen2_5_vl",
    "face_llava": "focalrt.export.face_llava",
    "text": "focalrt.export.text",
}


@dataclass
class Source:
    """A model ready to export, and where it came from as the manifest's "source" section records it."""

    model: Any
    model_id: str | None  # the manifest's source.model; None: "preset:<preset>"
    preset: str | None
    seed: int
    random_weights: bool
    tokenizer: Any = None  # the checkpoint's transformers tokenizer, when the family exports it (text)
    path: Path | None = None  # the local checkpoint directory or file its tokenizer comes from


@dataclass
class Options:
    """Export options after the family checked them against the model."""

    max_context: int
    prompt: dict[str, Any]
    image_size: int | None = None  # None: no vision encoder


def family_module(name: str) -> ModuleType:
    """The module that exports `name`, from the table."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])
