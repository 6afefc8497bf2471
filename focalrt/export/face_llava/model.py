"""Face-LLaVA model configs, presets, the prompt profile and the eager PyTorch reference (`FaceLlava`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from focalrt.export.face_llava.landmarks import (
    CROSS_ATTENTION_HEADS,
    REGION_PROJECTOR,
    FaceLandmarkPathway,
)
from focalrt.export.face_llava.video_tower import LanguageBindVideoTower, random_video_tower
from focalrt.runtime.models.face_llava import FACE_LLAVA_TASKS

IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP, as LanguageBind's image transform uses
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
DEFAULT_MAX_CONTEXT = 4096  # Vicuna-7B v1.5
IMAGE_TOKEN = "<image>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"

# llava_v1 conversation: system, "USER: <image>\n{question}", then "ASSISTANT:"; turns end with </s>.
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
# Their image inference: conv_templates["llava_v1"] with "<image>\n" + question, nothing else: no region is
# ever worded (the model was not trained on region text). By default the encoder sees the image it is given
# (`run` gives it each tracked face's crop); export with `--region-mode face_crop` to show a box the way their
# crop tool shows a face (a square from the box's corner, side (w + h) / 2, resized to 256).
FACE_LLAVA_PROMPT: dict[str, Any] = {
    "profile": "llava_v1",
    "system": LLAVA_V1_SYSTEM,
    "template": BOS_TOKEN + "{system} USER: {image}\n{region}{instruction} ASSISTANT:",
    "image_token": IMAGE_TOKEN,
    "region_mode": "text",
    "region_template": "",
    "default_instruction": FACE_LLAVA_TASKS["facial_attributes"],
    "tasks": dict(FACE_LLAVA_TASKS),
    "stop_tokens": [EOS_TOKEN],
}

# The preset tokenizer: Qwen2's BPE (built offline from qwen.tiktoken) with <s>, </s> and <image> marked
# special. <s> and </s> already are Qwen2 BPE tokens; <image> is appended after Qwen2's 22 added tokens.
PRESET_VOCAB_SIZE = 151666
PRESET_IMAGE_TOKEN_ID = 151665

# Random-weight models of the real architecture at 224 px / patch 14 (256 image tokens). branch_scale is
# the repository's default, 0.1, as for real checkpoints whose config does not name another.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-random-face-llava": {
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2),
        "tie_word_embeddings": False,
        "initializer_range": 0.2,
        "branch_scale": 0.1,
    },
    # Decoder dimensions of a 0.5B model, for latency benchmarks; reduced vision tower.
    "small-random-face-llava": {
        "vision": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
        "text": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2),
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "branch_scale": 0.1,
    },
}
# The same models plus a LanguageBind video tower with the image tower's dimensions, at 8 frames (their
# recommended input for emotion). The video tower's weights come from their own generator, so every other
# weight equals the image-only preset's.
VIDEO_FRAMES = 8
PRESETS.update({f"{name}-video": {**preset, "video": dict(num_frames=VIDEO_FRAMES)}
                for name, preset in list(PRESETS.items())})

VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "hidden_act", "layer_norm_eps", "num_channels")
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
              "rope_theta", "rope_scaling", "attention_bias", "mlp_bias", "tie_word_embeddings",
              "bos_token_id", "eos_token_id", "pad_token_id")


class FaceLlava(nn.Module):
    """The eager PyTorch reference: transformers' Llava plus the landmark pathway (None: no landmarks) and
    the LanguageBind video tower (None: images only)."""

    def __init__(self, llava: nn.Module, landmarks: FaceLandmarkPathway | None,
                 video_tower: LanguageBindVideoTower | None = None):
        super().__init__()
        self.llava = llava
        self.landmarks = landmarks
        self.video_tower = video_tower

    @property
    def config(self):
        return self.llava.config

    def image_features(self, pixel_values: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 3, S, S] pixels (+ [B, 68, 2] normalised landmarks) -> [B, image_tokens, hidden].

        Without landmarks the pathway is skipped, as the Face-LLaVA code does when none are given.
        """
        out = self.llava.model.get_image_features(pixel_values=pixel_values)
        features = torch.stack(list(out.pooler_output))
        if landmarks is not None and self.landmarks is not None:
            features = self.landmarks(features, landmarks)
        return features

    def video_features(self, pixel_values: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """One clip's frames [T, 3, S, S] (+ [T, 68, 2] normalised landmarks) -> [T, 1 + patches, hidden].

        Face-LLaVA's encode_videos: the video tower's features with the class token kept, the projector the
        image path uses, then the landmark pathway for each frame with that frame's landmarks.
        """
        if self.video_tower is None:
            raise ValueError("this model has no video tower")
        features = self.llava.model.multi_modal_projector(self.video_tower(pixel_values))
        if landmarks is not None and self.landmarks is not None:
            features = self.landmarks(features, landmarks)
        return features

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image features at the image-token positions, in order."""
        is_image = input_ids == self.config.image_token_id
        embeds = self.llava.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_features.to(embeds.dtype))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, landmarks: torch.Tensor | None = None,
                 max_new_tokens: int = 32) -> tuple[list[int], list[np.ndarray]]:
        """Greedy tokens and per-step logits through transformers' generate(), never stopping early."""
        return self.generate_with_features(input_ids, self.image_features(pixel_values, landmarks), max_new_tokens)

    @torch.no_grad()
    def generate_with_features(self, input_ids: torch.Tensor, features: torch.Tensor,
                               max_new_tokens: int = 32) -> tuple[list[int], list[np.ndarray]]:
        """`generate` from precomputed visual features [N, hidden] (or [B, n, hidden], flattened in order),
        placed at the N image tokens in order: for a video, frame 0's tokens, then frame 1's, ..."""
        features = features.reshape(-1, features.shape[-1])
        count = int((input_ids == self.config.image_token_id).sum())
        if count != features.shape[0]:
            raise ValueError(f"{count} image tokens in the prompt but {features.shape[0]} feature rows")
        embeds = self.embed(input_ids, features)
        out = self.llava.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids),
                                  do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                  eos_token_id=None, pad_token_id=0, output_logits=True,
                                  return_dict_in_generate=True)
        return out.sequences[0, -max_new_tokens:].tolist(), [step[0].numpy() for step in out.logits]


