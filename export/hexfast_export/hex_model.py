"""HEX: MUSK image encoder + regression head → 40 virtual CODEX markers.

State-dict keys are those of the HEX reference model: `visual.beit3.*`
(the MUSK encoder), `regression_head.{0,3}.*` and `regression_head1.0.*`.
Dropout sits at the reference's indices (2 and 5) so the Linear layers keep
their checkpoint names; it is the identity in eval mode.

`embed_dim` (default: the encoder width) exists for hexfast's untrained demo
models: a narrow encoder whose CLS token is projected (`embed_proj`) to the
1024-d embedding the output contract promises. Real HEX has no projection.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from hexfast.markers import NUM_MARKERS

from .musk import MUSK_LARGE_384, MuskConfig, MuskVision

HEAD_HIDDEN = (256, 128)


class HexOutput(NamedTuple):
    markers: torch.Tensor  # [B, 40] regression outputs, in hexfast.markers.MARKERS order
    embedding: torch.Tensor  # [B, dim] CLS after the encoder's final LayerNorm (the MIL/MICA tile feature)
    features: torch.Tensor  # [B, 128] head features (input of the last Linear)


class HexModel(nn.Module):
    def __init__(self, cfg: MuskConfig = MUSK_LARGE_384, num_outputs: int = NUM_MARKERS, dropout: float = 0.5,
                 embed_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.visual = MuskVision(cfg)
        self.embed_dim = embed_dim or cfg.dim
        if self.embed_dim != cfg.dim:
            self.embed_proj = nn.Linear(cfg.dim, self.embed_dim)
        h1, h2 = HEAD_HIDDEN
        self.regression_head = nn.Sequential(
            nn.Linear(self.embed_dim, h1), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(h1, h2), nn.ReLU(), nn.Dropout(dropout),
        )
        self.regression_head1 = nn.Sequential(nn.Linear(h2, num_outputs))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,S,S] normalised → embedding [B, embed_dim] (the CLS token, projected in demo models)."""
        embedding = self.visual(images)
        proj = getattr(self, "embed_proj", None)
        return embedding if proj is None else proj(embedding)

    def forward_head(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.regression_head(embedding)
        return self.regression_head1(features), features

    def forward(self, images: torch.Tensor) -> HexOutput:
        """images: [B, 3, 384, 384], RGB scaled to [-1, 1] ((x/255 - 0.5) / 0.5)."""
        embedding = self.encode(images)
        markers, features = self.forward_head(embedding)
        return HexOutput(markers, embedding, features)
