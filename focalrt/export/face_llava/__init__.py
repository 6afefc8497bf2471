"""Face-LLaVA export: CLIP tower + mlp2x_gelu projector + landmark pathway, token embedding, Llama decoder,
and, for a model with one, the LanguageBind video tower (`focalrt.export.face_llava.video_tower`) at its fixed
frame count through the same projector and pathway.

The reference model is transformers' `LlavaForConditionalGeneration` (CLIP vision tower, penultimate
layer, class token dropped, two-layer GELU projector, Llama decoder) plus our landmark pathway
(`face_llava_modules`). Each exported component is checked against it right after export, as the Qwen
export does. The decoder uses the same GroupQueryAttention in-place KV cache as the Qwen2.5-VL one, with
plain RoPE and 1D position ids [B, S].

Real checkpoints use the Face-LLaVA (Video-LLaVA / LLaVA) parameter names; `convert_face_llava_state_dict`
maps them onto ours and `to_original_face_llava_state_dict` back.

The package follows the file's old sections: `model` (configs, presets, the PyTorch reference), `checkpoint`
(names and loading), `tokenizer`, `components` (export wrappers, validated) and `bundle` (the family interface
that `focalrt.export.build.export_bundle` drives).
"""


from focalrt.export.face_llava.bundle import (
    FAMILY,
    export_options,
    load_source,
    manifest_sections,
    write_bundle_tokenizer,
)
from focalrt.export.face_llava.checkpoint import (
    convert_face_llava_state_dict,
    load_face_llava_checkpoint,
    to_original_face_llava_state_dict,
)
from focalrt.export.face_llava.components import (
    VideoEncoder,
    VisionEncoder,
    export_decoder,
    export_video,
    export_vision,
    image_token_count,
)
from focalrt.export.face_llava.model import (
    BOS_TOKEN,
    DEFAULT_MAX_CONTEXT,
    EOS_TOKEN,
    FACE_LLAVA_PROMPT,
    IMAGE_MEAN,
    IMAGE_STD,
    IMAGE_TOKEN,
    LLAVA_V1_SYSTEM,
    PRESET_IMAGE_TOKEN_ID,
    PRESET_VOCAB_SIZE,
    PRESETS,
    VIDEO_FRAMES,
    FaceLlava,
    build_random_model,
)
from focalrt.export.face_llava.tokenizer import build_preset_tokenizer, write_face_llava_tokenizer

__all__ = [
    "FAMILY", "export_options", "load_source", "manifest_sections", "write_bundle_tokenizer",
    "BOS_TOKEN", "DEFAULT_MAX_CONTEXT", "EOS_TOKEN", "FACE_LLAVA_PROMPT", "IMAGE_MEAN", "IMAGE_STD", "IMAGE_TOKEN",
    "LLAVA_V1_SYSTEM", "PRESETS", "PRESET_IMAGE_TOKEN_ID", "PRESET_VOCAB_SIZE", "VIDEO_FRAMES",
    "FaceLlava", "VideoEncoder", "VisionEncoder", "build_preset_tokenizer", "build_random_model",
    "convert_face_llava_state_dict", "export_decoder", "export_video", "export_vision",
    "image_token_count", "load_face_llava_checkpoint", "to_original_face_llava_state_dict",
    "write_face_llava_tokenizer",
]
