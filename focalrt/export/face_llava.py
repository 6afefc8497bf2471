"""Face-LLaVA export: CLIP tower + mlp2x_gelu projector + landmark pathway, token embedding, Llama decoder.

The reference model is transformers' `LlavaForConditionalGeneration` (CLIP vision tower, penultimate
layer, class token dropped, two-layer GELU projector, Llama decoder) plus our landmark pathway
(`face_llava_modules`). Each exported component is checked against it right after export, as the Qwen
export does. The decoder uses the same GroupQueryAttention in-place KV cache as the Qwen2.5-VL one, with
plain RoPE and 1D position ids [B, S].

Real checkpoints use the Face-LLaVA (Video-LLaVA / LLaVA) parameter names; `convert_face_llava_state_dict`
maps them onto ours and `to_original_face_llava_state_dict` back.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer
from torch import nn

from focalrt.export.face_llava_modules import (
    CROP_SIZE,
    CROSS_ATTENTION_HEADS,
    NUM_LANDMARKS,
    REGIONS,
    REPOSITORY_BRANCH_SCALE,
    FaceLandmarkPathway,
)
from focalrt.export.gqa import KVCachedDecoder, export_kv_decoder, validate_kv_decoder
from focalrt.export.onnx_io import compare, cpu_session, describe_io, export_module

log = logging.getLogger(__name__)

IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP, as LanguageBind's image transform uses
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
DEFAULT_MAX_CONTEXT = 4096  # Vicuna-7B v1.5
IMAGE_TOKEN = "<image>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"

# llava_v1 conversation: system, "USER: <image>\n{question}", then "ASSISTANT:"; turns end with </s>.
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
FACE_LLAVA_PROMPT: dict[str, Any] = {
    "profile": "llava_v1",
    "system": LLAVA_V1_SYSTEM,
    "template": BOS_TOKEN + "{system} USER: {image}\n{region}{instruction} ASSISTANT:",
    "image_token": IMAGE_TOKEN,
    "region_mode": "text",
    "region_template": "Focus on the face region [{x1}, {y1}, {x2}, {y2}]. ",
    "default_instruction": ("Describe this face: its facial action units, the emotion it shows and cues to "
                            "the person's age."),
    "stop_tokens": [EOS_TOKEN],
}

# The preset tokenizer: Qwen2's BPE (built offline from qwen.tiktoken) with <s>, </s> and <image> marked
# special. <s> and </s> already are Qwen2 BPE tokens; <image> is appended after Qwen2's 22 added tokens.
PRESET_VOCAB_SIZE = 151666
PRESET_IMAGE_TOKEN_ID = 151665

# Random-weight models of the real architecture at 224 px / patch 14 (256 image tokens). The presets use
# branch_scale 0.1 so that the landmark branch visibly changes the output in tests; real checkpoints use
# their config's value or the repository's 0.001.
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

# LanguageBind_Image's vision tower (CLIP ViT-L/14 at 224 px), used when a checkpoint does not say.
LANGUAGEBIND_IMAGE_VISION: dict[str, Any] = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "hidden_act", "layer_norm_eps", "num_channels")
_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
              "rope_theta", "rope_scaling", "attention_bias", "mlp_bias", "tie_word_embeddings",
              "bos_token_id", "eos_token_id", "pad_token_id")


class FaceLlava(nn.Module):
    """The eager PyTorch reference: transformers' Llava plus the landmark pathway (None: no landmarks)."""

    def __init__(self, llava: nn.Module, landmarks: FaceLandmarkPathway | None):
        super().__init__()
        self.llava = llava
        self.landmarks = landmarks

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

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image features at the image-token positions, in order."""
        is_image = input_ids == self.config.image_token_id
        embeds = self.llava.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_features.to(embeds.dtype))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, landmarks: torch.Tensor | None = None,
                 max_new_tokens: int = 32) -> tuple[list[int], list[np.ndarray]]:
        """Greedy tokens and per-step logits through transformers' generate(), never stopping early."""
        embeds = self.embed(input_ids, self.image_features(pixel_values, landmarks))
        out = self.llava.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids),
                                  do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                  eos_token_id=None, pad_token_id=0, output_logits=True,
                                  return_dict_in_generate=True)
        return out.sequences[0, -max_new_tokens:].tolist(), [step[0].numpy() for step in out.logits]


