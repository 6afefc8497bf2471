"""LanguageBind's video tower (as Face-LLaVA uses it) in PyTorch: the reference `video.onnx` is exported from
and checked against.

Written from the facts of the public LanguageBind / ihp-lab/Face-LLaVA code (`languagebind/video/
modeling_video.py`, `LanguageBindVideoTower` in `languagebind/__init__.py`), not from its text:
- A CLIP ViT (`vision_model`: embeddings, `pre_layrnorm`, encoder layers, `post_layernorm`) whose config has
  `add_time_attn=True` and `num_frames` (8 for LanguageBind_Video_merge). Frames of a clip are stacked as
  [(clips frames), 3, S, S], frame-major within each clip.
- Every encoder layer first mixes over time. On hidden [(b t), n, d]: regroup as [(b n), t, d], add the
  layer's own `temporal_embedding` (its first t rows), regroup back; that sum is the residual; the temporal
  branch is `temporal_layer_norm1` then `temporal_attn` (a CLIP attention: q/k/v/out projections with biases,
  scale head_dim^-0.5, no mask) over the t frames of each token position; residual + branch. Then the plain
  CLIP layer: `layer_norm1`, `self_attn`, residual, `layer_norm2`, `mlp`, residual.
- Patch dropout is off at inference; `post_layernorm` only feeds the pooled output, which Face-LLaVA never
  uses.
- Face-LLaVA selects `hidden_states[-2]` (the output of all but the last layer) and keeps every token, the
  class token too: [frames, 257, hidden] at 224 px / patch 14.

Parameter names mirror LanguageBind's `vision_model.*`, so a LanguageBind_Video_merge state dict loads with
the `vision_model.` prefix stripped.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_NUM_FRAMES = 8  # LanguageBind_Video_merge
FEATURE_LAYER = -2  # Face-LLaVA's mm_vision_select_layer, for the image and the video tower alike


def _clip_config(config):
    """A copy of a CLIPVisionConfig whose attention is the plain eager one (exports to ONNX as is)."""
    config = config.__class__.from_dict(config.to_dict())
    config._attn_implementation = "eager"
    return config


class VideoEncoderLayer(nn.Module):
    """One LanguageBind video encoder layer: attention over time at each token position, then CLIP's layer."""

    def __init__(self, config, num_frames: int):
        super().__init__()
        from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

        dim, eps = config.hidden_size, config.layer_norm_eps
        self.num_frames = num_frames
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.temporal_embedding = nn.Parameter(torch.zeros(1, num_frames, dim))
        self.temporal_attn = CLIPAttention(config)
        self.temporal_layer_norm1 = nn.LayerNorm(dim, eps=eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[(clips frames), tokens, dim] -> the same shape."""
        bt, n, d = hidden.shape
        t = self.num_frames
        # [(b t), n, d] -> [(b n), t, d]: each token position of a clip sees its t frames
        over_time = hidden.view(bt // t, t, n, d).transpose(1, 2).reshape(-1, t, d)
        over_time = over_time + self.temporal_embedding[:, :t]
        residual = over_time
        attended = self.temporal_attn(self.temporal_layer_norm1(over_time))[0]
        over_time = residual + attended
        hidden = over_time.view(bt // t, n, t, d).transpose(1, 2).reshape(bt, n, d)

        hidden = hidden + self.self_attn(self.layer_norm1(hidden))[0]
        return hidden + self.mlp(self.layer_norm2(hidden))


class VideoEncoder(nn.Module):
    """Holds the layers under `encoder.layers`, as LanguageBind's names do."""

    def __init__(self, config, num_frames: int):
        super().__init__()
        self.layers = nn.ModuleList([VideoEncoderLayer(config, num_frames)
                                     for _ in range(config.num_hidden_layers)])


class LanguageBindVideoTower(nn.Module):
    """pixel_values [(clips frames), 3, S, S] -> the selected layer's hidden states
    [(clips frames), 1 + patches, hidden], class token first."""

    def __init__(self, config, num_frames: int = DEFAULT_NUM_FRAMES, feature_layer: int = FEATURE_LAYER):
        super().__init__()
        from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

        if num_frames < 1:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        if not -config.num_hidden_layers - 1 <= feature_layer <= config.num_hidden_layers:
            raise ValueError(f"feature layer {feature_layer} is outside the tower's {config.num_hidden_layers} layers")
        self.config = _clip_config(config)
        self.num_frames = num_frames
        self.feature_layer = feature_layer
        self.embeddings = CLIPVisionEmbeddings(self.config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = VideoEncoder(self.config, num_frames)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # unused for features

    @property
    def tokens_per_frame(self) -> int:
        return self.embeddings.num_positions

    @property
    def layers_used(self) -> int:
        """How many layers the selected hidden state has passed through (the later ones are never needed)."""
        count = len(self.encoder.layers)
        return count + 1 + self.feature_layer if self.feature_layer < 0 else self.feature_layer

    def hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The input of every layer and the last output, as `output_hidden_states=True` gives them."""
        if pixel_values.shape[0] % self.num_frames:
            raise ValueError(f"the video tower takes clips of {self.num_frames} frames; got "
                             f"{pixel_values.shape[0]} frames")
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [hidden]
        for layer in self.encoder.layers:
            hidden = layer(hidden)
            states.append(hidden)
        return states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.hidden_states(pixel_values)[self.feature_layer]


def random_video_tower(config, num_frames: int, seed: int) -> LanguageBindVideoTower:
    """A random-weight tower from its own generator, leaving the global RNG as it was (so that adding a video
    tower to a preset changes none of its other weights).

    Every parameter is random, LayerNorm gains and biases too, so that parity tests tell the two norms of a
    layer apart and see the biases; weights are scaled by fan-in so activations stay near unit size.
    """
    with torch.random.fork_rng(devices=[]):
        tower = LanguageBindVideoTower(config, num_frames)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(tower.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if isinstance(tower.get_submodule(name.rsplit(".", 1)[0]), nn.LayerNorm):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif p.dim() == 1:  # biases and the class embedding
                p.copy_(0.02 * noise if name.endswith("bias") else noise * p.numel() ** -0.5)
            elif name.endswith(("temporal_embedding", "position_embedding.weight")):
                p.copy_(noise * p.shape[-1] ** -0.5)
            else:  # Linear [out, in] and the patch Conv2d [out, in, k, k]
                p.copy_(noise * p[0].numel() ** -0.5)
    return tower.eval()
