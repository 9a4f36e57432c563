"""CODEX-encoder input preprocessing as graph operations: virtual CODEX grid [40, gh, gw] → [40,3,224,224].

What the reference does (lilab-stanford/HEX, mica/codex_h5_png2fea.py, read
to understand, not copied): the grid is a float16 array [gh, gw, 40]; each
channel is stacked to 3 identical channels, turned into a uint8 PIL RGB
image, and `transforms.Resize((224, 224), interpolation=3)` is applied —
on a PIL image that is Pillow's `Image.resize(BICUBIC)` (Keys cubic,
a = -0.5, support 2, widened by the scale factor when shrinking, i.e.
antialiased), done as a horizontal then a vertical pass over uint8 with
22-bit fixed-point coefficients, each pass rounding and clipping to uint8.
Then ToTensor (/255) and ImageNet Normalize, and DINOv2 ViT-S/14-reg4.

Pass order: every Pillow up to 12 (what the reference ran: pillow 11.0.0 in
its README) does the horizontal pass first; Pillow 13 does the vertical pass
first when the height shrinks much more than the width (for a 224x224 target:
gh > 224, gw != 224 and gh + 224 > 2 gw, found by probing Pillow 13.0), which
changes 42 % of the uint8 values of a 300 x 260 grid by a level or so and the
DINOv2 features by ~3e-3. `resize_order` picks one: "pillow12" (default, the
reference's) or "pillow13" (for a MICA trained on features made with Pillow
13); the manifest records which.

`PilBicubicResize` reproduces Pillow bit for bit, like the bilinear resize
of the HEX graph (preprocess.py): the tap matrix is built in-graph from the
grid size with exact integer arithmetic and each pass is a float32 matmul
with byte-split coefficients whose sums stay exact integers.

Exact coefficients: Pillow evaluates the cubic at t = (j + 0.5 - c_i) * s
with c_i = (i + 0.5) * n / out and s = min(out / n, 1), i.e. at t = p / q
with p = (2j + 1) * out - (2i + 1) * n and q = 2 * max(n, out). With
a = -0.5 the kernel is (3|t|^3 - 5t^2 + 2) / 2 for |t| < 1 and
-(|t|^3 - 5t^2 + 8|t| - 4) / 2 for 1 <= |t| < 2, so 2 q^3 w = N is the
integer 3|p|^3 - 5p^2 q + 2q^3, resp. -(|p|^3 - 5p^2 q + 8|p| q^2 - 4q^3).
Pillow's coefficient is w_j / sum(w) scaled by 2^22 and rounded half away
from zero (it does that in double precision; here it is exact in int64, so
the two agree except where a coefficient sits within double rounding of a
.5 tie; the tests compare with Pillow over many grid sizes). int64 holds
2^23 * 2 q^3 for q < 8190, i.e. grids up to 4095 cells a side (a 917k px
wide slide at 40x), far beyond any slide.

The 8-bit step: `uint8 = rint(clip(float16(x), 0, 1) * 255)`, after rounding
the grid to float16 as the reference stores it: what the official script does
today (`(np.clip(channel, 0, 1) * 255).round().astype(np.uint8)`, also
DESIGN.md's contract), bit-exact. Its first commit cast the float16
predictions to uint8 directly (`astype('uint8')`, truncation), which sends
every HEX prediction in [0, 1) to 0; `quantisation="truncate"` reproduces that
(clip(trunc(float16(x)), 0, 255)) for a MICA checkpoint trained on features
made with that first version.
"""

from __future__ import annotations

import torch
from torch import nn

from .preprocess import PIL_PRECISION, _byte_planes, _fixed_point_round

CODEX_INPUT = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
QUANTISATIONS = ("scale", "truncate")
RESIZE_ORDERS = ("pillow12", "pillow13")
MAX_GRID_SIDE = 4095  # exact int64 coefficient arithmetic up to this many cells per side


