"""MUSK vision encoder: the BEiT-3 multiway transformer, image path only.

MUSK (Xiang et al., Nature 2025) is a BEiT-3 model built with torchscale:
every encoder sub-layer is a "multiway" pair of experts, `A` for image tokens
and `B` for text tokens. An image-only forward touches the `A` experts only, so
this module holds exactly those weights, under MUSK's own state-dict names
(`beit3.encoder.layers.{i}.self_attn.q_proj.A.weight`, ...), and leaves the
text embedding and `B` experts out.

Architecture (MUSK large, `musk_large_patch16_384`):

* patch embedding: Conv2d 16x16 stride 16 → 24x24 = 576 tokens, CLS prepended
  (577 tokens); no embedding LayerNorm, no embedding scale.
* positions: one learned table of 579 rows (`embed_positions.A.weight`);
  following fairseq, positions start at 2, so CLS gets row 2 and patch k
  (row-major) gets row 3 + k. Rows 0 and 1 are never read.
* 24 pre-LN layers with sub-LN (Magneto): an extra LayerNorm on the attention
  output before `out_proj` (`inner_attn_ln`) and one on the FFN hidden state
  before `fc2` (`ffn_layernorm`). LayerNorm eps 1e-5, exact (erf) GELU,
  q scaled by head_dim**-0.5 right after its projection.
* final LayerNorm (`encoder.layer_norm`), then HEX reads token 0 (CLS):
  no vision head, no L2 normalisation.

Since only CLS is read, `forward` runs the last layer for CLS alone: its
keys and values still come from every token, but the query, output
projection and FFN of the other 576 tokens (3.5 % of MUSK-L's FLOPs) would
only be thrown away. `forward_features` runs every token through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MuskConfig:
    """Shape of the encoder. The defaults are MUSK large at 384 px."""

    img_size: int = 384
    patch_size: int = 16
    in_chans: int = 3
    dim: int = 1024
    depth: int = 24
    heads: int = 16
    ffn_dim: int = 4096
    eps: float = 1e-5

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_positions(self) -> int:
        """Rows of the position table: CLS + patches + the two fairseq offset rows."""
        return self.num_patches + 1 + POSITION_OFFSET

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")


MUSK_LARGE_384 = MuskConfig()

#: fairseq convention kept by torchscale: the first position index is 2.
POSITION_OFFSET = 2


class Expert(nn.Module):
    """Holds the vision ("A") expert of a torchscale multiway pair, so the
    parameter names carry the `.A.` that MUSK checkpoints use."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.A = module

    def forward(self, x):
        return self.A(x)


class VisionEmbed(nn.Module):
    def __init__(self, cfg: MuskConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)  # [B, P, D], row-major patches
        return torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: MuskConfig):
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.dim // cfg.heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj = Expert(nn.Linear(cfg.dim, cfg.dim))
        self.k_proj = Expert(nn.Linear(cfg.dim, cfg.dim))
        self.v_proj = Expert(nn.Linear(cfg.dim, cfg.dim))
        self.out_proj = Expert(nn.Linear(cfg.dim, cfg.dim))
        self.inner_attn_ln = Expert(nn.LayerNorm(cfg.dim, eps=cfg.eps))

    def forward(self, x: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """x [B, N, dim] → [B, N, dim], or [B, 1, dim] for the CLS query alone (`cls_only`)."""
        b, _, d = x.shape
        q = self.q_proj(x[:, :1] if cls_only else x) * self.scaling
        k = self.k_proj(x)
        v = self.v_proj(x)
        q, k, v = (t.view(b, -1, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        # q is already scaled (as torchscale does), so the kernel must not scale again.
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        out = out.transpose(1, 2).reshape(b, -1, d)
        return self.out_proj(self.inner_attn_ln(out))


class FeedForward(nn.Module):
    def __init__(self, cfg: MuskConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.ffn_layernorm = nn.LayerNorm(cfg.ffn_dim, eps=cfg.eps)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: MuskConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.self_attn_layer_norm = Expert(nn.LayerNorm(cfg.dim, eps=cfg.eps))
        self.ffn = Expert(FeedForward(cfg))
        self.final_layer_norm = Expert(nn.LayerNorm(cfg.dim, eps=cfg.eps))

    def forward(self, x: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """x [B, N, dim] → [B, N, dim], or [B, 1, dim]: the CLS token alone (`cls_only`)."""
        x = (x[:, :1] if cls_only else x) + self.self_attn(self.self_attn_layer_norm(x), cls_only)
        return x + self.ffn(self.final_layer_norm(x))


class PositionTable(nn.Module):
    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, dim))


class Encoder(nn.Module):
    def __init__(self, cfg: MuskConfig):
        super().__init__()
        self.embed_positions = Expert(PositionTable(cfg.num_positions, cfg.dim))
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.depth))
        self.layer_norm = Expert(nn.LayerNorm(cfg.dim, eps=cfg.eps))

    def forward(self, tokens: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """tokens [B, N, dim] → every token after the final LayerNorm, or CLS alone [B, 1, dim]."""
        n = tokens.shape[1]
        x = tokens + self.embed_positions.A.weight[POSITION_OFFSET:POSITION_OFFSET + n]
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, cls_only and i == last)
        return self.layer_norm(x)


class BEiT3Vision(nn.Module):
    def __init__(self, cfg: MuskConfig):
        super().__init__()
        self.vision_embed = VisionEmbed(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, images: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        return self.encoder(self.vision_embed(images), cls_only)


class MuskVision(nn.Module):
    """MUSK image encoder. State-dict keys are MUSK's (`beit3.*`).

    forward(images [B,3,S,S] normalised) → CLS after the final LayerNorm [B, dim] (last layer: CLS only).
    forward_features(images) → every token after the final LayerNorm [B, 1+P, dim].
    """

    def __init__(self, cfg: MuskConfig = MUSK_LARGE_384):
        super().__init__()
        self.cfg = cfg
        self.beit3 = BEiT3Vision(cfg)
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """Random weights (for tests and untrained demos); real use loads a checkpoint."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.02, generator=gen)
                elif "layer_norm" in name or "layernorm" in name or "inner_attn_ln" in name:
                    p.normal_(1.0, 0.1, generator=gen)
                else:
                    fan_in = p[0].numel() if p.dim() > 1 else p.shape[-1]
                    p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.beit3(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.beit3(images, cls_only=True)[:, 0]
