"""CLAM's default H&E feature extractor, `resnet50_trunc`, in plain torch: MICA's tile features.

What CLAM runs (mahmoodlab/CLAM, models/builder.py `get_encoder('resnet50_trunc')` →
models/timm_wrapper.py `TimmCNNEncoder`; read, not copied): timm's `resnet50.tv_in1k`
(torchvision's ImageNet ResNet50 weights) created with `features_only=True, out_indices=(3,)`,
i.e. the stem and layer1..layer3 (stride 16, 1024 channels), then AdaptiveAvgPool2d(1) → [B, 1024].
The eval transforms (utils/transform_utils.py, utils/constants.py) are torchvision's
Resize(224) on the 256-px PIL patch (Pillow's BILINEAR), ToTensor, Normalize(ImageNet mean/std).

`ResNetTrunc` is that network with torchvision's parameter names (timm's resnet50 uses the
same ones): conv1 7x7/2, bn1, ReLU, maxpool 3x3/2, then bottleneck blocks (1x1, 3x3 with the
stride, 1x1 to 4x width; a 1x1/stride `downsample` conv + BN on each layer's first block), every
BatchNorm in eval mode (running statistics, eps 1e-5). `HeFeatureGraph` puts the preprocessing in
front of it: uint8 NHWC tiles of any size → PIL-exact bilinear resize to 224 → /255 → ImageNet
normalisation → ResNetTrunc → features [B, 1024] float32.

A demo bundle's `tiny` variant keeps the block structure with one block per layer and width 8
(128 channels), projected to 1024 so MICA's contract holds (demo.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .codex_preprocess import IMAGENET_MEAN, IMAGENET_STD
from .preprocess import PilBilinearResize

TARGET_PATCH_SIZE = 224  # extract_features_fp.py --target_patch_size default
FEATURE_DIM = 1024
EXPANSION = 4


@dataclass(frozen=True)
class ResNetTruncConfig:
    layers: tuple[int, ...] = (3, 4, 6)  # ResNet50's layer1..layer3 (layer4 and fc are cut off)
    width: int = 64  # channels of the stem; layer i has width * 2^i bottleneck channels

    @property
    def out_dim(self) -> int:
        return self.width * 2 ** (len(self.layers) - 1) * EXPANSION


RESNET50_TRUNC = ResNetTruncConfig()


class FrozenBatchNorm(nn.Module):
    """BatchNorm2d in eval mode, torchvision's parameter names (no num_batches_tracked: never read)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        out = planes * EXPANSION
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = FrozenBatchNorm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = FrozenBatchNorm(out)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                            FrozenBatchNorm(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNetTrunc(nn.Module):
    """[B, 3, H, W] normalised images → [B, out_dim]: ResNet stem + layer1..layerN, average-pooled."""

    def __init__(self, cfg: ResNetTruncConfig = RESNET50_TRUNC):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv2d(3, cfg.width, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm(cfg.width)
        inplanes = cfg.width
        for i, blocks in enumerate(cfg.layers):
            planes = cfg.width * 2 ** i
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(inplanes, planes, 2 if (i > 0 and b == 0) else 1))
                inplanes = planes * EXPANSION
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        for i in range(len(self.cfg.layers)):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.mean(dim=(2, 3))  # AdaptiveAvgPool2d(1) + squeeze


class ProjectedTrunc(nn.Module):
    """A narrow ResNetTrunc projected to `out_dim` (the demo's tiny feature model)."""

    def __init__(self, trunk: ResNetTrunc, out_dim: int = FEATURE_DIM):
        super().__init__()
        self.trunk = trunk
        self.cfg = trunk.cfg
        self.proj = nn.Linear(trunk.cfg.out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(x))


class HeFeaturePreprocess(nn.Module):
    """uint8 NHWC tiles of any size → [B, 3, 224, 224] as CLAM's eval transforms make them: Pillow-exact
    BILINEAR resize (torchvision's Resize(224) on a PIL patch), ToTensor (/255), ImageNet Normalize."""

    def __init__(self, size: int = TARGET_PATCH_SIZE):
        super().__init__()
        self.resize = PilBilinearResize(size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        x = self.resize(tiles.permute(0, 3, 1, 2).to(torch.float32))
        return (x / 255.0 - self.mean) / self.std


class HeFeatureGraph(nn.Module):
    """tiles uint8 [B, H, W, 3] (CLAM's 256-px patches) → features [B, 1024] float32: what the
    bundle's he_features ONNX file and torch program compute."""

    def __init__(self, encoder: nn.Module, size: int = TARGET_PATCH_SIZE):
        super().__init__()
        self.preprocess = HeFeaturePreprocess(size)  # the name keeps it float32 in fp16 conversions
        self.encoder = encoder

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.preprocess(tiles))


def resnet_trunc_state(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A ResNet50 state dict in any layout users have — torchvision's `resnet50` or timm's
    `resnet50.tv_in1k` (same names), CLAM's TimmCNNEncoder (`model.` prefix, features_only: no
    layer4/fc) — as ResNetTrunc's keys; returns them and the notes of what was done."""
    notes = []
    if tensors and all(k.startswith("model.") for k in tensors):
        tensors = {k[len("model."):]: v for k, v in tensors.items()}
        notes.append("'model.' prefix stripped (CLAM TimmCNNEncoder layout)")
    return tensors, notes


TRUNC_IGNORED = (r"^layer4\.", r"^fc\.", r"\.num_batches_tracked$")  # cut off by the truncation; never read


def load_resnet50_trunc(path: str | os.PathLike):
    """ResNetTrunc (ResNet50 up to layer3) from a local ResNet50 weights file; (model, LoadReport)."""
    from .checkpoints import assign, read_state_dict

    tensors, notes = resnet_trunc_state(read_state_dict(path))
    model = ResNetTrunc(RESNET50_TRUNC)
    report = assign(model, tensors, os.fspath(path), ignored=TRUNC_IGNORED)
    report.notes.extend(notes)
    return model.eval(), report