def pil_bicubic_taps(ones: torch.Tensor, out_size: int) -> torch.Tensor:
    """[out_size, n] Pillow's fixed-point bicubic coefficients (signed integers, as float32) for n inputs.

    `ones`: an int64 vector of n ones taken from the input, so n stays a graph value.
    """
    n = ones.sum()
    j = ones.cumsum(0) - 1  # 0..n-1
    i = torch.arange(out_size, dtype=torch.int64, device=ones.device)
    q = 2 * torch.clamp(n, min=out_size)
    p = ((2 * j + 1).unsqueeze(0) * out_size - (2 * i + 1).unsqueeze(1) * n).abs()  # [out, n], |p|
    p2 = p * p
    q2 = q * q
    inner = 3 * p2 * p - 5 * p2 * q + 2 * q2 * q  # |t| < 1
    outer = -(p2 * p - 5 * p2 * q + 8 * p * q2 - 4 * q2 * q)  # 1 <= |t| < 2
    num = torch.where(p < q, inner, torch.where(p < 2 * q, outer, torch.zeros_like(p)))
    total = num.sum(dim=1, keepdim=True)  # > 0
    mag = torch.div(num.abs() * (2 * PIL_PRECISION) + total, 2 * total, rounding_mode="floor")
    coef = torch.where(num < 0, -mag, mag)  # round half away from zero, as Pillow's (int)(x ± 0.5)
    return coef.to(torch.float32)


class PilBicubicResize(nn.Module):
    """[B, C, H, W] float holding uint8 values → [B, C, size, size], bit-exact with Pillow's BICUBIC resize.

    Same scheme as PilBilinearResize: byte planes of the (signed) integer
    coefficients — floor-based, so c2 carries the sign and c1, c0 stay in
    [0, 256) — keep every float32 sum an exact integer; Pillow's rounding
    and clip to [0, 255] follow each pass. Keep it in float32.
    """

    def __init__(self, size: int = CODEX_INPUT, order: str = "pillow12"):
        super().__init__()
        if order not in RESIZE_ORDERS:
            raise ValueError(f"resize order must be one of {', '.join(RESIZE_ORDERS)}, not {order!r}")
        self.size = size
        self.order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones_w = torch.ones_like(x[0, 0, 0, :], dtype=torch.int64)
        ones_h = torch.ones_like(x[0, 0, :, 0], dtype=torch.int64)
        wx = _byte_planes(pil_bicubic_taps(ones_w, self.size))
        wy = _byte_planes(pil_bicubic_taps(ones_h, self.size))
        horizontal_first = self._vertical(wy, self._horizontal(wx, x))
        if self.order == "pillow12":
            return horizontal_first
        # Pillow 13's choice, from the grid's size (a graph value): both orders, one kept.
        gh, gw = ones_h.sum(), ones_w.sum()
        tall = (gh > self.size) & (gw != self.size) & (gh + self.size > 2 * gw)
        return torch.where(tall, self._horizontal(wx, self._vertical(wy, x)), horizontal_first)

    def _horizontal(self, wx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _fixed_point_round(torch.matmul(x, wx.transpose(0, 1)), self.size, dim=3)

    def _vertical(self, wy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _fixed_point_round(torch.matmul(wy, x), self.size, dim=2)


def quantise(codex: torch.Tensor, mode: str = "scale") -> torch.Tensor:
    """float grid → float32 holding the uint8 values the reference's PIL image holds."""
    x = codex.to(torch.float16).to(torch.float32)  # the reference stores the grid as float16
    if mode == "scale":
        return torch.round(torch.clamp(x, 0.0, 1.0) * 255.0)  # round half to even, as np.rint
    if mode == "truncate":  # clip(trunc(x)) == clip(floor(x)) on [0, 255]; ONNX has Floor, not Trunc
        return torch.clamp(torch.floor(x), 0.0, 255.0)
    raise ValueError(f"quantisation must be one of {', '.join(QUANTISATIONS)}, not {mode!r}")


class CodexPreprocess(nn.Module):
    """codex float32 [C, gh, gw] (channel-first virtual CODEX grid) → [C, 3, 224, 224] ImageNet-normalised."""

    def __init__(self, size: int = CODEX_INPUT, quantisation: str = "scale", resize_order: str = "pillow12"):
        super().__init__()
        if quantisation not in QUANTISATIONS:
            raise ValueError(f"quantisation must be one of {', '.join(QUANTISATIONS)}, not {quantisation!r}")
        self.quantisation = quantisation
        self.resize = PilBicubicResize(size, resize_order)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, codex: torch.Tensor) -> torch.Tensor:
        x = quantise(codex, self.quantisation).unsqueeze(1)  # [C, 1, gh, gw]: the 3 RGB planes are equal
        x = self.resize(x)  # [C, 1, 224, 224]
        return (x / 255.0 - self.mean) / self.std  # broadcast to [C, 3, 224, 224]
