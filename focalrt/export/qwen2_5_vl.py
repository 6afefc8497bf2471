"""Qwen2.5-VL (Focal-RegionFace) export: vision encoder and KV-cached decoder (which embeds the tokens).

Each component is a small wrapper module that declares its ONNX inputs, outputs and dynamic axes in
one place (the Optimum habit) and is checked against the transformers model right after export.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from focalrt.export.family import Options, Source
from focalrt.export.gqa import KVCachedDecoder, export_kv_decoder, validate_kv_decoder
from focalrt.export.onnx_io import compare, cpu_session, describe_io, export_module

log = logging.getLogger(__name__)

FAMILY = "qwen2_5_vl"

IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
DEFAULT_IMAGE_SIZE = 336
DEFAULT_MAX_CONTEXT = 4096
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

# Random-weight models of the real architecture. `tiny-random` is the demo and test default;
# `tiny-random-b` is a second, differently shaped config for parity tests; `small` has the decoder
# dimensions of Qwen2.5-0.5B (the benchmark model) with a reduced vision tower.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-random": {
        "vision": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, fullatt_block_indexes=[1]),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, mrope_section=[4, 2, 2], tie_word_embeddings=True),
        "initializer_range": 0.2,
    },
    "tiny-random-b": {
        "vision": dict(depth=4, hidden_size=48, intermediate_size=96, num_heads=3, fullatt_block_indexes=[1, 3]),
        "text": dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                     num_key_value_heads=3, mrope_section=[2, 3, 3], tie_word_embeddings=False),
        "initializer_range": 0.2,
    },
    "small": {
        "vision": dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, fullatt_block_indexes=[1, 3]),
        "text": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, mrope_section=[8, 12, 12], tie_word_embeddings=True),
        "initializer_range": 0.02,
    },
}


def preset_config(name: str):
    from transformers import Qwen2_5_VLConfig

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    text = dict(p["text"])
    mrope = text.pop("mrope_section")
    tie = text.pop("tie_word_embeddings")
    return Qwen2_5_VLConfig(
        vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           out_hidden_size=text["hidden_size"], initializer_range=p["initializer_range"],
                           **p["vision"]),
        text_config=dict(vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": mrope},
                         initializer_range=p["initializer_range"], tie_word_embeddings=tie, **text),
        tie_word_embeddings=tie,
    )


def build_random_model(name: str, seed: int = 0):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(preset_config(name))
    return model.float().eval()


def load_model(model_id: str):
    """A local checkpoint directory or a hub id, in fp32 on the CPU (export precision)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_id, dtype=torch.float32)
    return model.eval()


def grid_for(image_size: int, patch: int = 14, merge: int = 2) -> tuple[int, int, int]:
    if image_size % (patch * merge):
        raise ValueError(f"--image-size {image_size} must be a multiple of {patch * merge} "
                         f"(patch {patch} x merge {merge}); try {round(image_size / 28) * 28}")
    return 1, image_size // patch, image_size // patch


class VisionEncoder(nn.Module):
    """pixel patches [N, C*T*P*P] at a fixed grid -> merged image embeddings [N/merge^2, hidden]."""

    def __init__(self, visual: nn.Module, grid: tuple[int, int, int]):
        super().__init__()
        self.visual = visual
        self.register_buffer("grid_thw", torch.tensor([grid], dtype=torch.long), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values, grid_thw=self.grid_thw).pooler_output


def _sample_pixels(n_patches: int, dim: int, seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n_patches, dim)).astype(np.float32))


def export_vision(model, out: Path, image_size: int) -> dict[str, Any]:
    vcfg = model.config.vision_config
    grid = grid_for(image_size, vcfg.patch_size, vcfg.spatial_merge_size)
    n_patches = grid[0] * grid[1] * grid[2]
    dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2
    module = VisionEncoder(model.model.visual, grid).eval()
    pixels = _sample_pixels(n_patches, dim)
    path = out / "vision.onnx"
    log.info("exporting vision encoder at %dx%d", image_size, image_size)
    export_module(module, (pixels,), path, ["pixel_values"], ["image_embeds"], {})
    with torch.no_grad():
        ref = module(pixels).numpy()
    got = cpu_session(path).run(None, {"pixel_values": pixels.numpy()})[0]
    err = compare("vision encoder", got, ref, atol=1e-4)
    log.info("vision.onnx matches PyTorch (max abs diff %.2e)", err)
    return {"validation_max_abs_diff": err, "grid_thw": list(grid), **describe_io(path)}


