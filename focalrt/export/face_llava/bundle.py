"""The Face-LLaVA bundle: model -> tokenizer, vision, embed, decoder -> manifest."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from focalrt.export.face_llava.checkpoint import load_face_llava_checkpoint
from focalrt.export.face_llava.components import export_decoder, export_embed, export_vision, image_token_count
from focalrt.export.face_llava.model import (
    DEFAULT_MAX_CONTEXT,
    FACE_LLAVA_PROMPT,
    IMAGE_MEAN,
    IMAGE_STD,
    IMAGE_TOKEN,
    build_random_model,
)
from focalrt.export.face_llava.tokenizer import write_face_llava_tokenizer

log = logging.getLogger(__name__)

def export_face_llava(out: str | Path, *, model_id: str | None = None, preset: str | None = None,
                      image_size: int | None = None, max_context: int | None = None,
                      profile: dict[str, Any] | None = None, face_models: bool = True,
                      overwrite: bool = False, seed: int = 0, face_heads: bool = True) -> Path:
    """A validated Face-LLaVA bundle from a preset or a local checkpoint directory."""
    from focalrt.bundle import atomic_output_dir
    from focalrt.export.build import write_bundle_manifest

    if (model_id is None) == (preset is None):
        raise ValueError("give exactly one of --model (Face-LLaVA checkpoint directory) or --preset")
    source_dir = Path(model_id) if model_id else None
    if source_dir is not None and not source_dir.is_dir():
        raise ValueError(f"--model {model_id}: Face-LLaVA checkpoints are read from a local directory "
                         f"(config.json, weights, tokenizer); download it first")
    t0 = time.perf_counter()
    model = build_random_model(preset, seed) if preset else load_face_llava_checkpoint(source_dir)
    cfg, tcfg, vcfg = model.config, model.config.text_config, model.config.vision_config
    if image_size is not None and image_size != vcfg.image_size:
        raise ValueError(f"--image-size {image_size}: the CLIP tower's position embeddings fix the input at "
                         f"{vcfg.image_size} px; leave --image-size out")
    max_context = min(max_context or DEFAULT_MAX_CONTEXT, tcfg.max_position_embeddings)
    prompt = {**FACE_LLAVA_PROMPT, **(profile or {})}

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        tok = write_face_llava_tokenizer(tmp, source_dir)
        image_token_id = tok["special_tokens"][IMAGE_TOKEN]
        cfg.image_token_id = image_token_id
        log.info("exporting vision encoder (CLIP tower, projector%s)",
                 ", landmark pathway" if model.landmarks is not None else "")
        vision = export_vision(model, tmp)
        log.info("exporting token embedding")
        embed = export_embed(model, tmp)
        log.info("exporting decoder (%d layers)", tcfg.num_hidden_layers)
        decoder = export_decoder(model, tmp, max_context)
        head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
        write_bundle_manifest(
            tmp, t0, family="face_llava", model=model, model_id=model_id, preset=preset, seed=seed,
            architecture="LlavaForConditionalGeneration + Face-LLaVA landmark pathway"
            if model.landmarks is not None else "LlavaForConditionalGeneration",
            components={"vision": vision, "embed": embed, "decoder": decoder}, tok=tok, prompt=prompt,
            # LanguageBind's image transform: bicubic resize of the shorter side, centre crop, CLIP mean/std.
            preprocess={"image_size": vcfg.image_size, "resize_shortest_edge": vcfg.image_size,
                        "center_crop": True, "interpolation": "bicubic", "mean": IMAGE_MEAN,
                        "std": IMAGE_STD, "rescale": 1 / 255, "patch_size": vcfg.patch_size,
                        "image_tokens": image_token_count(model), "color": "RGB", "layout": "NCHW"},
            text={"hidden_size": tcfg.hidden_size, "num_layers": tcfg.num_hidden_layers,
                  "num_heads": tcfg.num_attention_heads, "num_kv_heads": tcfg.num_key_value_heads,
                  "head_dim": head_dim, "vocab_size": tcfg.vocab_size, "max_context": max_context,
                  "rope_type": "rope", "rope_theta": tcfg.rope_parameters["rope_theta"],
                  "image_token_id": image_token_id},
            face_models=face_models, face_heads=face_heads)
    log.info("bundle written to %s in %.1f s", out, time.perf_counter() - t0)
    return Path(out)