def _llava_config(vision: dict[str, Any], text: dict[str, Any], image_token_id: int, tie: bool,
                  select_strategy: str = "default", initializer_range: float | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    extra = {} if initializer_range is None else {"initializer_range": initializer_range}
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision, **extra),
                      text_config=LlamaConfig(tie_word_embeddings=tie, **text, **extra),
                      image_token_id=image_token_id, vision_feature_layer=-2,
                      vision_feature_select_strategy=select_strategy, projector_hidden_act="gelu",
                      tie_word_embeddings=tie)
    return cfg


def build_random_model(name: str, seed: int = 0, landmarks: bool = True) -> FaceLlava:
    """A preset's random-weight model; `landmarks=False` gives a checkpoint without the pathway."""
    from transformers import LlavaForConditionalGeneration

    if name not in PRESETS:
        raise ValueError(f"unknown Face-LLaVA preset {name!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    vision = dict(image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, **p["vision"])
    text = dict(vocab_size=PRESET_VOCAB_SIZE, max_position_embeddings=DEFAULT_MAX_CONTEXT, rms_norm_eps=1e-5,
                rope_theta=10000.0, bos_token_id=None, eos_token_id=None, pad_token_id=None, **p["text"])
    cfg = _llava_config(vision, text, PRESET_IMAGE_TOKEN_ID, p["tie_word_embeddings"],
                        initializer_range=p["initializer_range"])
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(cfg)
    pathway = FaceLandmarkPathway(cfg.text_config.hidden_size, CROSS_ATTENTION_HEADS, p["branch_scale"]) \
        if landmarks else None
    return FaceLlava(llava, pathway).float().eval()


# ---------------------------------------------------------------------------------------------------------
# Checkpoint names. Face-LLaVA saves the LLaVA layout: the Llama under `model.`, the projector as an
# nn.Sequential `model.mm_projector.{0,2}`, the LanguageBind tower as `model.image_tower.image_tower.`
# (LLaVA-1.5 uses `model.vision_tower.vision_tower.vision_model.`), and the landmark modules as
# `model.landmarks_projector.region_layers.<region>`, `model.global_landmarks_projector` and
# `model.landmarks_cross_attn` (an nn.MultiheadAttention with packed q/k/v, its LayerNorm, linear_proj).

_ORIGINAL_REGIONS = dict(zip([name for name, _, _ in REGIONS],
                             ["face", "eyebrow1", "eyebrow2", "nose", "nostril", "eye1", "eye2", "lips", "teeth"],
                             strict=True))
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.image_tower.image_tower.", "llava.model.vision_tower."),
    ("model.mm_projector.0.", "llava.model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "llava.model.multi_modal_projector.linear_2."),
    ("model.embed_tokens.", "llava.model.language_model.embed_tokens."),
    ("model.layers.", "llava.model.language_model.layers."),
    ("model.norm.", "llava.model.language_model.norm."),
    ("lm_head.", "llava.lm_head."),
    ("model.global_landmarks_projector.", "landmarks.global_proj."),
    ("model.landmarks_cross_attn.cross_attn.attn.out_proj.", "landmarks.cross_attn.o_proj."),
    ("model.landmarks_cross_attn.cross_attn.ln.", "landmarks.cross_attn.norm."),
    ("model.landmarks_cross_attn.linear_proj.", "landmarks.cross_attn.out_proj."),
    *((f"model.landmarks_projector.region_layers.{orig}.", f"landmarks.region_proj.regions.{ours}.")
      for ours, orig in _ORIGINAL_REGIONS.items()),
)
# Read as another spelling of a prefix above (LLaVA-1.5 layout), never written.
_ALIASES = (("model.vision_tower.vision_tower.vision_model.", "model.image_tower.image_tower."),)
_PACKED_QKV = "model.landmarks_cross_attn.cross_attn.attn.in_proj_"
_OURS_QKV = ("landmarks.cross_attn.q_proj.", "landmarks.cross_attn.k_proj.", "landmarks.cross_attn.v_proj.")
# In checkpoints but unused at inference: a LayerNorm the code never applies, the video tower (video is
# not supported), and position-id buffers.
_IGNORED_PREFIXES = ("model.landmarks_cross_attn.ln.", "model.video_tower.")
_IGNORED_SUFFIXES = (".position_ids",)


def convert_face_llava_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Face-LLaVA checkpoint names -> `FaceLlava` names. Unknown names are an error, not silently lost."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for name, tensor in sd.items():
        for alias, canonical in _ALIASES:
            if name.startswith(alias):
                name = canonical + name[len(alias):]
        if name.startswith(_IGNORED_PREFIXES) or name.endswith(_IGNORED_SUFFIXES):
            continue
        if name.startswith(_PACKED_QKV):
            kind = name[len(_PACKED_QKV):]  # "weight" or "bias"
            for prefix, part in zip(_OURS_QKV, tensor.chunk(3, dim=0), strict=True):
                out[prefix + kind] = part.clone()
            continue
        for orig, ours in _PREFIXES:
            if name.startswith(orig):
                out[ours + name[len(orig):]] = tensor
                break
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"{len(unknown)} checkpoint parameters have no place in the Face-LLaVA export model, "
                         f"e.g. {unknown[:5]}; is this a Face-LLaVA (LLaVA-layout) checkpoint?")
    return out


