"""Slide-level stain normalisation for the TileStream.

torchstain-style normalisers estimate the stain of each tile on its own, which
fails on background and fat (no stain to estimate). hexfast estimates once per
slide, from a sample of its tissue tiles, and the stream's C++ workers apply
that estimate to every tile. Off by default: HEX was trained without it.

    source = estimate_stain(slide, grid.coords, "macenko")
    TileStream(slide, grid.coords, stain_norm="macenko", stain_source=source)
"""

from __future__ import annotations

import numpy as np

from . import _core
from .errors import SlideError

METHODS = ("none", "macenko", "reinhard")
SAMPLE_TILES = 32  # tissue tiles read to estimate a slide's stain


def reference_target(method: str) -> tuple[np.ndarray, np.ndarray]:
    """The default target: torchstain's HERef/maxCRef (Macenko), or the Lab
    statistics of a fixed CMU-1-Small-Region tissue tile (Reinhard)."""
    if method == "macenko":
        return _core.macenko_reference()
    if method == "reinhard":
        return _core.reinhard_reference()
    raise ValueError(f"stain normalisation must be one of {', '.join(METHODS[1:])}, not {method!r}")


def sample_coords(coords: np.ndarray, n: int = SAMPLE_TILES) -> np.ndarray:
    """Up to n tiles evenly spaced through the grid, so the sample spans the whole section."""
    coords = np.asarray(coords).reshape(-1, 2)
    if len(coords) <= n:
        return coords
    return coords[np.linspace(0, len(coords) - 1, n).round().astype(int)]


def estimate_stain(slide, coords: np.ndarray, method: str, read_size: int | None = None,
                   sample: int = SAMPLE_TILES, io: float = 240.0) -> tuple[np.ndarray, np.ndarray]:
    """The slide's stain (Macenko: H&E vectors and max concentrations;
    Reinhard: Lab mean and std) from up to `sample` of its tissue tiles."""
    from .stream import TileStream

    reference_target(method)  # validates the method
    picked = sample_coords(coords, sample)
    if len(picked) == 0:
        raise SlideError(slide.path, f"no tissue tiles to estimate the {method} stain from")
    tiles = np.concatenate([np.array(t) for _, t in TileStream(slide, picked, read_size=read_size,
                                                                 batch_size=len(picked), threads=2)])
    try:
        if method == "macenko":
            return _core.macenko_estimate(tiles, io=io)
        return _core.reinhard_stats(tiles)
    except ValueError as e:
        raise SlideError(slide.path, f"cannot estimate the {method} stain from {len(picked)} tissue tiles: {e}") \
            from None