def llava_config(vision: dict[str, Any], text: dict[str, Any], image_token_id: int, tie: bool,
                  select_strategy: str = "default", initializer_range: float | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    extra = {} if initializer_range is None else {"initializer_range": initializer_range}
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision, **extra),
                      text_config=LlamaConfig(tie_word_embeddings=tie, **text, **extra),
                      image_token_id=image_token_id, vision_feature_layer=-2,
                      vision_feature_select_strategy=select_strategy, projector_hidden_act="gelu",
                      tie_word_embeddings=tie)
    return cfg


def build_random_model(name: str, seed: int = 0, landmarks: bool = True,
                       landmark_projector: str = REGION_PROJECTOR) -> FaceLlava:
    """A preset's random-weight model; `landmarks=False` gives a checkpoint without the pathway,
    `landmark_projector="linear"` one with the authors' single-token landmark projector. A `-video` preset
    adds a video tower, built last from its own generator (seed + 1) without touching the global RNG."""
    from transformers import LlavaForConditionalGeneration

    if name not in PRESETS:
        raise ValueError(f"unknown Face-LLaVA preset {name!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    vision = dict(image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, **p["vision"])
    text = dict(vocab_size=PRESET_VOCAB_SIZE, max_position_embeddings=DEFAULT_MAX_CONTEXT, rms_norm_eps=1e-5,
                rope_theta=10000.0, bos_token_id=None, eos_token_id=None, pad_token_id=None, **p["text"])
    cfg = llava_config(vision, text, PRESET_IMAGE_TOKEN_ID, p["tie_word_embeddings"],
                        initializer_range=p["initializer_range"])
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(cfg)
    pathway = FaceLandmarkPathway(cfg.text_config.hidden_size, CROSS_ATTENTION_HEADS, p["branch_scale"],
                                  landmark_projector) if landmarks else None
    video = random_video_tower(cfg.vision_config, p["video"]["num_frames"], seed + 1) if "video" in p else None
    return FaceLlava(llava, pathway, video).float().eval()
