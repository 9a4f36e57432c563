"""Batched tile streaming from a slide, done by C++ worker threads.

    with TileStream(slide, grid.coords, out_size=384, batch_size=64, threads=4) as stream:
        for coords, tiles in stream:      # (B, 2) int64, (B, S, S, 3) uint8, grid order
            engine(tiles)

Workers read without the GIL. On JPEG-tiled TIFFs (Aperio SVS, generic
tiled TIFF) they decode level 0's stored JPEG tiles themselves with libjpeg
into a shared cache, so each stored tile is decoded about once
(``reader == "direct"``); other formats go through OpenSlide's C API, the
library the openslide-bin wheel ships (``reader == "openslide"``). Both give
the same pixels. Batches are numpy views of a fixed ring of buffers:
a batch's buffer goes back to the workers when its arrays are garbage, so keep
a copy (``np.array(tiles)``) of any batch you hold on to. Memory is fixed when
the stream starts, whatever the slide size:

    prefetch x batch_size x (out_size² x 3 + 16) bytes      the ring
    + threads x read_size² x 7 bytes                         per-worker scratch
    + cache_mb                                               decoded-tile cache (32-512 MB:
                                                             three rows of the stored tiles
                                                             the grid reads, default_cache_mb)

With ``stain_norm="macenko"`` or ``"reinhard"`` the workers normalise each
tile (before any resize) with one estimate for the whole slide, taken from a
sample of the grid's tiles unless ``stain_source`` gives it (estimate_stain);
``stain_target`` defaults to torchstain's reference. Off by default: HEX was
trained without it.

Tiles are read at level 0. Pixels beyond the slide's edge come out black,
exactly as the reference's ``read_region(...).convert("RGB")`` gives them.
"""

from __future__ import annotations

import os
from importlib import resources

import numpy as np

from .. import _core
from ..errors import SlideError
from ..slide import Slide, open_slide
from . import stain

CACHE_MB_BOUNDS = (32, 512)
# Formats whose level 0 is the file's first TIFF directory, as OpenSlide reads
# them: the stream may decode their stored JPEG tiles itself.
DIRECT_VENDORS = {"aperio", "generic-tiff"}


