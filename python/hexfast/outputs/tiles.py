"""`hexfast tiles`' outputs: the tile grid as an h5 CLAM and TRIDENT read, and a check image of the
tissue and the kept tiles. Also the tile attributes every hexfast h5 carries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .._core import __version__
from ..files import writing_file
from ..slide import Slide, TileGrid
from .h5file import writing_h5

TISSUE_COLOUR = (0, 170, 60)
TILE_COLOUR = (30, 80, 230)


def magnification(slide: Slide) -> float | int:
    """The slide's nominal magnification (its MPP bucket: 20, 40...), as TRIDENT's attributes give it."""
    mag = slide.tile.magnification
    return int(mag) if float(mag).is_integer() else float(mag)


def tile_attrs(slide: Slide, grid: TileGrid) -> dict:
    """Attributes CLAM/TRIDENT-style readers look for, plus what hexfast needs to reproduce the grid.

    TRIDENT's native coords reader (trident/wsi_objects/WSI.py) needs patch_size, level0_magnification and
    target_magnification (tiles are read at level 0, so both are the slide's and patch_size is level-0 px).
    The virtual CODEX grid (OME-TIFF, overview) puts tile (x, y) in cell (y // cell, x // cell) of a grid
    whose origin is level-0 (0, 0): codex_grid_origin, codex_grid_cell_px."""
    w, h = slide.dimensions
    mag = magnification(slide)
    return {
        "patch_size": grid.tile_size,
        "patch_size_level0": grid.tile_size,
        "patch_level": 0,
        "downsample": (1.0, 1.0),
        "level_dim": (w, h),
        "level0_width": w,
        "level0_height": h,
        "mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
        "magnification": slide.tile.magnification,
        "level0_magnification": mag,
        "target_magnification": mag,
        "codex_grid_origin": (0, 0),
        "codex_grid_cell_px": grid.stride,
        "stride": grid.stride,
        "overlap": grid.tile_size - grid.stride,
        "tissue_threshold": grid.min_tissue,
        "saturation_threshold": grid.tissue.threshold,
        "tissue_area_mm2": grid.tissue.area_mm2,
        "name": slide.name,
        "hexfast_version": __version__,
    }


def write_tiles_h5(path: Path, slide: Slide, grid: TileGrid) -> None:
    coords = np.asarray(grid.coords, np.int64).reshape(-1, 2)
    with writing_h5(path) as f:
        dset = f.create_dataset("coords", data=coords)
        f.create_dataset("tissue_fraction", data=np.asarray(grid.fraction, np.float32))
        for key, value in tile_attrs(slide, grid).items():
            dset.attrs[key] = value
            f.attrs[key] = value


def write_tissue_png(path: Path, slide: Slide, grid: TileGrid, max_side: int = 2048) -> None:
    """Thumbnail with the tissue outline (green) and kept tiles (blue), captioned."""
    img, ds = _display_image(slide, grid, max_side)
    rgb = np.array(img)
    t = grid.tile_size / ds
    boxes = [(x, y, x + t - 1, y + t - 1) for x, y in np.asarray(grid.coords, np.float64) / ds]
    if t < 8:  # outlines would bury the tissue: shade the kept tiles instead
        shade = Image.new("L", img.size, 0)
        draw = ImageDraw.Draw(shade)
        for box in boxes:
            draw.rectangle(box, fill=255)
        kept = np.asarray(shade) > 0
        rgb[kept] = (0.6 * rgb[kept] + 0.4 * np.array(TILE_COLOUR)).astype(np.uint8)
    mask = np.asarray(Image.fromarray(grid.tissue.mask * 255).resize(img.size, Image.Resampling.NEAREST)) > 0
    rgb[tissue_outline(mask, thickness=max(1, round(min(img.size) / 400)))] = TISSUE_COLOUR
    img = Image.fromarray(rgb)
    if t >= 8:
        draw = ImageDraw.Draw(img)
        for box in boxes:
            draw.rectangle(box, outline=TILE_COLOUR)
    img = _caption(img, _summary_text(slide, grid))
    with writing_file(path) as tmp:
        img.save(tmp, format="PNG")


def _display_image(slide: Slide, grid: TileGrid, max_side: int) -> tuple[Image.Image, float]:
    w, h = slide.dimensions
    ds = max(1.0, max(w, h) / max_side)
    if ds >= grid.tissue.downsample:  # the segmentation thumbnail is fine enough
        size = (max(1, round(w / ds)), max(1, round(h / ds)))
        return Image.fromarray(grid.tissue.thumbnail).resize(size, Image.Resampling.BOX), ds
    return Image.fromarray(slide.read_reduced(ds)), ds


def tissue_outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels within `thickness` of the mask's edge, inside the mask."""
    inner = mask.copy()
    for _ in range(thickness):
        p = np.pad(inner, 1, constant_values=False)
        inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def _summary_text(slide: Slide, grid: TileGrid) -> str:
    um = grid.tile_size * slide.mpp
    return [
        slide.path.name,
        # ASCII only: PIL's built-in font has no µ, ² or ≥.
        f"{len(grid)} tiles of {grid.tile_size} px ({um:.0f} um), stride {grid.stride} px, tissue >= {grid.min_tissue:g}",
        f"tissue {grid.tissue.area_mm2:.2f} mm2, {slide.mpp:.3f} um/px",
        "green: tissue outline, blue: kept tiles",
    ]


def _caption(img: Image.Image, parts: list[str]) -> Image.Image:
    """Appends a white bar below the image with the parts, wrapped to its width (at least 480 px)."""
    size = max(12, min(28, img.width // 60))
    font = ImageFont.load_default(size=size)
    width = max(img.width, 480)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [parts[0]]
    for part in parts[1:]:
        joined = f"{lines[-1]}   {part}"
        if measure.textlength(joined, font=font) <= width - 12:
            lines[-1] = joined
        else:
            lines.append(part)
    line_h = size + 6
    out = Image.new("RGB", (width, img.height + line_h * len(lines) + 8), (255, 255, 255))
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((6, img.height + 4 + i * line_h), line, fill=(0, 0, 0), font=font)
    return out
