"""The virtual CODEX image as a pyramidal, multi-channel OME-TIFF.

Layout: tifffile's standard pyramidal OME-TIFF (the one in tifffile's own
examples): one series, axes CYX, one float32 page per channel at full
resolution, each with its 2x-reduced copies in SubIFDs (subfiletype 1), tiled
and deflate-compressed, OME-XML with channel names and the physical pixel
size. Bio-Formats (QuPath) and napari (napari-tifffile / tifffile) read this
as one pyramidal image with named channels.

Where the grid lies on the slide (so an overlay lands on the H&E exactly): cell (i, j) covers level-0
x in [j * cell, (j + 1) * cell), y in [i * cell, (i + 1) * cell), from level-0 (0, 0); the OME-XML
says so in its Description and, machine-readably, in a MapAnnotation (hexfast:grid_origin_level0_px,
hexfast:cell_level0_px, hexfast:level0_size_px).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile

from ..files import writing_file
from .report import DEMO_DETAIL

MIN_LEVEL_PX = 256  # halve until the longest side is below this
TILE_PX = 256


def pyramid(cyx: np.ndarray, min_level_px: int = MIN_LEVEL_PX) -> list[np.ndarray]:
    """[full, 1/2, 1/4, ...] until the longest side is below min_level_px."""
    levels = [cyx]
    while max(levels[-1].shape[1:]) >= min_level_px:
        levels.append(half(levels[-1]))
    return levels


def half(cyx: np.ndarray) -> np.ndarray:
    """2x2 block mean; an odd last row/column averages only the cells it has."""
    c, h, w = cyx.shape
    h2, w2 = math.ceil(h / 2), math.ceil(w / 2)
    padded = np.full((c, h2 * 2, w2 * 2), np.nan, np.float32)
    padded[:, :h, :w] = cyx
    blocks = padded.reshape(c, h2, 2, w2, 2)
    return np.nanmean(blocks, axis=(2, 4)).astype(np.float32)


def write_ome_tiff(
    path: Path,
    grid: np.ndarray,
    channel_names: Sequence[str],
    pixel_um: float,
    name: str | None = None,
    min_level_px: int = MIN_LEVEL_PX,
    cell_px: int | None = None,
    level0_size: tuple[int, int] | None = None,
    annotations: dict[str, str] | None = None,
    demo: bool = False,
) -> None:
    """Write grid [gh, gw, C] (the virtual CODEX, score.codex_grid) as a pyramidal OME-TIFF.

    pixel_um: µm per grid cell (the grid step in level-0 px x the slide's MPP); cell_px, level0_size:
    the cell in level-0 px and the slide's level-0 (width, height), recorded with the origin (0, 0);
    annotations: more key/value pairs for the MapAnnotation (e.g. the scored region).
    demo: the values come from the untrained demo model: the image's name and description, each channel's
    Fluor and the MapAnnotation say so (channel names stay the markers', which tools match on).
    """
    if grid.ndim != 3 or grid.shape[2] != len(channel_names):
        raise ValueError(f"grid must be [gh, gw, {len(channel_names)}], got {grid.shape}")
    if not (pixel_um > 0 and math.isfinite(pixel_um)):
        raise ValueError(f"pixel_um must be positive, got {pixel_um}")
    cyx = np.ascontiguousarray(np.moveaxis(grid, -1, 0), dtype=np.float32)
    levels = pyramid(cyx, min_level_px)
    metadata = {
        "axes": "CYX",
        "Channel": {"Name": list(channel_names),
                    "Fluor": [f"HEX virtual stain{' (DEMO: untrained weights, not a prediction)' if demo else ''}"]
                    * len(channel_names)},
        "PhysicalSizeX": pixel_um,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": pixel_um,
        "PhysicalSizeYUnit": "µm",
    }
    if name:
        metadata["Name"] = f"{name} [DEMO: untrained]" if demo else name
    described = [DEMO_DETAIL] if demo else []
    pairs = {"hexfast:demo": DEMO_DETAIL} if demo else {}
    if cell_px is not None:
        described.append(f"hexfast virtual CODEX: cell (i, j) covers level-0 x in [j*{cell_px}, (j+1)*{cell_px}), "
                         f"y in [i*{cell_px}, (i+1)*{cell_px}) of the slide, from (0, 0)")
        pairs |= {"hexfast:grid_origin_level0_px": "0,0", "hexfast:cell_level0_px": str(cell_px)}
        if level0_size is not None:
            pairs["hexfast:level0_size_px"] = f"{level0_size[0]},{level0_size[1]}"
    if described:
        metadata["Description"] = " ".join(described)
    if pairs or annotations:
        metadata["MapAnnotation"] = pairs | dict(annotations or {})
    h, w = cyx.shape[1:]
    options = dict(
        photometric="minisblack",
        # A 256 px tile, or smaller for a small grid (tile sides must be multiples of 16).
        tile=(min(TILE_PX, _ceil16(h)), min(TILE_PX, _ceil16(w))),
        compression="zlib",  # deflate: stdlib zlib, no imagecodecs needed
        resolutionunit="CENTIMETER",
    )
    bigtiff = sum(level.nbytes for level in levels) > 2**31  # classic TIFF offsets end at 4 GiB
    with writing_file(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=True) as tif:
        tif.write(
            levels[0],
            subifds=len(levels) - 1,
            resolution=(1e4 / pixel_um, 1e4 / pixel_um),
            metadata=metadata,
            **options,
        )
        for i, level in enumerate(levels[1:], start=1):
            um = pixel_um * 2**i
            tif.write(level, subfiletype=1, resolution=(1e4 / um, 1e4 / um), **options)


def _ceil16(n: int) -> int:
    return max(16, -(-n // 16) * 16)
