"""HEX: MUSK image encoder + regression head → 40 virtual CODEX markers.

State-dict keys are those of the HEX reference model: `visual.beit3.*`
(the MUSK encoder), `regression_head.{0,3}.*` and `regression_head1.0.*`.
Dropout sits at the reference's indices (2 and 5) so the Linear layers keep
their checkpoint names; it is the identity in eval mode.
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
    def __init__(self, cfg: MuskConfig = MUSK_LARGE_384, num_outputs: int = NUM_MARKERS, dropout: float = 0.5):
        super().__init__()
        self.cfg = cfg
        self.visual = MuskVision(cfg)
        h1, h2 = HEAD_HIDDEN
        self.regression_head = nn.Sequential(
            nn.Linear(cfg.dim, h1), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(h1, h2), nn.ReLU(), nn.Dropout(dropout),
        )
        self.regression_head1 = nn.Sequential(nn.Linear(h2, num_outputs))

    def forward_head(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.regression_head(embedding)
        return self.regression_head1(features), features

    def forward(self, images: torch.Tensor) -> HexOutput:
        """images: [B, 3, 384, 384], RGB scaled to [-1, 1] ((x/255 - 0.5) / 0.5)."""
        embedding = self.visual(images)
        markers, features = self.forward_head(embedding)
        return HexOutput(markers, embedding, features)