def export_decoder(model, out: Path, max_context: int) -> dict[str, Any]:
    lm = model.model.language_model
    module = KVCachedDecoder(lm, model.lm_head, max_context, model.config.image_token_id).eval()
    path = out / "decoder.onnx"
    graph = export_kv_decoder(module, path)
    err = validate_kv_decoder(module, lm, model.lm_head, path)
    log.info("decoder.onnx matches PyTorch over prefill + 3 cached steps (max abs diff %.2e)", err)
    return {"validation_max_abs_diff": err, **graph, **describe_io(path)}


# ---------------------------------------------------------------------------------------------------------
# The family interface (see focalrt.export.family), called by build.export_bundle.

def load_source(model_id: str | None, preset: str | None, seed: int) -> Source:
    """A preset's random-weight model or a checkpoint (local directory or hub id)."""
    if (model_id is None) == (preset is None):
        raise ValueError("give exactly one of --model (checkpoint dir or hub id) or --preset")
    model = build_random_model(preset, seed) if preset else load_model(model_id)
    return Source(model, model_id, preset, seed, random_weights=bool(preset),
                  path=Path(model_id) if model_id and Path(model_id).is_dir() else None)


def export_options(source: Source, *, image_size: int | None, max_context: int | None,
                   profile: dict[str, Any] | None) -> Options:
    """Any image size on the patch x merge grid; the context up to the model's position limit."""
    image_size = image_size or DEFAULT_IMAGE_SIZE
    vcfg, tcfg = source.model.config.vision_config, source.model.config.text_config
    grid_for(image_size, vcfg.patch_size, vcfg.spatial_merge_size)
    return Options(max_context=min(max_context or DEFAULT_MAX_CONTEXT, tcfg.max_position_embeddings),
                   prompt={**QWEN_PROMPT, **(profile or {})}, image_size=image_size)


def write_bundle_tokenizer(source: Source, out: Path) -> dict[str, Any]:
    """The checkpoint's tokenizer, a hub checkpoint's through transformers, or the preset's Qwen2 BPE."""
    from focalrt.export.tokenizer import write_tokenizer

    if source.model_id and source.path is None:
        return _hub_tokenizer(source.model_id, out)
    return write_tokenizer(out, source.path)


def _hub_tokenizer(model_id: str, out: Path) -> dict[str, Any]:
    """A hub checkpoint's own tokenizer, through transformers' cache (needs the hub)."""
    from transformers import AutoTokenizer

    from focalrt.export.tokenizer import QWEN2_SPECIAL_TOKENS

    tok = AutoTokenizer.from_pretrained(model_id)
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    return {"file": "tokenizer.json", "special_tokens": QWEN2_SPECIAL_TOKENS, "source": f"hub:{model_id}"}


def manifest_sections(source: Source, options: Options, tok: dict[str, Any]) -> dict[str, Any]:
    cfg = source.model.config
    tcfg, vcfg, size = cfg.text_config, cfg.vision_config, options.image_size
    return {
        "architecture": "Qwen2_5_VLForConditionalGeneration",
        "preprocess": {"image_size": size, "mean": IMAGE_MEAN, "std": IMAGE_STD,
                       "rescale": 1 / 255, "patch_size": vcfg.patch_size,
                       "merge_size": vcfg.spatial_merge_size,
                       "temporal_patch_size": vcfg.temporal_patch_size,
                       "image_tokens": (size // vcfg.patch_size // vcfg.spatial_merge_size) ** 2,
                       "color": "RGB"},
        "text": {"hidden_size": tcfg.hidden_size, "num_layers": tcfg.num_hidden_layers,
                 "num_heads": tcfg.num_attention_heads, "num_kv_heads": tcfg.num_key_value_heads,
                 "head_dim": tcfg.hidden_size // tcfg.num_attention_heads,
                 "vocab_size": tcfg.vocab_size, "max_context": options.max_context, "rope_type": "mrope",
                 "rope_theta": tcfg.rope_parameters["rope_theta"],
                 "mrope_section": list(tcfg.rope_parameters["mrope_section"]),
                 "image_token_id": cfg.image_token_id, "vision_start_token_id": cfg.vision_start_token_id},
    }
