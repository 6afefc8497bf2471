"""The Face-LLaVA bundle: the family interface (see focalrt.export.family) that build.export_bundle calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from focalrt.export.face_llava.checkpoint import load_face_llava_checkpoint
from focalrt.export.face_llava.components import image_token_count
from focalrt.export.face_llava.model import (
    BOS_TOKEN,
    DEFAULT_MAX_CONTEXT,
    EOS_TOKEN,
    FACE_LLAVA_PROMPT,
    IMAGE_MEAN,
    IMAGE_STD,
    IMAGE_TOKEN,
    build_random_model,
)
from focalrt.export.face_llava.tokenizer import checkpoint_bos_eos, write_face_llava_tokenizer
from focalrt.export.family import Options, Source

FAMILY = "face_llava"


def load_source(model_id: str | None, preset: str | None, seed: int) -> Source:
    """A preset's random-weight model or a local Face-LLaVA checkpoint directory."""
    if (model_id is None) == (preset is None):
        raise ValueError("give exactly one of --model (Face-LLaVA checkpoint directory) or --preset")
    source_dir = Path(model_id) if model_id else None
    if source_dir is not None and not source_dir.is_dir():
        raise ValueError(f"--model {model_id}: Face-LLaVA checkpoints are read from a local directory "
                         f"(config.json, weights, tokenizer); download it first")
    model = build_random_model(preset, seed) if preset else load_face_llava_checkpoint(source_dir)
    return Source(model, model_id, preset, seed, random_weights=bool(preset), path=source_dir)


def export_options(source: Source, *, image_size: int | None, max_context: int | None,
                   profile: dict[str, Any] | None) -> Options:
    """The image size is the CLIP tower's; the context up to the model's position limit."""
    vcfg, tcfg = source.model.config.vision_config, source.model.config.text_config
    if image_size is not None and image_size != vcfg.image_size:
        raise ValueError(f"--image-size {image_size}: the CLIP tower's position embeddings fix the input at "
                         f"{vcfg.image_size} px; leave --image-size out")
    prompt = {**FACE_LLAVA_PROMPT, **(profile or {})}
    if source.path is not None:  # a checkpoint: its tokenizer's own BOS (if its calls add one) and EOS
        bos, eos = checkpoint_bos_eos(source.path)
        prompt["template"] = (bos or "") + FACE_LLAVA_PROMPT["template"].removeprefix(BOS_TOKEN)
        prompt["stop_tokens"] = [eos]
    return Options(max_context=min(max_context or DEFAULT_MAX_CONTEXT, tcfg.max_position_embeddings),
                   prompt=prompt, image_size=vcfg.image_size)


def write_bundle_tokenizer(source: Source, out: Path) -> dict[str, Any]:
    """The tokenizer, and the model's image token id set to the tokenizer's <image> (the vision and embed
    exports that follow place image embeddings at it)."""
    required = checkpoint_bos_eos(source.path) if source.path is not None else (BOS_TOKEN, EOS_TOKEN)
    tok = write_face_llava_tokenizer(out, source.path, tuple(t for t in required if t))
    source.model.config.image_token_id = tok["special_tokens"][IMAGE_TOKEN]
    return tok


def manifest_sections(source: Source, options: Options, tok: dict[str, Any]) -> dict[str, Any]:
    model = source.model
    tcfg, vcfg = model.config.text_config, model.config.vision_config
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
    # The authors' LanguageBind transform: ToTensor, float bicubic resize of the shorter side with
    # torchvision's tensor antialias, centre crop, CLIP mean/std (focalrt.runtime.models.face_llava.clip_pixels).
    preprocess = {"image_size": vcfg.image_size, "resize_shortest_edge": vcfg.image_size,
                  "center_crop": True, "interpolation": "bicubic", "antialias": True, "mean": IMAGE_MEAN,
                  "std": IMAGE_STD, "rescale": 1 / 255, "patch_size": vcfg.patch_size,
                  "image_tokens": image_token_count(model), "color": "RGB", "layout": "NCHW"}
    if model.video_tower is not None:
        preprocess["video"] = video_preprocess(model)
    return {
        "architecture": "LlavaForConditionalGeneration + Face-LLaVA landmark pathway"
        if model.landmarks is not None else "LlavaForConditionalGeneration",
        "preprocess": preprocess,
        "text": {"hidden_size": tcfg.hidden_size, "num_layers": tcfg.num_hidden_layers,
                 "num_heads": tcfg.num_attention_heads, "num_kv_heads": tcfg.num_key_value_heads,
                 "head_dim": head_dim, "vocab_size": tcfg.vocab_size, "max_context": options.max_context,
                 "rope_type": "rope", "rope_theta": tcfg.rope_parameters["rope_theta"],
                 "image_token_id": model.config.image_token_id},
    }


def video_preprocess(model) -> dict[str, Any]:
    """The authors' LanguageBind video transform, frame by frame: x / 255, normalise with the CLIP mean/std,
    then (on the normalised float frames) resize the shorter side bilinearly without antialias
    (pytorchvideo's ShortSideScale: F.interpolate, align_corners=False), centre crop. Their prompt joins the
    clip's `<image>` placeholders, one a frame, with a space; each frame gives `tokens_per_frame` embeddings,
    class token first."""
    tower = model.video_tower
    size = tower.config.image_size
    return {"frames": tower.num_frames, "tokens_per_frame": tower.tokens_per_frame, "image_size": size,
            "resize_shortest_edge": size, "interpolation": "bilinear", "antialias": False,
            "normalize_before_resize": True, "center_crop": True, "mean": IMAGE_MEAN, "std": IMAGE_STD,
            "rescale": 1 / 255, "frame_separator": " ", "color": "RGB", "layout": "NCHW"}
