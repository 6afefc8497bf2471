"""Face-LLaVA's landmark pathway in PyTorch: the reference that `vision.onnx` is exported from and checked
against.

Facts taken from the paper (arXiv 2504.07198) and the public ihp-lab/Face-LLaVA repository:
- 68 landmarks (x, y) in the iBUG order, divided by the 256-px face crop's size, so in [0, 1].
- `landmarks_projector_type='landmarks_region_projector'`: nine regions, each flattened (x0, y0, x1, y1, ...)
  and projected by its own Linear(2n -> hidden): nine landmark tokens.
- `landmarks_projector_type='linear'` (the default of their train.py and of their config reader): one
  Linear(136 -> hidden) over all 68 flattened points: one landmark token.
- One global Linear(136 -> hidden) over all 68 points, added to each landmark token.
- "Simple" face-region guided cross-attention: the projected visual tokens are the queries, the landmark
  tokens (nine or one) the keys and values; 8-head attention with biases, then residual + LayerNorm, then a
  Linear. The result joins the visual tokens as `branch_scale * x + image_features`.
- `branch_scale` is a call argument of the repository's `LandmarkGuidedCrossAttention.forward` that its
  call site never passes, so the default applies: 0.1 at commit acecbec (0.001 only in two early commits,
  changed before the weights were released). It is a constructor argument here so that a checkpoint
  trained with another value can say so (`landmarks_branch_scale` in its config.json, our key).

Region names are ours and anatomical, with left/right the subject's own as in
`focalrt.runtime.faces.landmarks68` (iBUG 17-21 and 36-41 are the subject's right brow and eye).
"""

from __future__ import annotations

import torch
from torch import nn

NUM_LANDMARKS = 68
# (name, first iBUG index, one past the last), in the order the nine region tokens are stacked.
REGIONS: tuple[tuple[str, int, int], ...] = (
    ("jaw", 0, 17),
    ("right_brow", 17, 22),
    ("left_brow", 22, 27),
    ("nose_bridge", 27, 31),
    ("nose_base", 31, 36),
    ("right_eye", 36, 42),
    ("left_eye", 42, 48),
    ("outer_lips", 48, 60),
    ("inner_lips", 60, 68),
)
CROP_SIZE = 256  # the reference divides landmark pixels of its 256x256 face crops by this
CROSS_ATTENTION_HEADS = 8
# The authors' `landmarks_projector_type` values that we implement: nine region tokens, or one token.
REGION_PROJECTOR = "landmarks_region_projector"
LINEAR_PROJECTOR = "linear"
LANDMARK_PROJECTORS = (REGION_PROJECTOR, LINEAR_PROJECTOR)
REPOSITORY_BRANCH_SCALE = 0.1  # builder.py's default at acecbec


class LandmarkRegionProjector(nn.Module):
    """[B, 68, 2] normalised landmarks -> [B, 9, hidden]: one token per facial region."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.regions = nn.ModuleDict({name: nn.Linear(2 * (stop - start), hidden_size)
                                      for name, start, stop in REGIONS})

    def forward(self, landmarks: torch.Tensor) -> torch.Tensor:
        tokens = [self.regions[name](landmarks[:, start:stop].flatten(1)) for name, start, stop in REGIONS]
        return torch.stack(tokens, dim=1)


class LandmarkCrossAttention(nn.Module):
    """Visual tokens attend to the landmark tokens; the result is a small residual on the visual tokens."""

    def __init__(self, hidden_size: int, num_heads: int = CROSS_ATTENTION_HEADS,
                 branch_scale: float = REPOSITORY_BRANCH_SCALE):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {num_heads} attention heads")
        self.num_heads = num_heads
        self.branch_scale = float(branch_scale)
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, dim = x.shape
        return x.view(bsz, seq, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(self, image_features: torch.Tensor, landmark_tokens: torch.Tensor) -> torch.Tensor:
        bsz, seq, dim = image_features.shape
        q = self._heads(self.q_proj(image_features))
        k = self._heads(self.k_proj(landmark_tokens))
        v = self._heads(self.v_proj(landmark_tokens))
        scores = q @ k.transpose(-1, -2) * (dim // self.num_heads) ** -0.5
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(bsz, seq, dim)
        x = self.norm(image_features + self.o_proj(attended))
        return self.branch_scale * self.out_proj(x) + image_features


class FaceLandmarkPathway(nn.Module):
    """Landmark tokens (nine region tokens, or one token from a Linear over all points) plus the global
    landmark token, then the guided cross-attention onto the image."""

    def __init__(self, hidden_size: int, num_heads: int = CROSS_ATTENTION_HEADS,
                 branch_scale: float = REPOSITORY_BRANCH_SCALE, projector: str = REGION_PROJECTOR):
        super().__init__()
        if projector not in LANDMARK_PROJECTORS:
            raise ValueError(f"landmark projector {projector!r}: choose one of {LANDMARK_PROJECTORS}")
        self.projector = projector
        if projector == REGION_PROJECTOR:
            self.region_proj = LandmarkRegionProjector(hidden_size)
        else:
            self.token_proj = nn.Linear(2 * NUM_LANDMARKS, hidden_size)
        self.global_proj = nn.Linear(2 * NUM_LANDMARKS, hidden_size)
        self.cross_attn = LandmarkCrossAttention(hidden_size, num_heads, branch_scale)

    def landmark_tokens(self, landmarks: torch.Tensor) -> torch.Tensor:
        """[B, 68, 2] -> [B, 9, hidden] (region projector) or [B, 1, hidden] (linear projector)."""
        if landmarks.shape[-2:] != (NUM_LANDMARKS, 2):
            raise ValueError(f"landmarks must be [batch, 68, 2] (x, y in 0..1), got {tuple(landmarks.shape)}")
        flat = landmarks.flatten(1)
        tokens = self.region_proj(landmarks) if self.projector == REGION_PROJECTOR \
            else self.token_proj(flat).unsqueeze(1)
        return tokens + self.global_proj(flat).unsqueeze(1)

    def forward(self, image_features: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """Projected visual tokens [B, N, hidden] and normalised landmarks [B, 68, 2] -> [B, N, hidden]."""
        return self.cross_attn(image_features, self.landmark_tokens(landmarks))