def default_cache_mb(slide: Slide, coords: np.ndarray | None = None, read_size: int | None = None) -> int:
    """Enough decoded-tile cache for three rows of the stored tiles the grid reads.

    Tiles of 224 px straddle the scanner's 240/256-px stored tiles, so each
    stored row is needed by two consecutive rows of the grid: keeping the
    stored tiles of three consecutive stored rows decoded means each is decoded
    about once instead of up to four times. Given the grid (`coords`,
    `read_size`), only stored tiles some grid tile touches count (tissue rarely
    spans the slide's width), which keeps the cache, and the fresh pages the
    first pass over it costs, small; without it, three full rows. Bounded by
    CACHE_MB_BOUNDS whatever the slide."""
    props = slide.properties
    try:
        tw = int(props["openslide.level[0].tile-width"])
        th = int(props["openslide.level[0].tile-height"])
    except (KeyError, ValueError):  # untiled (stripped) file: no stored-tile structure to follow
        tw, th = 256, 256
    tile_bytes = tw * th * 4  # OpenSlide caches ARGB; the direct reader's RGB tiles fit with room to spare
    if coords is None or read_size is None or len(coords) == 0:
        tiles = 3 * -(-slide.dimensions[0] // tw)
    else:
        tiles = _stored_tiles_in_three_rows(np.asarray(coords, np.int64).reshape(-1, 2), int(read_size), tw, th)
        tiles += 64  # runs of grid tiles in flight in the workers, ahead of the rows they finish
    low, high = CACHE_MB_BOUNDS
    return int(min(high, max(low, tiles * tile_bytes / 2**20)))


def _stored_tiles_in_three_rows(coords: np.ndarray, size: int, tw: int, th: int) -> int:
    """The most distinct stored tiles the grid touches in any three consecutive stored rows."""
    x, y = np.maximum(coords[:, 0], 0), np.maximum(coords[:, 1], 0)
    keys = []
    for dy in range(-(-size // th) + 1):  # a tile spans at most ceil(size/th) + 1 stored rows
        rows = y // th + dy
        rows_ok = rows * th < y + size
        for dx in range(-(-size // tw) + 1):
            cols = x // tw + dx
            ok = rows_ok & (cols * tw < x + size)
            keys.append(rows[ok] * (1 << 32) + cols[ok])
    rows = np.unique(np.concatenate(keys)) >> 32
    per_row = np.bincount(rows - rows.min())
    return int(np.convolve(per_row, np.ones(3, np.int64), mode="full").max())


def openslide_library() -> str:
    """Path of the libopenslide.so.1 inside the openslide-bin wheel."""
    try:
        lib = resources.files("openslide_bin") / "libopenslide.so.1"
    except ModuleNotFoundError as e:  # pragma: no cover - openslide-bin is a dependency
        raise RuntimeError("openslide-bin is not installed") from e
    if not lib.is_file():
        raise RuntimeError(f"{lib}: OpenSlide library missing from openslide-bin")
    return os.fspath(lib)


class TileStream:
    """Iterates (coords, tiles) batches of `coords` read from `slide`."""

    def __init__(
        self,
        slide: Slide | str | os.PathLike,
        coords: np.ndarray,
        read_size: int | None = None,
        out_size: int | None = None,
        batch_size: int = 64,
        threads: int = 2,
        prefetch: int = 4,
        skip_errors: bool = False,
        cache_mb: int | None = None,
        reader: str = "auto",
        stain_norm: str = "none",
        stain_source: tuple[np.ndarray, np.ndarray] | None = None,
        stain_target: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        opened = slide if isinstance(slide, Slide) else open_slide(slide)
        try:
            self.path = opened.path
            self.read_size = int(opened.tile.size if read_size is None else read_size)
            self.out_size = int(out_size or self.read_size)
            if reader == "auto" and opened.vendor not in DIRECT_VENDORS:
                reader = "openslide"
            coords = np.ascontiguousarray(coords, dtype=np.int64).reshape(-1, 2)
            cache_mb = default_cache_mb(opened, coords, self.read_size) if cache_mb is None else cache_mb
            self.stain_norm = stain_norm
            self.stain_source = None
            if stain_norm != "none":
                self.stain_source = (estimate_stain(opened, coords, stain_norm, self.read_size)
                                     if stain_source is None else stain_source)
            self._core = _core.TileStream(
                slide_path=os.fspath(opened.file), library_path=openslide_library(), coords=coords,
                read_size=self.read_size, out_size=self.out_size, batch_size=batch_size, threads=threads,
                prefetch=prefetch, skip_errors=skip_errors, cache_bytes=cache_mb << 20, reader=reader,
                stain_norm=stain_norm, stain_source=self.stain_source, stain_target=stain_target,
            )
        except RuntimeError as e:
            raise SlideError(self.path, str(e)) from e
        finally:
            if opened is not slide:
                opened.close()

    @property
    def reader(self) -> str:
        """'direct' when hexfast decodes the slide's stored JPEG tiles itself, else 'openslide'."""
        return self._core.reader

    def __len__(self) -> int:
        return len(self._core)

    @property
    def decoded_tiles(self) -> int:
        """Stored JPEG tiles decoded so far by the direct reader (0 on the OpenSlide path)."""
        return self._core.decoded_tiles

    @property
    def batches(self) -> int:
        return self._core.batches

    @property
    def skipped(self) -> list[tuple[int, int, int, str]]:
        """(index, x, y, message) of tiles skipped with skip_errors=True."""
        return self._core.skipped

    def __iter__(self):
        try:
            while True:
                try:
                    batch = self._core.next()
                except RuntimeError as e:
                    raise SlideError(self.path, str(e)) from e
                if batch is None:
                    return
                yield batch
        finally:  # early exit, consumer exception, Ctrl-C: stop the workers
            self.close()

    def close(self) -> None:
        self._core.close()

    def __enter__(self) -> TileStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def estimate_stain(slide: Slide, coords: np.ndarray, method: str, read_size: int | None = None,
                   sample: int = stain.SAMPLE_TILES, io: float = 240.0) -> tuple[np.ndarray, np.ndarray]:
    """The slide's stain (Macenko: H&E vectors and max concentrations; Reinhard: Lab mean and
    std) from up to `sample` of its tissue tiles, spread over the grid."""
    stain.reference_target(method)  # validates the method before any read
    picked = stain.sample_coords(coords, sample)
    if len(picked) == 0:
        raise SlideError(slide.path, f"no tissue tiles to estimate the {method} stain from")
    tiles = np.concatenate([np.array(t) for _, t in TileStream(slide, picked, read_size=read_size,
                                                                 batch_size=len(picked), threads=2)])
    try:
        return stain.estimate(tiles, method, io)
    except ValueError as e:
        raise SlideError(slide.path, f"cannot estimate the {method} stain from {len(picked)} tissue tiles: {e}") \
            from None
