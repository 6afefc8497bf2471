"""Face-LLaVA checkpoint directories in the authors' layout, shared by the Face-LLaVA test modules."""

from __future__ import annotations

import json

VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                 "patch_size", "hidden_act")


def write_checkpoint(directory, model, tower_dir, tower_in_checkpoint: bool, video_tower_dir=None,
                     video_in_checkpoint: bool = True, **config_overrides) -> None:
    """A checkpoint directory in the authors' layout: flat Llama config + the mm_* / landmark keys their
    `initialize_vision_modules` writes (no branch scale: their configs never hold one), original weight
    names.

    A model with a video tower also gets `mm_video_tower` = `video_tower_dir`, a directory holding
    LanguageBind_Video_merge's config.json (a LanguageBindVideoConfig: `vision_config` with add_time_attn and
    num_frames); its weights `model.video_tower.video_tower.*` stay in the checkpoint, or (with
    `video_in_checkpoint=False`) go to that directory as `vision_model.*` next to text-model weights, as
    LanguageBind_Video_merge ships them."""
    import torch
    from safetensors.torch import save_file

    from focalrt.export.face_llava import to_original_face_llava_state_dict

    directory.mkdir()
    tower_dir.mkdir()
    t, v = model.config.text_config, model.config.vision_config
    video = getattr(model, "video_tower", None)
    config = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "vocab_size": t.vocab_size,
              "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
              "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
              "num_key_value_heads": t.num_key_value_heads, "max_position_embeddings": 4096,
              "rms_norm_eps": t.rms_norm_eps, "rope_theta": 10000.0, "hidden_act": "silu",
              "tie_word_embeddings": False, "mm_image_tower": str(tower_dir), "mm_projector_type": "mlp2x_gelu",
              "landmarks_projector_type": model.landmarks.projector, "global_landmarks_projector_type": "linear",
              "cross_attn_type": "simple", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "use_landmark_tokens": False, "mm_hidden_size": v.hidden_size, "landmarks_hidden_size": 136,
              "mm_video_tower": None if video is None else str(video_tower_dir), "use_mm_proj": True,
              **config_overrides}
    (directory / "config.json").write_text(json.dumps(config))
    vision = {k: getattr(v, k) for k in VISION_FIELDS}
    (tower_dir / "config.json").write_text(json.dumps({"vision_config": vision}))
    original = {k: t.contiguous() for k, t in to_original_face_llava_state_dict(model.state_dict()).items()}
    tower = {k: original.pop(k) for k in list(original) if k.startswith("model.image_tower.")}
    if tower_in_checkpoint:
        original.update(tower)
    else:  # LanguageBind_Image's own layout: vision_model.*
        save_file({"vision_model." + k[len("model.image_tower.image_tower."):]: t for k, t in tower.items()},
                  str(tower_dir / "model.safetensors"))
    if video is not None:
        video_tower_dir.mkdir()
        vc = video.config
        video_vision = {**{k: getattr(vc, k) for k in VISION_FIELDS}, "layer_norm_eps": vc.layer_norm_eps,
                        "add_time_attn": True, "num_frames": video.num_frames, "force_patch_dropout": 0.0}
        (video_tower_dir / "config.json").write_text(json.dumps(
            {"model_type": "LanguageBindVideo", "projection_dim": 32,
             "text_config": {"hidden_size": 32, "num_hidden_layers": 1}, "vision_config": video_vision}))
        prefix = "model.video_tower.video_tower."
        video_sd = {k: original.pop(k) for k in list(original) if k.startswith(prefix)}
        assert video_sd, "to_original_face_llava_state_dict wrote no video tower weights"
        if not video_in_checkpoint:
            save_file({**{"vision_model." + k[len(prefix):]: t for k, t in video_sd.items()},
                       "text_model.final_layer_norm.weight": torch.ones(32), "logit_scale": torch.zeros(())},
                      str(video_tower_dir / "model.safetensors"))
        else:
            original.update(video_sd)
    save_file(original, str(directory / "model.safetensors"))


def write_llama_style_tokenizer(directory, tokenizer) -> None:
    """The tokenizer files of a Vicuna-style checkpoint: `tokenizer` (a tokenizers.Tokenizer, or tokenizer.json
    text) whose every call prepends <s>, as Llama's does, and a tokenizer_config.json naming <s> and </s>, so
    that transformers' `tokenizer(chunk).input_ids` (what their tokenizer_image_token calls) starts with BOS."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(tokenizer) if isinstance(tokenizer, str) else tokenizer
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def tokenizer_image_token(chunks: list[list[int]], image_index: int = -200) -> list[int]:
    """Their mm_utils.tokenizer_image_token, restated over already tokenised chunks: the prompt split on
    <image>, each chunk tokenised on its own (with the BOS a Llama tokenizer adds), the first chunk's BOS kept
    once, later chunks' dropped, and `image_index` between chunks."""
    offset = 1 if chunks and chunks[0] and chunks[0][0] == chunks[-1][0] else 0
    ids = [chunks[0][0]] if offset else []
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(image_index)
        ids.extend(chunk[offset:])
    return ids
