"""`focalrt export`: one model (preset, local checkpoint or hub id) -> one validated bundle directory."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

from focalrt import __version__
from focalrt.bundle import atomic_output_dir, file_record, write_manifest
from focalrt.export.family import Options, Source, family_module

log = logging.getLogger(__name__)

PROFILE_KEYS = ("system", "region_template", "default_instruction", "region_mode")
REGION_MODES = ("text", "draw", "crop", "face_crop")
# Wording when the region is shown in the image rather than given as coordinates.
MODE_REGION_TEMPLATES = {"draw": "Focus on the face region outlined in red. ", "crop": "", "face_crop": ""}


def load_profile_overrides(path: str | None, **flags: str | None) -> dict[str, Any]:
    """Prompt wording set at export: a small JSON profile file, then individual flags on top."""
    overrides: dict[str, Any] = {}
    if path:
        try:
            overrides = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--profile {path}: cannot read it as JSON ({e})") from None
        unknown = set(overrides) - set(PROFILE_KEYS)
        if unknown:
            raise ValueError(f"--profile {path}: unknown keys {sorted(unknown)}; allowed: {list(PROFILE_KEYS)}")
    overrides.update({k: v for k, v in flags.items() if v is not None})
    mode = overrides.get("region_mode", "text")
    if mode not in REGION_MODES:
        raise ValueError(f"region_mode {mode!r} is not one of {list(REGION_MODES)}")
    if mode in MODE_REGION_TEMPLATES and "region_template" not in overrides:
        overrides["region_template"] = MODE_REGION_TEMPLATES[mode]
    if "region_template" in overrides:
        try:
            overrides["region_template"].format(x1=0, y1=0, x2=1, y2=1)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"region_template {overrides['region_template']!r} must use only "
                             f"{{x1}} {{y1}} {{x2}} {{y2}} ({e})") from None
    return overrides


def _versions() -> dict[str, str]:
    import onnx
    import torch
    import transformers

    return {"focalrt": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "python": platform.python_version()}


def _weights_fingerprint(model) -> str:
    """A cheap fingerprint of the exported weights: names, shapes and each tensor's first 4 KiB."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes()[:4096])
        h.update(str(tuple(tensor.shape)).encode())
    return h.hexdigest()


