"""CODEX channel encoder: DINOv2 ViT-S/14 with 4 register tokens.

The HEX/MICA reference encodes each virtual CODEX channel image (224x224,
3 identical channels, ImageNet mean/std) with `dinov2_vits14_reg` from the
facebookresearch/dinov2 hub and keeps the CLS token after the final norm
(the hub model's head is the identity) → 384-d.

Architecture: patch embedding Conv2d 14x14 stride 14 (224 → 16x16 patches),
CLS prepended, positional embedding added to CLS + patches, then the 4
register tokens inserted right after CLS (registers get no position); 12
pre-LN blocks `x + ls1(attn(norm1(x)))`, `x + ls2(mlp(norm2(x)))` with
LayerNorm eps 1e-6, qkv with bias, scale head_dim**-0.5, exact GELU MLP
(ratio 4), LayerScale; final `norm`.

Positional embedding: the checkpoint holds a table for 518 px training
(1 + 37x37 rows). DINOv2 resizes it for every forward; for a fixed 224 input
that is a constant, so hexfast resizes it once when loading
(`resize_pos_embed`), reproducing the published `interpolate_pos_encoding`
with the hub settings of the register models (`interpolate_antialias=True`,
`interpolate_offset=0.0`): the patch part is reshaped to [1, dim, 37, 37],
resized with `F.interpolate(mode="bicubic", antialias=True,
size=(16, 16))` (align_corners=False, since the offset is 0 the `size=`
branch is taken, not the `scale_factor=(w0+0.1)/M` kludge of the non-register
models) in float32, and the CLS row is kept as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Dinov2Config:
    img_size: int = 224  # the input hexfast feeds (the reference resizes to 224)
    patch_size: int = 14
    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    num_registers: int = 4
    eps: float = 1e-6
    # How the published model resizes its position table (dinov2_vits14_reg).
    interpolate_antialias: bool = True
    interpolate_offset: float = 0.0

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)


DINOV2_VITS14_REG = Dinov2Config()


def resize_pos_embed(pos_embed: torch.Tensor, grid: int, *, antialias: bool = True, offset: float = 0.0) -> torch.Tensor:
    """[1, 1+M*M, D] table → [1, 1+grid*grid, D], as DINOv2's interpolate_pos_encoding does.

    Returns the table unchanged when it already has grid*grid patches.
    """
    n = pos_embed.shape[1] - 1
    m = int(round(math.sqrt(n)))
    if m * m != n:
        raise ValueError(f"pos_embed holds {n} patch rows, not a square grid")
    if m == grid:
        return pos_embed
    dtype = pos_embed.dtype
    table = pos_embed.float()
    cls, patches = table[:, :1], table[:, 1:]
    dim = table.shape[-1]
    kwargs = {"scale_factor": ((grid + offset) / m, (grid + offset) / m)} if offset else {"size": (grid, grid)}
    patches = F.interpolate(patches.reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic",
                            antialias=antialias, **kwargs)
    if tuple(patches.shape[-2:]) != (grid, grid):
        raise RuntimeError(f"position resize gave {tuple(patches.shape[-2:])}, expected {(grid, grid)}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat((cls, patches), dim=1).to(dtype)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: Dinov2Config):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: Dinov2Config):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # scale head_dim**-0.5
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, cfg: Dinov2Config):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, cfg: Dinov2Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = Mlp(cfg)
        self.ls2 = LayerScale(cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Dinov2Encoder(nn.Module):
    """DINOv2 ViT with registers, for a fixed input size.

    `pos_embed` holds the table already resized to `cfg.grid` (see
    `resize_pos_embed`); the loader does that from the 518-px checkpoint table.
    forward(images [B,3,224,224] ImageNet-normalised) → CLS after `norm` [B, dim].
    """

    def __init__(self, cfg: Dinov2Config = DINOV2_VITS14_REG):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid * cfg.grid, cfg.dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_registers, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """Random weights (tests, untrained demos)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.02, generator=gen)
                elif "norm" in name or name.endswith("gamma"):
                    p.normal_(1.0 if "norm" in name else 0.5, 0.1, generator=gen)
                else:
                    fan_in = p[0].numel() if p.dim() > 1 else p.shape[-1]
                    p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)[:, 0]
