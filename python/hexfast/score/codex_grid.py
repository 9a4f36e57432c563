"""The virtual CODEX image: tile predictions laid out on the slide's tile grid.

How the reference builds it (lilab-stanford/HEX, hex/virtual_codex_from_h5.py
and the first half of mica/codex_h5_png2fea.py; read, not copied):

- step ("scale_down_factor") is the level-0 tile size of the slide's
  magnification bucket (224 px at 40x, 112 at 20x, 448 at 80x), not a stride
  (the reference tiles without overlap, so the two are the same there);
- the grid starts at level-0 (0, 0), not at the first tile, and covers the
  whole slide: shape (height // step + 1, width // step + 1, C), so tissue
  position and the empty margins are part of the image the CODEX encoder sees;
- tile (x, y) goes to cell (y // step, x // step) (int(x / step) on
  non-negative ints); cells without a tile stay 0; a later tile in the same
  cell overwrites an earlier one; cells outside the grid are skipped;
- the array is float16, HWC, saved as .npy; the encoder reads one channel at
  a time from it.

hexfast computes the same thing in float32 (the HWC grid for the OME-TIFF and
the overview) and offers the reference's float16 rounding for the encoder.
"""

from __future__ import annotations

import numpy as np


def grid_shape(level0_size: tuple[int, int], step: int) -> tuple[int, int]:
    """(gh, gw) of the reference grid for a slide of level-0 (width, height)."""
    w, h = level0_size
    return int(h) // step + 1, int(w) // step + 1


def virtual_codex(
    coords: np.ndarray,
    values: np.ndarray,
    step: int,
    level0_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Tile values laid out on the grid: [gh, gw, C] float32.

    coords (N, 2) are level-0 top-left (x, y); values (N, C). Cell
    (x // step, y // step) holds the tile's values, empty cells are 0. The grid
    starts at level-0 (0, 0): cell (i, j) covers level-0 x in [j*step, (j+1)*step).

    Pass the slide's level0_size (width, height) to get the reference's shape
    (needed for the CODEX encoder: its input is the whole grid resized to
    224x224, margins included). Without it the grid ends at the last tile.
    """
    coords = np.asarray(coords)
    values = np.asarray(values)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be (N, 2), got {coords.shape}")
    if values.ndim != 2 or len(values) != len(coords):
        raise ValueError(f"values must be (N, C) with N = {len(coords)}, got {values.shape}")
    if step <= 0:
        raise ValueError(f"step must be a positive number of level-0 pixels, got {step}")
    if len(coords) and coords.min() < 0:
        raise ValueError("coords must be non-negative level-0 pixels")
    cells = coords.astype(np.int64) // int(step)  # (N, 2) as (col, row)
    if level0_size is not None:
        gh, gw = grid_shape(level0_size, step)
    elif len(cells):
        gw, gh = (cells.max(axis=0) + 1).tolist()
    else:
        gh = gw = 0
    grid = np.zeros((gh, gw, values.shape[1]), np.float32)
    inside = (cells[:, 0] < gw) & (cells[:, 1] < gh)
    cols, rows, vals = cells[inside, 0], cells[inside, 1], values[inside]
    # The reference loops in tile order, so the last tile in a cell wins; numpy
    # does not promise which duplicate wins, so keep the last ones explicitly.
    flat = rows * gw + cols
    _, first_in_reversed = np.unique(flat[::-1], return_index=True)
    last = len(flat) - 1 - first_in_reversed
    grid[rows[last], cols[last]] = vals[last]
    return grid


def encoder_input(grid: np.ndarray, reference_float16: bool = True) -> np.ndarray:
    """[C, gh, gw] float32, C-contiguous: one image per marker, as the CODEX encoder takes them.

    With reference_float16 the values are first rounded to float16, as the
    reference stores its grid; the encoder's uint8 quantisation (clip to
    [0, 1], x255, round) then sees the same numbers the reference's did.
    """
    if grid.ndim != 3:
        raise ValueError(f"grid must be [gh, gw, C], got {grid.shape}")
    if reference_float16:
        grid = grid.astype(np.float16)
    return np.ascontiguousarray(np.moveaxis(grid, -1, 0), dtype=np.float32)


def codex_encoder_input(
    coords: np.ndarray, markers: np.ndarray, tile_size: int, level0_size: tuple[int, int]
) -> np.ndarray:
    """[40, gh, gw] float32 for the CODEX encoder, built exactly as the reference
    builds its grid: step = the level-0 tile size (not the stride), whole slide
    from (0, 0), float16 values."""
    return encoder_input(virtual_codex(coords, markers, tile_size, level0_size), reference_float16=True)