def write_bundle_manifest(tmp: Path, t0: float, *, family: str, source: Source, options: Options,
                          components: dict[str, dict[str, Any]], tok: dict[str, Any], sections: dict[str, Any],
                          face_models: bool, face_heads: bool = True) -> None:
    """The manifest parts every family shares (source, fp32 component records, tokenizer, generation,
    provenance, face models and heads), around the family's own preprocess and text sections; written last."""
    from focalrt.export.onnx_io import OPSET

    records = {name: {**file_record(tmp, f"{name}.onnx"), "precision": "fp32", **info}
               for name, info in components.items()}
    records["decoder"].update(attention="GroupQueryAttention", kv_cache="shared_buffer", logits="last_n")
    preset = source.preset
    manifest: dict[str, Any] = {
        "family": family,
        "source": {"model": source.model_id or f"preset:{preset}", "preset": preset,
                   "seed": source.seed if preset else None, "random_weights": source.random_weights,
                   "architecture": sections["architecture"],
                   "weights_fingerprint": _weights_fingerprint(source.model)},
        "components": records,
        "tokenizer": {**file_record(tmp, "tokenizer.json"), **{k: v for k, v in tok.items() if k != "file"}},
        "prompt": options.prompt,
        "preprocess": sections["preprocess"],
        "text": sections["text"],
        "generation": {"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "top_p": 1.0},
        "provenance": {**_versions(), "opset": OPSET, "created_unix": int(time.time()), "export_seconds": None},
    }
    if face_models:
        log.info("exporting face models (MediaPipe detector and landmarks)")
        manifest["face_models"] = _export_faces(tmp, face_heads)
    manifest["provenance"]["export_seconds"] = round(time.perf_counter() - t0, 1)
    write_manifest(tmp, manifest)


def _export_faces(tmp: Path, heads: bool = True) -> dict[str, Any]:
    """Detector and FaceMesh, plus the emotion and age heads (entries "emotion", "age") unless heads=False."""
    from focalrt.export.face_heads import export_face_heads
    from focalrt.export.face_models import export_face_models

    faces_dir = tmp / "faces"
    faces_dir.mkdir()
    entry = export_face_models(faces_dir)
    if heads:
        entry.update(export_face_heads(faces_dir))
    for value in entry.values():
        if isinstance(value, dict) and "file" in value:
            value.update(file_record(tmp, f"faces/{value['file']}"))
    return entry


def family_of(model_id: str | None, preset: str | None) -> str:
    """The family from a preset name, a .gguf file or a checkpoint's config.json."""
    from focalrt.export.text import FAMILY, is_text_source

    if is_text_source(model_id, preset):
        return FAMILY
    if preset:
        return "face_llava" if "face-llava" in preset else "qwen2_5_vl"
    cfg = Path(model_id) / "config.json" if model_id else None
    if cfg and cfg.is_file():
        text = cfg.read_text()
        if "qwen2_5_vl" in text or "Qwen2_5_VL" in text:
            return "qwen2_5_vl"
        if "llava" in text.lower():
            return "face_llava"
        raise ValueError(f"{cfg}: neither a Qwen2.5-VL, a LLaVA nor a Llama/Qwen2 causal LM checkpoint; "
                         f"pass --family if it is one")
    return "qwen2_5_vl"


def export_bundle(out: str | Path, *, model_id: str | None = None, preset: str | None = None,
                  family: str | None = None, source: Source | None = None, image_size: int | None = None,
                  max_context: int | None = None, profile: dict[str, Any] | None = None, face_models: bool = True,
                  face_heads: bool = True, overwrite: bool = False, seed: int = 0,
                  keep_quantization: bool = False) -> Path:
    """The one export driver: a model (preset, checkpoint, hub id or an already loaded `source`) -> one
    validated bundle directory, through the family's functions (see `focalrt.export.family`).

    Everything is written into a temporary sibling directory that is renamed into place only when the
    manifest is written, so an error, Ctrl-C or SIGTERM leaves no half bundle.

    `keep_quantization`: a GGUF source's Q4_0/Q4_1/Q8_0 weights stay on their own grid (MatMulNBits)
    instead of fp32: a pass over the exported decoder (`text.keep_quantization`), validated there.
    """
    if source is not None and family is None:
        raise ValueError("export_bundle(source=...) needs the family the source belongs to")
    family = family or family_of(model_id, preset)
    fam = family_module(family)
    t0 = time.perf_counter()
    if keep_quantization:
        if getattr(fam, "keep_quantization", None) is None:
            raise ValueError(f"--keep-quantization applies to GGUF text models; the {family} family has no "
                             f"quantized source to keep")
        if source is None:
            fam.check_keep_quantization(model_id, preset)  # before minutes of loading and tracing
        elif source.path is None or source.path.suffix.lower() != ".gguf":
            raise ValueError("--keep-quantization needs a source loaded from a .gguf file")
    if source is None:
        log.info("loading %s", f"the {preset} preset" if preset else model_id)
        source = fam.load_source(model_id, preset, seed)
    options = fam.export_options(source, image_size=image_size, max_context=max_context, profile=profile)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        tok = fam.write_bundle_tokenizer(source, tmp)  # first: Face-LLaVA's image token id comes from it
        sections = fam.manifest_sections(source, options, tok)
        components = {}
        if fam.export_vision is not None:
            components["vision"] = fam.export_vision(source.model, tmp, options.image_size)
        video = getattr(fam, "export_video", None)  # optional: families with a video tower
        if video is not None and (record := video(source.model, tmp)) is not None:
            components["video"] = record
        log.info("exporting decoder (%d layers)", sections["text"]["num_layers"])
        components["decoder"] = fam.export_decoder(source.model, tmp, options.max_context)
        if keep_quantization:
            components["decoder"] = fam.keep_quantization(source, tmp, components["decoder"])
        write_bundle_manifest(tmp, t0, family=family, source=source, options=options, components=components,
                              tok=tok, sections=sections, face_heads=face_heads,
                              face_models=face_models and fam.export_vision is not None)  # image bundles only
    log.info("bundle written to %s in %.1f s", out, time.perf_counter() - t0)
    return Path(out)