def to_original_face_llava_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`FaceLlava` names -> Face-LLaVA checkpoint names (the inverse of convert_face_llava_state_dict)."""
    out: dict[str, torch.Tensor] = {}
    packed: dict[str, list[torch.Tensor | None]] = {"weight": [None] * 3, "bias": [None] * 3}
    for name, tensor in sd.items():
        qkv = [i for i, prefix in enumerate(_OURS_QKV) if name.startswith(prefix)]
        if qkv:
            packed[name.rsplit(".", 1)[1]][qkv[0]] = tensor
            continue
        for orig, ours in _PREFIXES:
            if name.startswith(ours):
                out[orig + name[len(ours):]] = tensor
                break
        else:
            raise ValueError(f"parameter {name!r} has no Face-LLaVA checkpoint name")
    for kind, parts in packed.items():
        if any(p is not None for p in parts):
            if any(p is None for p in parts):
                raise ValueError(f"cross-attention {kind}: q, k and v must all be present to pack them")
            out[_PACKED_QKV + kind] = torch.cat(parts, dim=0)
    return out


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{directory} has no *.safetensors or pytorch_model*.bin weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd.update(load_file(str(f)))
        else:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return sd


def _tower_dir(cfg: dict[str, Any], directory: Path) -> Path | None:
    """The image tower named by the config (e.g. LanguageBind/LanguageBind_Image), if it is a local dir."""
    name = cfg.get("mm_image_tower") or cfg.get("mm_vision_tower")
    if not name:
        return None
    for candidate in (Path(name), directory / name):
        if candidate.is_dir():
            return candidate
    return None


def _vision_config_dict(cfg: dict[str, Any], tower: Path | None) -> dict[str, Any]:
    source = cfg.get("vision_config")
    if source is None and tower is not None and (tower / "config.json").is_file():
        tower_cfg = json.loads((tower / "config.json").read_text())
        source = tower_cfg.get("vision_config", tower_cfg)
    source = source or LANGUAGEBIND_IMAGE_VISION
    return {k: source[k] for k in _VISION_KEYS if k in source}


def _check_supported(cfg: dict[str, Any], path: Path, has_landmarks: bool) -> None:
    wanted = {"mm_projector_type": "mlp2x_gelu"}
    if has_landmarks:
        wanted.update(landmarks_projector_type="landmarks_region_projector",
                      global_landmarks_projector_type="linear", cross_attn_type="simple")
    for key, value in wanted.items():
        if cfg.get(key, value) != value:
            raise NotImplementedError(f"{path}: {key}={cfg[key]!r} is not supported; the Face-LLaVA export "
                                      f"handles {key}={value!r}")
    if cfg.get("use_landmark_tokens"):
        raise NotImplementedError(f"{path}: use_landmark_tokens=true (a 257th image token) is not supported")
    if cfg.get("mm_vision_select_layer", -2) != -2:
        raise NotImplementedError(f"{path}: mm_vision_select_layer={cfg['mm_vision_select_layer']} is not "
                                  f"supported; Face-LLaVA uses -2")


def load_face_llava_checkpoint(directory: str | Path) -> FaceLlava:
    """A local Face-LLaVA checkpoint (config.json + weights, LLaVA layout) as a float32 `FaceLlava`.

    The image tower's weights are taken from the checkpoint, or else from the local tower directory its
    config names (`mm_image_tower`, LanguageBind_Image's `vision_model.*`).
    """
    from transformers import LlavaForConditionalGeneration

    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} does not exist; pass a Face-LLaVA checkpoint directory")
    cfg = json.loads(cfg_path.read_text())
    sd = _read_weights(directory)
    has_landmarks = any(k.startswith("model.landmarks_projector.") for k in sd)
    _check_supported(cfg, cfg_path, has_landmarks)
    tower = _tower_dir(cfg, directory)
    tower_prefixes = ("model.image_tower.image_tower.", "model.vision_tower.vision_tower.vision_model.")
    if not any(k.startswith(tower_prefixes) for k in sd):
        tower_sd = _read_weights(tower) if tower is not None else {}
        found = {k: v for k, v in tower_sd.items() if k.startswith("vision_model.")}
        if not found:
            raise FileNotFoundError(
                f"{directory} holds no image tower weights (model.image_tower.image_tower.*) and its config's "
                f"mm_image_tower {cfg.get('mm_image_tower')!r} is not a local directory with vision_model.* "
                f"weights; download LanguageBind/LanguageBind_Image and set mm_image_tower to its path")
        sd.update({"model.image_tower.image_tower." + k[len("vision_model."):]: v for k, v in found.items()})
    converted = {k: v.float() for k, v in convert_face_llava_state_dict(sd).items()}

    text = {k: cfg[k] for k in _TEXT_KEYS if k in cfg and cfg[k] is not None}
    tie = bool(text.pop("tie_word_embeddings", False))
    tokenizer_json = directory / "tokenizer.json"
    image_id = Tokenizer.from_file(str(tokenizer_json)).token_to_id(IMAGE_TOKEN) if tokenizer_json.is_file() else None
    # Without an <image> token the export adds one after the vocabulary (see write_face_llava_tokenizer).
    image_id = image_id if image_id is not None else int(text["vocab_size"])
    select = "full" if cfg.get("mm_vision_select_feature", "patch") == "cls_patch" else "default"
    llava_cfg = _llava_config(_vision_config_dict(cfg, tower), text, image_id, tie, select)
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is loaded below; random init would only cost time
        llava = LlavaForConditionalGeneration(llava_cfg)
    scale = float(cfg.get("landmarks_branch_scale", REPOSITORY_BRANCH_SCALE))
    pathway = FaceLandmarkPathway(llava_cfg.text_config.hidden_size, CROSS_ATTENTION_HEADS, scale) \
        if has_landmarks else None
    model = FaceLlava(llava, pathway)
    if tie:
        converted.pop("llava.lm_head.weight", None)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not (tie and k == "llava.lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if tie:
        llava.tie_weights()
    return model.float().eval()


# ---------------------------------------------------------------------------------------------------------
# Tokenizer.

def build_preset_tokenizer() -> tuple[Tokenizer, str]:
    """Qwen2's real BPE tokenizer with <s>, </s> and <image> as special tokens, and its provenance."""
    from focalrt.export.tokenizer import build_qwen2_tokenizer, locate_qwen_tiktoken

    tok = build_qwen2_tokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in (BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN)])
    if tok.get_vocab_size() != PRESET_VOCAB_SIZE or tok.token_to_id(IMAGE_TOKEN) != PRESET_IMAGE_TOKEN_ID:
        raise RuntimeError(f"the preset tokenizer has {tok.get_vocab_size()} tokens and <image>="
                           f"{tok.token_to_id(IMAGE_TOKEN)}, expected {PRESET_VOCAB_SIZE} and "
                           f"{PRESET_IMAGE_TOKEN_ID}; the installed qwen.tiktoken is not Qwen2's")
    _, label = locate_qwen_tiktoken()
    return tok, f"qwen.tiktoken ({label}) + special <s> </s> <image>"


