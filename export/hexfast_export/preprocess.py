"""HEX input preprocessing as graph operations: uint8 NHWC tiles of any size → [B,3,384,384].

The reference feeds `transforms.Resize((384, 384))` a PIL image, i.e. PIL's
BILINEAR resize, then ToTensor (/255) and Normalize(0.5, 0.5). PIL's bilinear
is a separable triangle filter whose support widens by the scale factor when
shrinking (so a 448 → 384 resize is antialiased, a 224 → 384 or 112 → 384
resize is plain bilinear with align_corners=False), done as a horizontal pass,
a rounding to uint8, a vertical pass and a second rounding, with filter
coefficients in 22-bit fixed point.

`PilBilinearResize` reproduces that bit for bit: the [out, in] tap matrix is
built in-graph from the input size (so one ONNX graph serves 112, 224, 448 px
or anything else) with PIL's fixed-point coefficients (exact int64
arithmetic); each pass is a float32 matmul with the coefficients split into
bytes, which keeps every sum an exact integer, followed by PIL's integer
rounding. (A plain float32 matmul is not enough: with weights such as 7/24,
17/24 many sums sit within 1e-5 of a .5 tie that PIL's quantised
coefficients resolve downwards, so ~1% of pixels would come out one level
high.) A same-size "resize" is exactly the identity, so
tiles the C++ TileStream already resized to 384 pass through unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

PIL_PRECISION = 1 << 22
HEX_INPUT = 384


def pil_bilinear_taps(ones: torch.Tensor, out_size: int) -> torch.Tensor:
    """[out_size, n] PIL's fixed-point bilinear coefficients (integers, as float32) for n input pixels.

    `ones` is an int64 vector of n ones taken from the input, so n stays a
    graph value. With c_i = (i + 0.5) * n / out, PIL's tap weight for input
    pixel j is the triangle 1 - |j + 0.5 - c_i| / max(n / out, 1); scaled by
    2 * max(n, out) * out that is the integer
    N_ij = max(0, 2 * max(n, out) - |(2j + 1) * out - (2i + 1) * n|),
    and PIL's coefficient is round(N_ij / sum_j N_ij * 2^22), computed here
    exactly in int64 (half rounds up, as PIL's (int)(x + 0.5)).
    """
    n = ones.sum()
    j = ones.cumsum(0) - 1  # 0..n-1
    i = torch.arange(out_size, dtype=torch.int64, device=ones.device)
    reach = 2 * torch.clamp(n, min=out_size)
    num = torch.clamp(reach - ((2 * j + 1).unsqueeze(0) * out_size - (2 * i + 1).unsqueeze(1) * n).abs(), min=0)
    total = num.sum(dim=1, keepdim=True)
    coef = torch.div(num * (2 * PIL_PRECISION) + total, 2 * total, rounding_mode="floor")
    return coef.to(torch.float32)


def _byte_planes(coef: torch.Tensor) -> torch.Tensor:
    """[out, n] integer coefficients (< 2^23) → [3 * out, n]: the bytes c2, c1, c0 of c = c2*2^16 + c1*2^8 + c0."""
    c2 = torch.floor(coef / 65536.0)
    rest = coef - c2 * 65536.0
    c1 = torch.floor(rest / 256.0)
    return torch.cat((c2, c1, rest - c1 * 256.0), dim=0)


def _fixed_point_round(sums: torch.Tensor, out_size: int, dim: int) -> torch.Tensor:
    """PIL's clip8((sum c*p + 2^21) >> 22) from the three byte-plane sums along `dim`, exactly in float32.

    With s = s2*2^16 + s1*2^8 + s0: floor((s + 2^21) / 2^22)
    = floor((s2 + floor((s1 + floor((s0 + 2^21) / 2^8)) / 2^8)) / 2^6); every intermediate is an
    integer below 2^24, so float32 holds it exactly.
    """
    s2, s1, s0 = sums.split(out_size, dim=dim)
    carry = torch.floor((s0 + float(PIL_PRECISION // 2)) / 256.0)
    carry = torch.floor((s1 + carry) / 256.0)
    return torch.clamp(torch.floor((s2 + carry) / 64.0), 0.0, 255.0)


class PilBilinearResize(nn.Module):
    """[B, C, H, W] float holding uint8 values → [B, C, size, size], bit-exact with PIL's BILINEAR resize.

    Each pass multiplies by the byte planes of PIL's integer coefficients:
    products of two 8-bit integers summed over the few nonzero taps stay below
    2^24, so the float32 (or TF32/bf16-input) matmul is exact, and the
    rounding is PIL's integer rounding. Keep this block in float32 when
    building reduced-precision engines (fp16 cannot hold the sums).
    """

    def __init__(self, size: int = HEX_INPUT):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Input sizes as tensors (vectors of ones), so ONNX export keeps them dynamic.
        wx = _byte_planes(pil_bilinear_taps(torch.ones_like(x[0, 0, 0, :], dtype=torch.int64), self.size))
        wy = _byte_planes(pil_bilinear_taps(torch.ones_like(x[0, 0, :, 0], dtype=torch.int64), self.size))
        x = _fixed_point_round(torch.matmul(x, wx.transpose(0, 1)), self.size, dim=3)  # horizontal: [B,C,H,size]
        return _fixed_point_round(torch.matmul(wy, x), self.size, dim=2)  # vertical: [B,C,size,size]


class HexPreprocess(nn.Module):
    """uint8 [B, H, W, 3] RGB → float [B, 3, 384, 384] in [-1, 1] ((x/255 - 0.5) / 0.5)."""

    def __init__(self, size: int = HEX_INPUT):
        super().__init__()
        self.resize = PilBilinearResize(size)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        x = tiles.permute(0, 3, 1, 2).to(torch.float32)
        x = self.resize(x)
        return (x / 255.0 - 0.5) / 0.5
