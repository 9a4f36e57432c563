"""Tissue detection and the tile grid (the work is in the C++ core)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import _core
from .slide import Slide

# Chosen by looking at CMU-1-Small-Region and synthetic edge cases (see the
# README): at 0.5 a tile is kept when at least half of it is tissue, which
# keeps the tissue border without tiles that are mostly glass.
DEFAULT_MIN_TISSUE = 0.5


@dataclass(frozen=True)
class TissueParams:
    """CLAM-style segmentation settings, all physical so 20x and 40x agree."""

    seg_mpp: float = 4.0  # resolution the mask is computed at (µm/px)
    max_mask_pixels: int = 16_000_000  # coarser than seg_mpp when needed: bounds memory
    # HSV saturation above which a pixel is tissue. None: Otsu clamped to
    # [min_threshold, max_threshold]. The floor is CLAM's fixed default and keeps
    # blank glass blank; the cap keeps pale stroma when dense, saturated tissue
    # pulls Otsu up (46 on CMU-1-Small-Region, which loses pale dermis).
    threshold: int | None = None
    min_threshold: int = 8
    max_threshold: int = 20
    median_um: float = 30.0
    close_um: float = 60.0
    min_tissue_um2: float = 40_000.0  # 0.04 mm²: specks and dust go
    max_hole_um2: float = 20_000.0  # smaller holes are filled; larger (lumina) stay


@dataclass
class TissueMap:
    mask: np.ndarray  # (h, w) uint8, 1 = tissue
    thumbnail: np.ndarray  # (h, w, 3) uint8, same grid as the mask
    downsample: float  # level-0 px per mask px
    mpp: float  # µm per mask px
    threshold: int  # saturation threshold used

    @property
    def area_mm2(self) -> float:
        return float(np.count_nonzero(self.mask)) * self.mpp**2 / 1e6


@dataclass
class TileGrid:
    coords: np.ndarray  # (N, 2) int64 level-0 top-left x, y; row-major
    fraction: np.ndarray  # (N,) float32 tissue fraction of each tile
    tile_size: int  # level-0 px
    stride: int  # level-0 px
    min_tissue: float
    tissue: TissueMap = field(repr=False)

    def __len__(self) -> int:
        return len(self.coords)


def mask_downsample(slide: Slide, params: TissueParams) -> float:
    w, h = slide.dimensions
    ds = max(1.0, params.seg_mpp / slide.mpp)
    pixels = (w / ds) * (h / ds)
    if pixels > params.max_mask_pixels:
        ds *= math.sqrt(pixels / params.max_mask_pixels)
    return ds


def detect_tissue(slide: Slide, params: TissueParams = TissueParams()) -> TissueMap:
    ds = mask_downsample(slide, params)
    thumb = slide.read_reduced(ds)
    mpp = ds * slide.mpp
    mask, threshold = _core.segment_tissue(
        thumb,
        mpp,
        threshold=-1 if params.threshold is None else params.threshold,
        min_threshold=params.min_threshold,
        max_threshold=params.max_threshold,
        median_um=params.median_um,
        close_um=params.close_um,
        min_tissue_um2=params.min_tissue_um2,
        max_hole_um2=params.max_hole_um2,
    )
    return TissueMap(mask, thumb, ds, mpp, threshold)


def tile_slide(
    slide: Slide,
    stride: int | None = None,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    params: TissueParams = TissueParams(),
) -> TileGrid:
    """Tiles of HEX's size for this slide's MPP that lie on tissue."""
    tile = slide.tile.size
    stride = tile if stride is None else int(stride)
    if stride <= 0:
        raise ValueError(f"stride must be a positive number of level-0 pixels, got {stride}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue must be within [0, 1], got {min_tissue}")
    tissue = detect_tissue(slide, params)
    w, h = slide.dimensions
    coords, fraction = _core.tile_grid(
        tissue.mask, tissue.downsample, tissue.downsample, w, h, tile, stride, min_tissue
    )
    return TileGrid(coords, fraction, tile, stride, min_tissue, tissue)

