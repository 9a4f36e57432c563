"""A small synthetic H&E-like slide for `hexfast demo`: pink stroma with
purple nuclei, denser in "tumour" nests, in tissue islands on white glass.
Written as a tiled, deflate-compressed generic TIFF with its resolution in
the TIFF tags, so OpenSlide opens it and hexfast reads its MPP like a scan's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..files import atomic_output

GLASS = np.array([243, 241, 246], np.float32)
STROMA = np.array([232, 160, 200], np.float32)
NEST = np.array([205, 135, 185], np.float32)
NUCLEUS = (70, 40, 125)


def _smooth_field(rng: np.random.Generator, width: int, height: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: coarse random values upsampled bicubically."""
    coarse = rng.random((max(2, height * cells // width), cells)).astype(np.float32)
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(img, np.float32) / 255.0


def synthetic_he(width: int = 4000, height: int = 3000, seed: int = 0) -> np.ndarray:
    """An RGB uint8 image that looks enough like H&E for tissue detection and a demo."""
    rng = np.random.default_rng(seed)
    tissue = _smooth_field(rng, width, height, 6) > 0.55
    nests = (_smooth_field(rng, width, height, 14) > 0.6) & tissue
    fibres = _smooth_field(rng, width, height, 90)
    colour = np.where(nests[..., None], NEST, STROMA) * (0.9 + 0.15 * fibres[..., None])
    rgb = np.where(tissue[..., None], colour, GLASS)
    rgb += rng.normal(0, 3, rgb.shape).astype(np.float32)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(img)
    density = np.where(nests, 1 / 250, np.where(tissue, 1 / 2500, 0)).astype(np.float64)
    count = rng.poisson(density.sum())
    flat = rng.choice(density.size, size=count, p=(density / density.sum()).ravel())
    ys, xs = np.divmod(flat, width)
    for x, y, r in zip(xs, ys, rng.uniform(3, 7, count)):
        shade = tuple(int(c + rng.integers(-15, 15)) for c in NUCLEUS)
        draw.ellipse((x - r, y - r * 0.8, x + r, y + r * 0.8), fill=shade)
    return np.asarray(img.filter(ImageFilter.GaussianBlur(0.8)))


def write_demo_slide(path: str | os.PathLike, width: int = 4000, height: int = 3000, mpp: float = 0.5,
                     seed: int = 0) -> Path:
    """Writes the synthetic slide (20x by default: 0.5 µm/px) to `path`, atomically."""
    import tifffile

    path = Path(path)
    rgb = synthetic_he(width, height, seed)
    pixels_per_cm = 1e4 / mpp
    with atomic_output(path) as tmp:
        tifffile.imwrite(tmp, rgb, tile=(256, 256), compression="zlib", photometric="rgb",
                         resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER",
                         description="hexfast synthetic H&E demo slide", metadata=None)
    return path
