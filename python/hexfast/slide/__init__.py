"""Slide → tile grid: open a slide (OpenSlide, MPP, HEX's tile size for it), find the tissue,
lay the tiles on it. The work is in the C++ core."""

from .slide import (MPP_BUCKETS, TILE_UM, Slide, TileSpec, dicom_files, open_slide, slide_name, slide_source,
                    tile_spec_for_mpp)
from .tiling import (DEFAULT_MAX_TILES, DEFAULT_MIN_TISSUE, TileGrid, TissueMap, TissueParams, detect_tissue,
                     mask_downsample, tile_slide)

__all__ = [
    "DEFAULT_MAX_TILES",
    "DEFAULT_MIN_TISSUE",
    "MPP_BUCKETS",
    "TILE_UM",
    "Slide",
    "TileGrid",
    "TileSpec",
    "TissueMap",
    "TissueParams",
    "detect_tissue",
    "dicom_files",
    "mask_downsample",
    "open_slide",
    "slide_name",
    "slide_source",
    "tile_slide",
    "tile_spec_for_mpp",
]
