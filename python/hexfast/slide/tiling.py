"""Tissue detection and the tile grid (the work is in the C++ core)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import _core
from ..errors import SlideError
from .slide import Slide

# Chosen by looking at CMU-1-Small-Region and synthetic edge cases (see the
# README): at 0.5 a tile is kept when at least half of it is tissue, which
# keeps the tissue border without tiles that are mostly glass.
DEFAULT_MIN_TISSUE = 0.5
# A whole 40x slide is 50-150k tiles at the default stride; 2M is a 4x-overlapping grid of a large
# one. Beyond it a typo (--stride 1: millions of tiles, days of compute) is refused, not run.
DEFAULT_MAX_TILES = 2_000_000
# Median brightness (brightest channel, 0..255) below which a slide is not brightfield: H&E glass
# is ~240, dense tissue ~150-230; a fluorescence scan's black background is ~0-20.
MIN_BRIGHTFIELD = 64
GRID_BYTES_PER_TILE = 20  # coords (2 x int64) + tissue fraction (float32)


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
    # Pixels whose brightest channel is darker than this are never tissue: black glass (a
    # fluorescence or dark-field scan) has noise of high saturation. H&E is far brighter.
    min_value: int = 30


@dataclass
class TissueMap:
    mask: np.ndarray  # (h, w) uint8, 1 = tissue
    thumbnail: np.ndarray  # (h, w, 3) uint8, same grid as the mask
    downsample: float  # level-0 px per mask px
    mpp: float  # µm per mask px
    threshold: int  # saturation threshold used
    brightness: float  # median over the thumbnail of each pixel's brightest channel, 0..255

    @property
    def brightfield(self) -> bool:
        """A light slide (H&E on glass), not a dark-background fluorescence or dark-field scan."""
        return self.brightness >= MIN_BRIGHTFIELD

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


def expected_tiles(tissue: TissueMap, width: int, height: int, stride: int, min_tissue: float) -> int:
    """How many tiles the grid will about have, from the mask alone: the tissue area over a
    stride's square (every position when min_tissue is 0), never more than the positions."""
    positions = -(-width // stride) * -(-height // stride)
    if min_tissue <= 0:
        return positions
    tissue_px = float(np.count_nonzero(tissue.mask)) * tissue.downsample ** 2
    return min(positions, math.ceil(tissue_px / stride ** 2))


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
        min_value=params.min_value,
    )
    return TissueMap(mask, thumb, ds, mpp, threshold, float(np.median(thumb.max(axis=2))))


def tile_slide(
    slide: Slide,
    stride: int | None = None,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    params: TissueParams = TissueParams(),
    max_tiles: int = DEFAULT_MAX_TILES,
    allow_non_brightfield: bool = False,
) -> TileGrid:
    """Tiles of HEX's size for this slide's MPP that lie on tissue. Refused (SlideError): a slide
    that is not brightfield (HEX reads H&E; `allow_non_brightfield` overrides), and a grid of more
    than about `max_tiles` tiles, before it is built."""
    tile = slide.tile.size
    stride = tile if stride is None else int(stride)
    if stride <= 0:
        raise ValueError(f"stride must be a positive number of level-0 pixels, got {stride}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue must be within [0, 1], got {min_tissue}")
    tissue = detect_tissue(slide, params)
    if not (tissue.brightfield or allow_non_brightfield):
        raise SlideError(slide.path, f"does not look like a brightfield H&E scan: its median brightness is "
                                     f"{tissue.brightness:.0f} of 255 (a dark background, as in fluorescence or "
                                     f"dark-field imaging); HEX predicts from H&E only. To tile or score it "
                                     f"anyway, pass --allow-non-brightfield")
    w, h = slide.dimensions
    expected = expected_tiles(tissue, w, h, stride, min_tissue)
    if expected > max_tiles:
        raise SlideError(slide.path, f"about {expected:,} tiles at stride {stride} px (tissue "
                                     f"{tissue.area_mm2:.1f} mm²) is more than the limit of {max_tiles:,}; "
                                     f"use a larger --stride, or raise the limit with --max-tiles")
    coords, fraction = _core.tile_grid(
        tissue.mask, tissue.downsample, tissue.downsample, w, h, tile, stride, min_tissue
    )
    return TileGrid(coords, fraction, tile, stride, min_tissue, tissue)

