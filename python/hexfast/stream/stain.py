"""Slide-level stain normalisation: the estimate the TileStream's workers apply to every tile.

torchstain-style normalisers estimate the stain of each tile on its own, which
fails on background and fat (no stain to estimate). hexfast estimates once per
slide, from a sample of its tissue tiles (hexfast.stream.estimate_stain reads
them), and the stream's C++ workers apply that estimate to every tile. Off by
default: HEX was trained without it. This module does the arithmetic on tiles
already read; it never reads a slide.
"""

from __future__ import annotations

import numpy as np

from .. import _core

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


def estimate(tiles: np.ndarray, method: str, io: float = 240.0) -> tuple[np.ndarray, np.ndarray]:
    """The stain of a stack of tissue tiles (Macenko: H&E vectors and max concentrations;
    Reinhard: Lab mean and std). ValueError when there is too little tissue to estimate from."""
    reference_target(method)  # validates the method
    if method == "macenko":
        return _core.macenko_estimate(tiles, io=io)
    return _core.reinhard_stats(tiles)