def _added_tokens(tok: Tokenizer) -> dict[str, int]:
    return {a.content: i for i, a in sorted(tok.get_added_tokens_decoder().items()) if a.special}


def write_face_llava_tokenizer(out: Path, source_dir: Path | None) -> dict[str, Any]:
    """tokenizer.json for the bundle: the preset's, or the checkpoint's own with <image> added if missing."""
    from focalrt.export.tokenizer import write_tokenizer

    path = out / "tokenizer.json"
    if source_dir is None:
        tok, label = build_preset_tokenizer()
        tok.save(str(path))
        return {"file": path.name, "special_tokens": _added_tokens(tok), "source": label}
    entry = write_tokenizer(out, source_dir)
    if entry["source"] != "checkpoint":
        path.unlink(missing_ok=True)
        raise FileNotFoundError(f"{source_dir} has no tokenizer (tokenizer.json or tokenizer.model); copy "
                                f"the tokenizer files of its base model (lmsys/vicuna-7b-v1.5) into it")
    tok = Tokenizer.from_file(str(path))
    source = "checkpoint"
    if tok.token_to_id(IMAGE_TOKEN) is None:
        tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
        tok.save(str(path))
        source = "checkpoint + special <image> (image placeholder, replaced by image embeddings)"
    for needed in (BOS_TOKEN, EOS_TOKEN):
        if tok.token_to_id(needed) is None:
            raise ValueError(f"{source_dir}: the tokenizer has no {needed!r} token; the llava_v1 profile needs it")
    return {"file": path.name, "special_tokens": _added_tokens(tok), "source": source}


