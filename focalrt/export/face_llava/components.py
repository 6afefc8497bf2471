"""Face-LLaVA export wrappers: vision (CLIP tower + projector + landmark pathway), video (LanguageBind video
tower + the same projector and pathway, per frame), token embedding and decoder, each exported to ONNX and
checked against the PyTorch reference right after export."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from focalrt.export.face_llava.landmarks import CROP_SIZE, NUM_LANDMARKS, REGION_PROJECTOR, REGIONS
from focalrt.export.face_llava.model import FaceLlava
from focalrt.export.gqa import KVCachedDecoder, export_kv_decoder, validate_kv_decoder
from focalrt.export.onnx_io import compare, cpu_session, describe_io, export_module

log = logging.getLogger(__name__)

def project(projector: nn.Module, pathway: nn.Module | None, hidden: torch.Tensor, landmarks: torch.Tensor | None,
            use_landmarks: torch.Tensor | None) -> torch.Tensor:
    """Tower features [N, tokens, vision] -> [N, tokens, hidden]: the mm projector, then, for a model with the
    landmark pathway, both branches computed and `use_landmarks` choosing one (so `false` is exactly the
    reference's no-landmark path)."""
    features = projector(hidden)
    if pathway is None:
        return features
    return torch.where(use_landmarks.view(1, 1, 1), pathway(features, landmarks), features)


class VisionEncoder(nn.Module):
    """pixel_values [1, 3, S, S] (+ landmarks [1, 68, 2] in 0..1 and use_landmarks [1] bool)
    -> image_embeds [image_tokens, hidden].

    Runs only the tower layers up to the selected one (the last layer's output is never used), and computes
    both branches so that `use_landmarks=false` gives exactly the no-landmark path of the reference.
    """

    def __init__(self, model: FaceLlava):
        super().__init__()
        cfg = model.config
        tower = model.llava.model.vision_tower
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer {layer!r}: only a single layer is supported")
        count = len(tower.encoder.layers)
        keep = count + 1 + layer if layer < 0 else layer
        self.embeddings = tower.embeddings
        self.pre_layrnorm = tower.pre_layrnorm
        self.layers = nn.ModuleList(list(tower.encoder.layers)[:keep])
        self.drop_cls = cfg.vision_feature_select_strategy == "default"
        self.projector = model.llava.model.multi_modal_projector
        self.landmarks = model.landmarks

    def forward(self, pixel_values: torch.Tensor, landmarks: torch.Tensor | None = None,
                use_landmarks: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.layers:
            hidden = layer(hidden, None)
        if self.drop_cls:
            hidden = hidden[:, 1:]
        return project(self.projector, self.landmarks, hidden, landmarks, use_landmarks)[0]


class VideoEncoder(nn.Module):
    """pixel_values [F, 3, S, S] (one clip; + landmarks [F, 68, 2] in 0..1 and use_landmarks [1] bool)
    -> video_embeds [F * tokens_per_frame, hidden], frame-major, class token first in each frame.

    As VisionEncoder: only the tower layers up to the selected one, and both landmark branches computed so
    that `use_landmarks=false` gives exactly the reference's no-landmark path.
    """

    def __init__(self, model: FaceLlava):
        super().__init__()
        tower = model.video_tower
        self.embeddings = tower.embeddings
        self.pre_layrnorm = tower.pre_layrnorm
        self.layers = nn.ModuleList(list(tower.encoder.layers)[:tower.layers_used])
        self.projector = model.llava.model.multi_modal_projector
        self.landmarks = model.landmarks

    def forward(self, pixel_values: torch.Tensor, landmarks: torch.Tensor | None = None,
                use_landmarks: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.layers:
            hidden = layer(hidden)
        features = project(self.projector, self.landmarks, hidden, landmarks, use_landmarks)
        return features.reshape(-1, features.shape[-1])


def image_token_count(model: FaceLlava) -> int:
    v = model.config.vision_config
    return (v.image_size // v.patch_size) ** 2 + (0 if model.config.vision_feature_select_strategy == "default" else 1)


def export_vision(model: FaceLlava, out: Path, image_size: int | None = None) -> dict[str, Any]:
    """vision.onnx at the tower's fixed size (`image_size`, if given, must be it), checked with and without
    landmarks."""
    size = model.config.vision_config.image_size
    if image_size not in (None, size):
        raise ValueError(f"the CLIP tower takes {size} px images, not {image_size}")
    log.info("exporting vision encoder (CLIP tower, projector%s)",
             ", landmark pathway" if model.landmarks is not None else "")
    module = VisionEncoder(model).eval()
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(1, 3, size, size, generator=gen)
    path = out / "vision.onnx"
    if model.landmarks is None:
        export_module(module, (pixels,), path, ["pixel_values"], ["image_embeds"], {})
        with torch.no_grad():
            ref = model.image_features(pixels)[0].numpy()
        got = cpu_session(path).run(None, {"pixel_values": pixels.numpy()})[0]
        err = compare("vision encoder", got, ref, atol=1e-4)
        return {"validation_max_abs_diff": err, "landmarks": None, **describe_io(path)}

    landmarks = torch.rand(1, NUM_LANDMARKS, 2, generator=gen)
    export_module(module, (pixels, landmarks, torch.tensor([True])), path,
                  ["pixel_values", "landmarks", "use_landmarks"], ["image_embeds"], {})
    sess = cpu_session(path)
    worst = 0.0
    for use in (True, False):
        with torch.no_grad():
            ref = model.image_features(pixels, landmarks if use else None)[0].numpy()
        got = sess.run(None, {"pixel_values": pixels.numpy(), "landmarks": landmarks.numpy(),
                              "use_landmarks": np.array([use])})[0]
        worst = max(worst, compare(f"vision encoder ({'with' if use else 'without'} landmarks)", got, ref,
                                   atol=1e-4))
    log.info("vision.onnx matches PyTorch with and without landmarks (max abs diff %.2e)", worst)
    return {"validation_max_abs_diff": worst, "landmarks": _landmark_facts(model), **describe_io(path)}


def _landmark_facts(model: FaceLlava) -> dict[str, Any]:
    """What the runtime needs to know about the landmark inputs of vision.onnx and video.onnx."""
    return {"input": "landmarks", "flag": "use_landmarks", "points": NUM_LANDMARKS,
            "order": "iBUG 68", "normalised_by": "image width and height (0..1)",
            "reference_crop_size": CROP_SIZE, "projector": model.landmarks.projector,
            "regions": {n: [a, b] for n, a, b in REGIONS} if model.landmarks.projector == REGION_PROJECTOR else None,
            "branch_scale": model.landmarks.cross_attn.branch_scale,
            "cross_attention_heads": model.landmarks.cross_attn.num_heads}


def export_video(model: FaceLlava, out: Path) -> dict[str, Any] | None:
    """video.onnx for a model with a video tower (None without one): one clip of the tower's fixed frame count,
    checked against `FaceLlava.video_features` with and without landmarks."""
    tower = model.video_tower
    if tower is None:
        return None
    frames, size, per_frame = tower.num_frames, tower.config.image_size, tower.tokens_per_frame
    log.info("exporting video encoder (LanguageBind video tower at %d frames, projector%s)", frames,
             ", landmark pathway" if model.landmarks is not None else "")
    module = VideoEncoder(model).eval()
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randn(frames, 3, size, size, generator=gen)
    path = out / "video.onnx"
    facts = {"frames": frames, "tokens_per_frame": per_frame}
    if model.landmarks is None:
        export_module(module, (pixels,), path, ["pixel_values"], ["video_embeds"], {})
        with torch.no_grad():
            ref = model.video_features(pixels).reshape(frames * per_frame, -1).numpy()
        got = cpu_session(path).run(None, {"pixel_values": pixels.numpy()})[0]
        err = compare("video encoder", got, ref, atol=1e-4)
        return {"validation_max_abs_diff": err, **facts, "landmarks": None, **describe_io(path)}

    landmarks = torch.rand(frames, NUM_LANDMARKS, 2, generator=gen)
    export_module(module, (pixels, landmarks, torch.tensor([True])), path,
                  ["pixel_values", "landmarks", "use_landmarks"], ["video_embeds"], {})
    sess = cpu_session(path)
    worst = 0.0
    for use in (True, False):
        with torch.no_grad():
            ref = model.video_features(pixels, landmarks if use else None).reshape(frames * per_frame, -1).numpy()
        got = sess.run(None, {"pixel_values": pixels.numpy(), "landmarks": landmarks.numpy(),
                              "use_landmarks": np.array([use])})[0]
        worst = max(worst, compare(f"video encoder ({'with' if use else 'without'} landmarks)", got, ref,
                                   atol=1e-4))
    log.info("video.onnx matches PyTorch with and without landmarks (max abs diff %.2e)", worst)
    return {"validation_max_abs_diff": worst, **facts, "landmarks": _landmark_facts(model), **describe_io(path)}


def export_decoder(model: FaceLlava, out: Path, max_context: int) -> dict[str, Any]:
    lm = model.llava.model.language_model
    module = KVCachedDecoder(lm, model.llava.lm_head, max_context, model.config.image_token_id).eval()
    path = out / "decoder.onnx"
    graph = export_kv_decoder(module, path)
    err = validate_kv_decoder(module, lm, model.llava.lm_head, path)
    log.info("decoder.onnx matches PyTorch over prefill + 3 cached steps (max abs diff %.2e)", err)
    return {"validation_max_abs_diff": err, **graph, **describe_io(path)}
