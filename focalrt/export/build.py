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

log = logging.getLogger(__name__)

QWEN_PROMPT: dict[str, Any] = {
    "profile": "qwen2_5_vl_chat",
    "system": "You are a helpful assistant.",
    "template": ("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
                 "<|vision_start|>{image}<|vision_end|>{region}{instruction}<|im_end|>\n"
                 "<|im_start|>assistant\n"),
    "image_token": "<|image_pad|>",
    "region_mode": "text",
    "region_template": "Focus on the face region [{x1}, {y1}, {x2}, {y2}]. ",
    "default_instruction": ("Describe this face region: its facial action units, the emotion it shows "
                            "and cues to the person's age."),
    "stop_tokens": ["<|im_end|>", "<|endoftext|>"],
}
PROFILE_KEYS = ("system", "region_template", "default_instruction", "region_mode")
REGION_MODES = ("text", "draw", "crop")
# Wording when the region is shown in the image rather than given as coordinates.
MODE_REGION_TEMPLATES = {"draw": "Focus on the face region outlined in red. ", "crop": ""}


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


def export_qwen2_5_vl(out: str | Path, *, model_id: str | None = None, preset: str | None = None,
                      image_size: int | None = None, max_context: int | None = None,
                      profile: dict[str, Any] | None = None, face_models: bool = True,
                      overwrite: bool = False, seed: int = 0, face_heads: bool = True) -> Path:
    from focalrt.export import qwen2_5_vl as q
    from focalrt.export.tokenizer import write_tokenizer

    if (model_id is None) == (preset is None):
        raise ValueError("give exactly one of --model (checkpoint dir or hub id) or --preset")
    image_size = image_size or q.DEFAULT_IMAGE_SIZE
    t0 = time.perf_counter()
    model = q.build_random_model(preset, seed) if preset else q.load_model(model_id)
    cfg, tcfg, vcfg = model.config, model.config.text_config, model.config.vision_config
    q.grid_for(image_size, vcfg.patch_size, vcfg.spatial_merge_size)
    max_context = min(max_context or q.DEFAULT_MAX_CONTEXT, tcfg.max_position_embeddings)
    prompt = {**QWEN_PROMPT, **(profile or {})}

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        log.info("exporting vision encoder at %dx%d", image_size, image_size)
        vision = q.export_vision(model, tmp, image_size)
        log.info("exporting token embedding")
        embed = q.export_embed(model, tmp)
        log.info("exporting decoder (%d layers)", tcfg.num_hidden_layers)
        decoder = q.export_decoder(model, tmp, max_context)
        source_dir = Path(model_id) if model_id and Path(model_id).is_dir() else None
        tok = write_tokenizer(tmp, source_dir)
        if model_id and source_dir is None:
            tok = _hub_tokenizer(model_id, tmp)
        write_bundle_manifest(
            tmp, t0, family="qwen2_5_vl", model=model, model_id=model_id, preset=preset, seed=seed,
            architecture="Qwen2_5_VLForConditionalGeneration",
            components={"vision": vision, "embed": embed, "decoder": decoder}, tok=tok, prompt=prompt,
            preprocess={"image_size": image_size, "mean": q.IMAGE_MEAN, "std": q.IMAGE_STD,
                        "rescale": 1 / 255, "patch_size": vcfg.patch_size,
                        "merge_size": vcfg.spatial_merge_size,
                        "temporal_patch_size": vcfg.temporal_patch_size,
                        "image_tokens": (image_size // vcfg.patch_size // vcfg.spatial_merge_size) ** 2,
                        "color": "RGB"},
            text={"hidden_size": tcfg.hidden_size, "num_layers": tcfg.num_hidden_layers,
                  "num_heads": tcfg.num_attention_heads, "num_kv_heads": tcfg.num_key_value_heads,
                  "head_dim": tcfg.hidden_size // tcfg.num_attention_heads,
                  "vocab_size": tcfg.vocab_size, "max_context": max_context, "rope_type": "mrope",
                  "rope_theta": tcfg.rope_parameters["rope_theta"],
                  "mrope_section": list(tcfg.rope_parameters["mrope_section"]),
                  "image_token_id": cfg.image_token_id, "vision_start_token_id": cfg.vision_start_token_id},
            face_models=face_models, face_heads=face_heads)
    log.info("bundle written to %s in %.1f s", out, time.perf_counter() - t0)
    return Path(out)


def write_bundle_manifest(tmp: Path, t0: float, *, family: str, model, model_id: str | None, preset: str | None,
                          seed: int, architecture: str, components: dict[str, dict[str, Any]],
                          tok: dict[str, Any], prompt: dict[str, Any], preprocess: dict[str, Any],
                          text: dict[str, Any], face_models: bool, face_heads: bool = True,
                          random_weights: bool | None = None) -> None:
    """The manifest parts every family shares (source, fp32 component records, tokenizer, generation,
    provenance, face models and heads), around the family's own preprocess and text sections; written last.
    `random_weights` defaults to "a preset"; a preset of trained weights (smollm2-135m) passes False."""
    from focalrt.export.onnx_io import OPSET

    records = {name: {**file_record(tmp, f"{name}.onnx"), **info, "precision": "fp32"}
               for name, info in components.items()}
    records["decoder"].update(attention="GroupQueryAttention", kv_cache="shared_buffer", logits="last_n")
    manifest: dict[str, Any] = {
        "family": family,
        "source": {"model": model_id or f"preset:{preset}", "preset": preset, "seed": seed if preset else None,
                   "random_weights": bool(preset) if random_weights is None else random_weights,
                   "architecture": architecture,
                   "weights_fingerprint": _weights_fingerprint(model)},
        "components": records,
        "tokenizer": {**file_record(tmp, "tokenizer.json"), **{k: v for k, v in tok.items() if k != "file"}},
        "prompt": prompt,
        "preprocess": preprocess,
        "text": text,
        "generation": {"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "top_p": 1.0},
        "provenance": {**_versions(), "opset": OPSET, "created_unix": int(time.time()), "export_seconds": None},
    }
    if face_models:
        log.info("exporting face models (MediaPipe detector and landmarks)")
        manifest["face_models"] = _export_faces(tmp, face_heads)
    manifest["provenance"]["export_seconds"] = round(time.perf_counter() - t0, 1)
    write_manifest(tmp, manifest)


def _hub_tokenizer(model_id: str, out: Path) -> dict[str, Any]:
    """A hub checkpoint's own tokenizer, through transformers' cache (needs the hub)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_id)
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    from focalrt.export.tokenizer import QWEN2_SPECIAL_TOKENS

    return {"file": "tokenizer.json", "special_tokens": QWEN2_SPECIAL_TOKENS, "source": f"hub:{model_id}"}


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
    from focalrt.export.causal_lm import FAMILY, is_text_source

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
                  family: str | None = None, **kwargs: Any) -> Path:
    family = family or family_of(model_id, preset)
    log.info("loading %s", f"the {preset} preset (random weights)" if preset else model_id)
    if family == "qwen2_5_vl":
        return export_qwen2_5_vl(out, model_id=model_id, preset=preset, **kwargs)
    if family == "text":
        from focalrt.export.causal_lm import export_causal_lm

        return export_causal_lm(out, model_id=model_id, preset=preset, **kwargs)
    from focalrt.export.face_llava import export_face_llava

    return export_face_llava(out, model_id=model_id, preset=preset, **kwargs)
