"""Face-LLaVA checkpoint names and loading: the LLaVA layout mapped onto `FaceLlava` and back.

Face-LLaVA saves the LLaVA layout: the Llama under `model.`, the projector as an
nn.Sequential `model.mm_projector.{0,2}`, the LanguageBind tower as `model.image_tower.image_tower.`
(LLaVA-1.5 uses `model.vision_tower.vision_tower.vision_model.`), the LanguageBind video tower as
`model.video_tower.video_tower.` (LanguageBind_Video_merge's `vision_model.*`), and the landmark modules as
`model.landmarks_projector.region_layers.<region>` (or, for `landmarks_projector_type='linear'`, a single
`model.landmarks_projector` Linear(136 -> hidden)), `model.global_landmarks_projector` and
`model.landmarks_cross_attn` (an nn.MultiheadAttention with packed q/k/v, its LayerNorm, linear_proj).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from focalrt.export.face_llava.landmarks import (
    CROSS_ATTENTION_HEADS,
    LINEAR_PROJECTOR,
    REGION_PROJECTOR,
    REGIONS,
    REPOSITORY_BRANCH_SCALE,
    FaceLandmarkPathway,
)
from focalrt.export.face_llava.model import (
    IMAGE_TOKEN,
    TEXT_KEYS,
    VISION_KEYS,
    FaceLlava,
    llava_config,
)
from focalrt.export.face_llava.video_tower import FEATURE_LAYER, LanguageBindVideoTower

log = logging.getLogger(__name__)

_ORIGINAL_REGIONS = dict(zip([name for name, _, _ in REGIONS],
                             ["face", "eyebrow1", "eyebrow2", "nose", "nostril", "eye1", "eye2", "lips", "teeth"],
                             strict=True))
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.image_tower.image_tower.", "llava.model.vision_tower."),
    ("model.video_tower.video_tower.", "video_tower."),
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
    # landmarks_projector_type='linear': one Linear; after the region names, which share its prefix.
    ("model.landmarks_projector.", "landmarks.token_proj."),
)
# Read as another spelling of a prefix above (LLaVA-1.5 layout), never written.
_ALIASES = (("model.vision_tower.vision_tower.vision_model.", "model.image_tower.image_tower."),)
_PACKED_QKV = "model.landmarks_cross_attn.cross_attn.attn.in_proj_"
_OURS_QKV = ("landmarks.cross_attn.q_proj.", "landmarks.cross_attn.k_proj.", "landmarks.cross_attn.v_proj.")
# In checkpoints but unused at inference: a LayerNorm the code never applies, and position-id buffers.
_IGNORED_PREFIXES = ("model.landmarks_cross_attn.ln.",)
_VIDEO_PREFIX = "model.video_tower.video_tower."
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


def _tower_dir(cfg: dict[str, Any], directory: Path, key: str = "mm_image_tower") -> Path | None:
    """The tower named by the config (e.g. LanguageBind/LanguageBind_Image), if it is a local dir."""
    name = cfg.get(key) or (cfg.get("mm_vision_tower") if key == "mm_image_tower" else None)
    if not name:
        return None
    for candidate in (Path(name), directory / name):
        if candidate.is_dir():
            return candidate
    return None


def _vision_config_dict(cfg: dict[str, Any], tower: Path | None, path: Path) -> dict[str, Any]:
    """The tower's dimensions and activation from config.json's `vision_config` or the tower's own config.

    Nothing is assumed: CLIP's default activation (quick_gelu) is not necessarily the tower's, and a wrong
    one gives plausible but wrong features, so an unknown activation is refused."""
    source = cfg.get("vision_config")
    if source is None and tower is not None and (tower / "config.json").is_file():
        tower_cfg = json.loads((tower / "config.json").read_text())
        source = tower_cfg.get("vision_config", tower_cfg)
    if not source or "hidden_act" not in source:
        raise ValueError(
            f"{path}: the image tower's activation cannot be known: config.json has no vision_config and its "
            f"mm_image_tower {cfg.get('mm_image_tower')!r} is not a local directory whose config.json gives "
            f"hidden_act; download LanguageBind/LanguageBind_Image and set mm_image_tower to its path")
    return {k: source[k] for k in VISION_KEYS if k in source}


def _video_config(cfg: dict[str, Any], tower: Path, vision: dict[str, Any], path: Path) -> tuple[dict, int]:
    """The video tower's CLIP dimensions and frame count from its directory's config.json (`vision_config` of a
    LanguageBindVideoConfig). Refused when the activation, the temporal attention or the frame count is not
    stated: each changes the features."""
    tower_cfg_path = tower / "config.json"
    if not tower_cfg_path.is_file():
        raise ValueError(f"{path}: the video tower's configuration cannot be known: mm_video_tower {str(tower)!r} "
                         f"has no config.json; use the LanguageBind/LanguageBind_Video_merge directory as is")
    tower_cfg = json.loads(tower_cfg_path.read_text())
    source = tower_cfg.get("vision_config", tower_cfg)
    fix = "; use LanguageBind/LanguageBind_Video_merge's own config.json, which states it"
    if "hidden_act" not in source:
        raise ValueError(f"{path}: the video tower's activation cannot be known: {tower_cfg_path} has no "
                         f"vision_config.hidden_act{fix}")
    if not source.get("add_time_attn"):
        raise ValueError(f"{tower_cfg_path}: add_time_attn is {source.get('add_time_attn')!r}; Face-LLaVA's video "
                         f"tower is LanguageBind's with temporal attention (add_time_attn true)")
    frames = source.get("num_frames")
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"{path}: the video tower's frame count cannot be known: {tower_cfg_path} has "
                         f"vision_config.num_frames {frames!r}{fix}")
    video = {k: source[k] for k in VISION_KEYS if k in source}
    if video.get("hidden_size") != vision.get("hidden_size"):
        raise ValueError(f"{tower_cfg_path}: video tower hidden_size {video.get('hidden_size')} differs from the "
                         f"image tower's {vision.get('hidden_size')}; Face-LLaVA shares one projector between them")
    return video, frames


def _video_tower(cfg: dict[str, Any], directory: Path, sd: dict[str, torch.Tensor], vision: dict[str, Any],
                 path: Path) -> tuple[dict, int] | None:
    """The video tower's config and frame count when there is one to export, its weights placed in `sd` under
    the checkpoint's names; None (and no video weights left in `sd`) when the config names no video tower or
    it cannot be built here, the latter with a warning saying how to get it."""
    name = cfg.get("mm_video_tower")
    in_checkpoint = any(k.startswith(_VIDEO_PREFIX) for k in sd)
    tower = _tower_dir(cfg, directory, "mm_video_tower") if name else None
    if tower is None:
        for k in [k for k in sd if k.startswith(_VIDEO_PREFIX)]:
            del sd[k]
        if name:
            held = "holds its weights but" if in_checkpoint else "holds no video tower weights"
            log.warning("%s names mm_video_tower %r, which is not a local directory, and the checkpoint %s its "
                        "configuration (activation, frames) is in that directory: exporting the image path only. "
                        "For video, download LanguageBind/LanguageBind_Video_merge and set mm_video_tower in %s "
                        "to its path", path, name, held, path)
        return None
    video, frames = _video_config(cfg, tower, vision, path)
    if not in_checkpoint:
        has_files = any(tower.glob("*.safetensors")) or any(tower.glob("pytorch_model*.bin"))
        found = {k: v for k, v in _read_weights(tower).items() if k.startswith("vision_model.")} if has_files else {}
        if not found:
            raise FileNotFoundError(
                f"{directory} holds no video tower weights ({_VIDEO_PREFIX}*) and its mm_video_tower {str(tower)!r} "
                f"has no vision_model.* weights; download LanguageBind/LanguageBind_Video_merge there")
        sd.update({_VIDEO_PREFIX + k[len("vision_model."):]: v for k, v in found.items()})
    return video, frames


def _landmark_projector(sd: dict[str, torch.Tensor], cfg: dict[str, Any], path: Path) -> str | None:
    """The landmark projector the weights hold (None: no landmark modules), checked against the config.

    Their config reader defaults `landmarks_projector_type` to 'linear' when the key is absent, so the
    weights decide and a config that names the other type is refused."""
    if any(k.startswith("model.landmarks_projector.region_layers.") for k in sd):
        found = REGION_PROJECTOR
    elif "model.landmarks_projector.weight" in sd:
        found = LINEAR_PROJECTOR
    else:
        return None
    named = cfg.get("landmarks_projector_type", LINEAR_PROJECTOR)
    if named != found:
        raise ValueError(f"{path}: landmarks_projector_type={named!r} but the weights hold a {found!r} landmark "
                         f"projector; fix the config or the weights")
    return found


def _check_supported(cfg: dict[str, Any], path: Path, has_landmarks: bool) -> None:
    wanted = {"mm_projector_type": "mlp2x_gelu"}
    if has_landmarks:
        wanted.update(global_landmarks_projector_type="linear", cross_attn_type="simple")
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
    config names (`mm_image_tower`, LanguageBind_Image's `vision_model.*`). So are the video tower's
    (`mm_video_tower`, LanguageBind_Video_merge), whose configuration always comes from that directory: when
    it is not local, the model has no video tower and a warning says so.
    """
    from transformers import CLIPVisionConfig, LlavaForConditionalGeneration

    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} does not exist; pass a Face-LLaVA checkpoint directory")
    cfg = json.loads(cfg_path.read_text())
    tower = _tower_dir(cfg, directory)
    vision = _vision_config_dict(cfg, tower, cfg_path)  # before reading gigabytes of weights
    sd = _read_weights(directory)
    projector = _landmark_projector(sd, cfg, cfg_path)
    _check_supported(cfg, cfg_path, projector is not None)
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
    video = _video_tower(cfg, directory, sd, vision, cfg_path)
    converted = {k: v.float() for k, v in convert_face_llava_state_dict(sd).items()}

    text = {k: cfg[k] for k in TEXT_KEYS if k in cfg and cfg[k] is not None}
    tie = bool(text.pop("tie_word_embeddings", False))
    tokenizer_json = directory / "tokenizer.json"
    image_id = Tokenizer.from_file(str(tokenizer_json)).token_to_id(IMAGE_TOKEN) if tokenizer_json.is_file() else None
    # Without an <image> token the export adds one after the vocabulary (see write_face_llava_tokenizer).
    image_id = image_id if image_id is not None else int(text["vocab_size"])
    select = "full" if cfg.get("mm_vision_select_feature", "patch") == "cls_patch" else "default"
    llava_cfg = llava_config(vision, text, image_id, tie, select)
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is loaded below; random init would only cost time
        llava = LlavaForConditionalGeneration(llava_cfg)
        video_tower = None if video is None else \
            LanguageBindVideoTower(CLIPVisionConfig(**video[0]), video[1], FEATURE_LAYER)
    # Their configs never hold a branch scale (the call site relies on the module default, 0.1); ours may.
    scale = float(cfg.get("landmarks_branch_scale", REPOSITORY_BRANCH_SCALE))
    pathway = FaceLandmarkPathway(llava_cfg.text_config.hidden_size, CROSS_ATTENTION_HEADS, scale, projector) \
        if projector is not None else None
    model = FaceLlava(llava, pathway, video_tower)
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

