"""Random-weight (untrained) models for demo bundles, seeded and deterministic.

`tiny`: the same input/output contract as the real models (uint8 tiles of any
size → markers [B,40] and a 1024-d embedding; CODEX grid → [40,384]; MICA on
[N,1024] + [40,384]; CLAM-style H&E features [B,1024]) around very small networks, so the whole bundle is a few
MB and a CPU scores hundreds of tiles per second. The encoders are narrow and
their CLS token is projected to the contract's width (HexModel.embed_proj,
ProjectedEncoder, ProjectedTrunc). `full`: the real architectures (MUSK large, DINOv2
ViT-S/14-reg4, MICA defaults, ResNet50 up to layer3) with random weights, for exercising the
full-size export and engines without the licensed checkpoints.

Outputs of these models mean nothing; manifests built from them say
`demo: true` and hexfast says so wherever their outputs appear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .dinov2 import DINOV2_VITS14_REG, Dinov2Config, Dinov2Encoder
from .hex_model import HexModel
from .mica import Mica, MicaConfig
from .musk import MUSK_LARGE_384, MuskConfig
from .resnet_trunc import FEATURE_DIM, RESNET50_TRUNC, ProjectedTrunc, ResNetTrunc, ResNetTruncConfig

SIZES = ("tiny", "full")
# Demo bundles patch MICA's bag as CLAM does with one preset change: a_t (the smallest tissue
# contour) 1 reference patch instead of 100, so demo slides and small regions (CMU-1-Small-Region:
# 1.1 x 1.5 mm, below CLAM's default minimum of 100 x 512² level-0 px) get a bag. Real exports
# keep CLAM's defaults unless --clam-preset says otherwise.
DEMO_CLAM_PATCHING = {"a_t": 1.0}
EMBED_DIM = 1024
CODEX_DIM = 384


@dataclass(frozen=True)
class DemoConfig:
    musk: MuskConfig
    dinov2: Dinov2Config
    mica: MicaConfig
    resnet: ResNetTruncConfig


DEMO_CONFIGS = {
    # 384 px input as the real model (the resize to 384 is part of the contract), patch 32 → 144 tokens.
    "tiny": DemoConfig(
        musk=MuskConfig(img_size=384, patch_size=32, dim=64, depth=2, heads=4, ffn_dim=128),
        dinov2=Dinov2Config(img_size=224, patch_size=14, dim=64, depth=1, heads=4, mlp_ratio=2.0),
        mica=MicaConfig(dim=32, transformer_heads=4, transformer_ffn=64),
        resnet=ResNetTruncConfig(layers=(1, 1, 1), width=8),
    ),
    "full": DemoConfig(musk=MUSK_LARGE_384, dinov2=DINOV2_VITS14_REG, mica=MicaConfig(), resnet=RESNET50_TRUNC),
}


class ProjectedEncoder(nn.Module):
    """A narrow encoder whose output is projected to `out_dim` (demo CODEX encoder: DINOv2 → 384)."""

    def __init__(self, encoder: nn.Module, out_dim: int):
        super().__init__()
        self.encoder = encoder
        self.cfg = encoder.cfg
        self.proj = nn.Linear(encoder.cfg.dim, out_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.encoder(images))


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Seeded random weights for every parameter, in name order (deterministic on one torch version).

    Biases N(0, 0.02); LayerNorm weights N(1, 0.1); LayerScale N(0.5, 0.1); matrices N(0, 1/fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias" or leaf.endswith("_bias"):
                p.normal_(0.0, 0.02, generator=gen)
            elif p.dim() == 1 and leaf == "gamma":
                p.normal_(0.5, 0.1, generator=gen)
            elif p.dim() == 1:
                p.normal_(1.0, 0.1, generator=gen)
            else:
                fan_in = p[0].numel()
                p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
    return module


def demo_models(size: str = "tiny", seed: int = 0) -> tuple[HexModel, nn.Module, Mica]:
    """(HEX, CODEX encoder, MICA) with seeded random weights, eval mode."""
    if size not in DEMO_CONFIGS:
        raise ValueError(f"demo size must be one of {', '.join(SIZES)}, not {size!r}")
    cfg = DEMO_CONFIGS[size]
    hex_model = randomise(HexModel(cfg.musk, embed_dim=EMBED_DIM), seed).eval()
    dino = Dinov2Encoder(cfg.dinov2)
    encoder = dino if cfg.dinov2.dim == CODEX_DIM else ProjectedEncoder(dino, CODEX_DIM)
    encoder = randomise(encoder, seed + 1).eval()
    mica = randomise(Mica(cfg.mica), seed + 2).eval()
    return hex_model, encoder, mica


def demo_he_features(size: str = "tiny", seed: int = 0) -> nn.Module:
    """The H&E feature model for MICA's CLAM bag (ResNet50-trunc layout), seeded random weights, eval mode."""
    cfg = DEMO_CONFIGS[size].resnet
    trunk = ResNetTrunc(cfg)
    model = trunk if cfg.out_dim == FEATURE_DIM else ProjectedTrunc(trunk, FEATURE_DIM)
    return randomise(model, seed + 3).eval()


def describe(size: str) -> dict:
    cfg = DEMO_CONFIGS[size]
    m, d, c, r = cfg.musk, cfg.dinov2, cfg.mica, cfg.resnet
    return {
        "hex": f"MUSK-style encoder {m.img_size} px, patch {m.patch_size}, dim {m.dim}, depth {m.depth}, "
               f"heads {m.heads}, ffn {m.ffn_dim}" + (f", CLS projected to {EMBED_DIM}" if m.dim != EMBED_DIM else ""),
        "codex_encoder": f"DINOv2-style encoder {d.img_size} px, patch {d.patch_size}, dim {d.dim}, depth {d.depth}, "
                         f"{d.num_registers} registers" + (f", CLS projected to {CODEX_DIM}" if d.dim != CODEX_DIM else ""),
        "mica": f"MICA dim {c.dim}, {c.transformer_heads} heads, FFN {c.transformer_ffn}, fusion {c.fusion}, "
                f"pooling {c.pooling}",
        "he_features": f"ResNet-trunc, blocks {list(r.layers)}, width {r.width}"
                       + (f", pooled {r.out_dim} projected to {FEATURE_DIM}" if r.out_dim != FEATURE_DIM else
                          " (ResNet50 up to layer3)"),
    }