# ---------------------------------------------------------------------------------------------------------
# Export wrappers.

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
        features = self.projector(hidden)
        if self.landmarks is not None:
            features = torch.where(use_landmarks.view(1, 1, 1), self.landmarks(features, landmarks), features)
        return features[0]


class TokenEmbedding(nn.Module):
    """input_ids -> embeddings, with image embeddings at the image-token positions in order.

    The image token may lie outside the embedding table (a checkpoint tokenizer with <image> appended), so
    it is looked up as id 0 and then replaced.
    """

    def __init__(self, embed_tokens: nn.Embedding, image_token_id: int):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.image_token_id = image_token_id

    def forward(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        is_image = input_ids == self.image_token_id
        embeds = self.embed_tokens(torch.where(is_image, torch.zeros_like(input_ids), input_ids))
        index = (is_image.reshape(-1).long().cumsum(0) - 1).clamp(min=0)
        placed = image_embeds.index_select(0, index).view(embeds.shape)
        return torch.where(is_image.unsqueeze(-1), placed, embeds)


def image_token_count(model: FaceLlava) -> int:
    v = model.config.vision_config
    return (v.image_size // v.patch_size) ** 2 + (0 if model.config.vision_feature_select_strategy == "default" else 1)


def export_vision(model: FaceLlava, out: Path) -> dict[str, Any]:
    size = model.config.vision_config.image_size
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
    landmark_facts = {"input": "landmarks", "flag": "use_landmarks", "points": NUM_LANDMARKS,
                      "order": "iBUG 68", "normalised_by": "image width and height (0..1)",
                      "reference_crop_size": CROP_SIZE, "regions": {n: [a, b] for n, a, b in REGIONS},
                      "branch_scale": model.landmarks.cross_attn.branch_scale,
                      "cross_attention_heads": model.landmarks.cross_attn.num_heads}
    return {"validation_max_abs_diff": worst, "landmarks": landmark_facts, **describe_io(path)}


def export_embed(model: FaceLlava, out: Path) -> dict[str, Any]:
    image_id = model.config.image_token_id
    module = TokenEmbedding(model.llava.get_input_embeddings(), image_id).eval()
    hidden = model.config.text_config.hidden_size
    ids = torch.tensor([[1, 319, image_id, image_id, image_id, 13]])
    image_embeds = torch.randn(3, hidden, generator=torch.Generator().manual_seed(2))
    path = out / "embed.onnx"
    export_module(module, (ids, image_embeds), path, ["input_ids", "image_embeds"], ["inputs_embeds"],
                  {"input_ids": {0: "batch", 1: "sequence"}, "image_embeds": {0: "image_tokens"},
                   "inputs_embeds": {0: "batch", 1: "sequence"}})
    with torch.no_grad():
        ref = model.embed(ids, image_embeds[None]).numpy()
    got = cpu_session(path).run(None, {"input_ids": ids.numpy(), "image_embeds": image_embeds.numpy()})[0]
    err = compare("token embedding", got, ref, atol=1e-6)
    return {"validation_max_abs_diff": err, **describe_io(path)}


def export_decoder(model: FaceLlava, out: Path, max_context: int) -> dict[str, Any]:
    module = KVCachedDecoder(model.llava.model.language_model, model.llava.lm_head, max_context).eval()
    path = out / "decoder.onnx"
    graph = export_kv_decoder(module, path)
    hd = module.head_dim
    err = validate_decoder(model, path, hd)
    log.info("decoder.onnx matches PyTorch over prefill + 3 cached steps (max abs diff %.2e)", err)
    return {"validation_max_abs_diff": err, **graph, **describe_io(path)}


def validate_decoder(model: FaceLlava, path: Path, head_dim: int, prompt_len: int = 7, steps: int = 3,
                     buf: int = 32) -> float:
    """Prefill then cached single-token steps through ONNX, against transformers with a DynamicCache."""
    return validate_kv_decoder(model.llava.model.language_model, model.llava.lm_head, path, head_dim, prompt_len,
                               steps, buf)


# ---------------------------------------------------------------------------------------------------------
# The bundle.

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
