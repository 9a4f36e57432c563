"""<stem>.h5: per-tile results, written as tiles are scored.

Datasets: `coords` (N,2 int64, level-0 top-left), `codex_prediction` (N,40
float32), `features` (N,D float32, D=1024 for HEX; absent when not computed),
`tissue_fraction` (N,). HEX's virtual_codex_from_h5.py reads
f["codex_prediction"][:] and f["coords"][:]; CLAM/TRIDENT-style MIL tools read
f["features"] and f["coords"] (patch_size / patch_level on coords). Attributes
(on the file and on coords): the tiles h5's (tiles.tile_attrs) plus
marker_names, bundle_hash, demo, has_features.

With a MICA bag (score.mica_bag): `mica_coords` (M,2 int64, level-0 top-left of
CLAM's patches, with the attributes CLAM's patching writes on its `coords`:
patch_size, patch_level, downsample, level_dim, name...) and `mica_features`
(M,D float32, what MICA read, in that order) -- CLAM's features h5 layout
under prefixed names, so one file holds both grids -- and `mica_attention`
(M,) (or (N,) for a MICA on HEX's own tiles: attribute aligned_with), each
tile's co-attention weight averaged over the 40 CODEX channels.

Rows are appended batch by batch to a hidden file beside the target, so the
features of a whole slide never sit in memory; close() renames it into place,
abort() removes it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from ..errors import OutputError
from ..files import temp_name
from ..markers import MARKERS
from ..slide import Slide, TileGrid
from .h5file import SafeH5, write_error
from .report import DEMO_DETAIL
from .tiles import tile_attrs

# Whole rows per chunk (readers slice by tile), <= 1 MiB each.
ROWS_PER_CHUNK = {"coords": 4096, "codex_prediction": 4096, "features": 256, "tissue_fraction": 4096,
                  "mica_coords": 4096, "mica_features": 256}
# Batches are gathered in memory and written in blocks of whole chunks (16 MiB
# of features at most): partial writes into gzip chunks interleaved with the
# features made HDF5 recompress chunks over and over (50k tiles in batches of
# 64: 8 s instead of well under 1 s).
FLUSH_ROWS = 4096
GZIP = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
# Float embeddings barely compress (gzip saved ~15% at 10x the write time on
# 50k x 1024), so `features` is only chunked.
COMPRESSED = {"coords", "codex_prediction", "tissue_fraction", "mica_coords"}


class _Rows:
    """Datasets appended together, a row per tile: sized up front, written in blocks, trimmed at the end."""

    def __init__(self, f: h5py.File, widths: Mapping[str, tuple[int, type]], rows: int):
        self.n = 0  # rows appended
        self.written = 0  # rows on disk
        self.pending: dict[str, list[np.ndarray]] = {}
        self.ds: dict[str, h5py.Dataset] = {
            name: f.create_dataset(name, shape=(max(rows, 1), width), maxshape=(None, width), dtype=dtype,
                                   chunks=(ROWS_PER_CHUNK[name], width), **(GZIP if name in COMPRESSED else {}))
            for name, (width, dtype) in widths.items()}

    def add(self, rows: Mapping[str, np.ndarray]) -> bool:
        """Queues one batch; True when a block is due (flush)."""
        n = len(next(iter(rows.values())))
        for name, data in rows.items():
            want = self.ds[name].shape[1]
            if data.shape != (n, want):
                raise ValueError(f"{name} batch must be ({n}, {want}), got {data.shape}")
        for name, data in rows.items():
            self.pending.setdefault(name, []).append(data)
        self.n += n
        return self.n - self.written >= FLUSH_ROWS

    def flush(self) -> None:
        n0, n1 = self.written, self.n
        if n0 == n1:
            return
        for name, parts in self.pending.items():
            dset = self.ds[name]
            if n1 > len(dset):  # more tiles than expected: not expected, but allowed
                dset.resize(max(n1, 2 * len(dset)), axis=0)
            dset[n0:n1] = np.concatenate(parts)
        self.pending = {}
        self.written = n1

    def trim(self) -> None:
        for dset in self.ds.values():
            dset.resize(self.n, axis=0)


class ScoresH5:
    """Append tiles (and MICA's bag), then close() (atomic rename) or abort(). Errors are OutputError
    naming `path`."""

    def __init__(
        self,
        path: Path,
        slide: Slide,
        grid: TileGrid,
        *,
        bundle_hash: str,
        demo: bool,
        marker_names: Sequence[str] = MARKERS,
        features_dim: int | None = 1024,
        mica_bag: tuple[int, int, Mapping] | None = None,
        extra_attrs: Mapping | None = None,
    ):
        """mica_bag: (patches, feature width, attributes of mica_coords) when the slide has one;
        extra_attrs: more file attributes (the scored region)."""
        self.path = Path(path)
        self._tmp = temp_name(self.path)
        self._grid = grid
        self._attrs = tile_attrs(slide, grid) | {
            "marker_names": list(marker_names),
            "bundle_hash": bundle_hash,
            "demo": bool(demo),
            "has_features": features_dim is not None,
        } | ({"warning": DEMO_DETAIL} if demo else {}) | dict(extra_attrs or {})
        self._attention: tuple[np.ndarray, str] | None = None
        self._ranking: tuple[np.ndarray, np.ndarray, list[str]] | None = None
        widths = {"coords": (2, np.int64), "codex_prediction": (len(marker_names), np.float32)}
        if features_dim is not None:
            widths["features"] = (int(features_dim), np.float32)
        self._mica_attrs = dict(mica_bag[2]) if mica_bag is not None else None
        self._h5: SafeH5 | None = None
        self._mica: _Rows | None = None
        with self._reporting():
            self._h5 = SafeH5(self._tmp)  # HDF5's writes go through it: a full disk is an error, not a crash
            self._f = self._h5.file
            self._tiles = _Rows(self._f, widths, len(grid))
            if mica_bag is not None:
                self._mica = _Rows(self._f, {"mica_coords": (2, np.int64),
                                             "mica_features": (int(mica_bag[1]), np.float32)}, mica_bag[0])
            self._tiles.ds["codex_prediction"].attrs["marker_names"] = list(marker_names)

    def __len__(self) -> int:
        return self._tiles.n

    @property
    def mica_rows(self) -> int:
        return self._mica.n if self._mica is not None else 0

    def append(self, coords: np.ndarray, codex_prediction: np.ndarray, features: np.ndarray | None = None) -> None:
        # Copies: the batch is held until the next block write, and engines may reuse their buffers.
        coords = np.array(coords, np.int64).reshape(-1, 2)
        rows = {"coords": coords, "codex_prediction": np.array(codex_prediction, np.float32)}
        if "features" in self._tiles.ds:
            if features is None:
                raise ValueError(f"{self.path}: features were expected with every batch")
            rows["features"] = np.array(features, np.float32)
        if self._tiles.add(rows):
            self._flush()

    def append_mica(self, coords: np.ndarray, features: np.ndarray) -> None:
        """A batch of MICA's bag: its patches' level-0 coords and features, in MICA's order."""
        if self._mica is None:
            raise ValueError(f"{self.path}: opened without a MICA bag")
        if self._mica.add({"mica_coords": np.array(coords, np.int64).reshape(-1, 2),
                           "mica_features": np.array(features, np.float32)}):
            self._flush()

    def set_mica_attention(self, attention: np.ndarray, aligned_with: str) -> None:
        """MICA's co-attention per bag tile (averaged over the markers), rows of `aligned_with`
        ("mica_coords", or "coords" when the bag is the HEX tiles); written at close()."""
        rows = self._mica.n if aligned_with == "mica_coords" and self._mica is not None else self._tiles.n
        attention = np.asarray(attention, np.float32).reshape(-1)
        if len(attention) != rows:
            raise ValueError(f"{self.path}: {len(attention)} attention weights for {rows} rows of {aligned_with}")
        self._attention = (attention, aligned_with)

    def set_mica_ranking(self, tiles: np.ndarray, attention: np.ndarray, rows: list[str]) -> None:
        """MICA's most-attended tiles: for each of `rows` (the markers, then 'overall'), the row indices
        into MICA's bag of its top-k tiles, best first, and their weights; written at close()."""
        self._ranking = (np.asarray(tiles, np.int64), np.asarray(attention, np.float32), list(rows))

    def _flush(self) -> None:
        with self._reporting():
            for rows in (self._tiles, self._mica):
                if rows is not None:
                    rows.flush()
            self._h5.flush()  # a write that failed is raised here, a block at a time

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of a dataset as written so far (all of them by default)."""
        rows = self._mica if name.startswith("mica_") else self._tiles
        if rows is None or name not in rows.ds:
            raise KeyError(f"{self.path}: no {name!r} dataset")
        self._flush()
        stop = rows.n if stop is None else min(stop, rows.n)
        try:
            return rows.ds[name][start:stop]
        except OSError as e:
            raise OutputError(self.path, f"cannot read back {name}: {write_error(e)}") from e

    def close(self) -> None:
        """Adds tissue_fraction and the attributes, then renames into place."""
        self._flush()
        with self._reporting():
            self._tiles.trim()
            coords = self._tiles.ds["coords"][: self._tiles.n]
            fraction = tissue_fraction(self._grid, coords)
            self._f.create_dataset("tissue_fraction", data=fraction, chunks=(min(max(len(fraction), 1), 8192),),
                                   maxshape=(None,), **GZIP)
            for key, value in self._attrs.items():
                self._tiles.ds["coords"].attrs[key] = value
                self._f.attrs[key] = value
            if self._mica is not None:
                self._mica.trim()
                for key, value in self._mica_attrs.items():
                    self._mica.ds["mica_coords"].attrs[key] = value
            if self._attention is not None:
                weights, aligned = self._attention
                dset = self._f.create_dataset("mica_attention", data=weights, **GZIP)
                dset.attrs["aligned_with"] = aligned
                dset.attrs["meaning"] = "MICA co-attention weight of each tile, averaged over the 40 CODEX channels"
            if self._ranking is not None:
                tiles, weights, rows = self._ranking
                group = self._f.create_group("mica_most_attended")
                group.create_dataset("tiles", data=tiles)
                group.create_dataset("attention", data=weights)
                group.attrs["rows"] = rows
                group.attrs["meaning"] = ("per row (a CODEX channel, then 'overall' = the mean over channels): the "
                                          "rows of MICA's bag (mica_coords, or coords) it attended to most, best "
                                          "first, and their co-attention weights")
            self._h5.close()
            os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the partial file (safe after close, twice, or after a failed open or write)."""
        h5 = getattr(self, "_h5", None)
        if h5 is not None:
            h5.discard()
        self._tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _reporting(self):
        """OS/HDF5 errors become one-line OutputErrors naming the target; the partial file goes."""
        try:
            yield
        except BaseException as e:
            self.abort()
            problem = write_error(e)
            if problem is not None:
                raise OutputError(self.path, f"cannot write: {problem}") from e
            raise

def tissue_fraction(grid: TileGrid, coords: np.ndarray) -> np.ndarray:
    """The grid's tissue fraction for each written tile (tiles may be skipped); NaN if not in the grid."""
    out = np.full(len(coords), np.nan, np.float32)
    grid_coords = np.asarray(grid.coords, np.int64).reshape(-1, 2)
    if len(coords) == 0 or len(grid_coords) == 0:
        return out
    width = int(max(grid_coords[:, 0].max(), coords[:, 0].max())) + 1
    keys = grid_coords[:, 1] * width + grid_coords[:, 0]
    order = np.argsort(keys)
    sorted_keys = keys[order]
    want = coords[:, 1] * width + coords[:, 0]
    pos = np.minimum(np.searchsorted(sorted_keys, want), len(keys) - 1)
    hit = sorted_keys[pos] == want
    out[hit] = np.asarray(grid.fraction, np.float32)[order[pos[hit]]]
    return out

