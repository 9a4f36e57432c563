"""MICA's H&E bag for one slide: which tiles, which features, and where they come from.

A bundle's MICA declares the bag it was trained on (manifest `mica_features`):

* "resnet50-trunc": CLAM's patches (slide.clam_patches) through the bundle's he_features model,
  computed in the same run as HEX (a second TileStream) -- or, with `--mica-bag DIR`, a lab's own
  CLAM bags, read as CLAM's extract_features_fp.py wrote them: DIR/<slide>.h5 or
  DIR/h5_files/<slide>.h5 with `features` (N, D) float32 and `coords` (N, 2) level-0 top-left;
* "hex-embedding": the HEX embedding of every tile of hexfast's own grid (the h5 `features`).

Bags are read a chunk at a time (MICA streams them), never whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import HexfastError
from ..files import sha256_file
from ..slide import Slide


class BagError(HexfastError):
    """A --mica-bag file that does not fit the slide or the model; one line naming the file."""

    def __init__(self, path: Path, problem: str):
        self.path = Path(path)
        super().__init__(f"{path}: {problem}")


@dataclass
class MicaBag:
    """One slide's bag: level-0 coords (in memory, 16 bytes a tile) and its features, in chunks."""

    coords: np.ndarray
    chunks: Callable[[int], Iterable[np.ndarray]]  # chunks(rows): a fresh iterator over the features
    info: dict = field(default_factory=dict)  # what report.json says of it
    features: np.ndarray | None = None  # all of them, when they are in memory (no output directory)

    def __len__(self) -> int:
        return len(self.coords)

    def restrict(self, keep: np.ndarray) -> MicaBag:
        """The bag's tiles where `keep` (a region), the features filtered chunk by chunk as they are read."""
        keep = np.asarray(keep, bool)
        chunks = self.chunks

        def kept(rows: int):
            start = 0
            for chunk in chunks(rows):
                yield chunk[keep[start:start + len(chunk)]]
                start += len(chunk)

        features = None if self.features is None else self.features[keep]
        return MicaBag(self.coords[keep], kept, self.info | {"tiles": int(keep.sum()), "in_file": len(keep)},
                       features)


def find_bag(directory: Path, slide: Slide) -> Path:
    """The CLAM bag of `slide` in `directory` (CLAM names it after the slide file's stem)."""
    for candidate in (directory / f"{slide.name}.h5", directory / "h5_files" / f"{slide.name}.h5"):
        if candidate.is_file():
            return candidate
    raise BagError(directory, f"holds no CLAM bag for slide {slide.name} (looked for {slide.name}.h5 and "
                              f"h5_files/{slide.name}.h5)")


def open_bag(path: Path, slide: Slide, width: int) -> MicaBag:
    """Reads and checks a CLAM features h5 for `slide` before anything is scored: shapes, types, the
    MICA model's feature width, finite features, and coords on the slide, each once (a bag of another
    slide reaches past it, has another patch count, or more patches than the slide holds)."""
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                raise BagError(path, f"is not a CLAM features h5 (needs 'features' and 'coords'; has "
                                     f"{', '.join(sorted(f)) or 'nothing'})")
            features, coords = f["features"], f["coords"]
            if not (isinstance(features, h5py.Dataset) and isinstance(coords, h5py.Dataset)):
                raise BagError(path, "'features' and 'coords' must be datasets, not groups")
            if features.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2:
                raise BagError(path, f"features {features.shape} and coords {coords.shape} are not (N, D) and (N, 2)")
            if len(features) != len(coords):
                raise BagError(path, f"has {len(features)} feature rows for {len(coords)} coords")
            if features.shape[1] != width:
                raise BagError(path, f"features are {features.shape[1]} wide; the bundle's MICA takes {width} "
                                     f"(a bag from another encoder?)")
            if features.dtype.kind != "f":
                raise BagError(path, f"features are stored as {_type_name(features.dtype)}; MICA reads real floating "
                                     f"point (float16, float32 or float64)")
            if coords.dtype.kind not in "iuf":
                raise BagError(path, f"coords are stored as {_type_name(coords.dtype)}, not level-0 pixel numbers")
            patch = _patch_size(path, coords.attrs.get("patch_size", 256))  # extract_features_fp.py writes none
            w, h = slide.dimensions
            most = (w // patch + 1) * (h // patch + 1)
            if len(coords) > most:
                raise BagError(path, f"declares {len(coords):,} patches; slide {slide.name} ({w} x {h}) holds at most "
                                     f"{most:,} of {patch} px: a bag of another slide, or a damaged file?")
            xy = _whole_pixels(path, coords[:])
            _check_finite(path, features)
    except OSError as e:
        raise BagError(path, f"cannot be read as HDF5 ({e})") from None
    if len(xy) == 0:
        raise BagError(path, "holds no patches")
    if xy.min() < 0 or xy[:, 0].max() >= w or xy[:, 1].max() >= h:
        raise BagError(path, f"has patches at level-0 ({int(xy[:, 0].max())}, {int(xy[:, 1].max())}), beyond slide "
                             f"{slide.name} ({w} x {h}): a bag of another slide?")
    _, first, counts = np.unique(xy, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        row = int(first[counts > 1].min())
        raise BagError(path, f"has {int((counts - 1).sum())} duplicate patch coords (the first: row {row}, "
                             f"{tuple(int(v) for v in xy[row])})")

    def chunks(rows: int):
        with h5py.File(path, "r") as f:
            dset = f["features"]
            for start in range(0, len(dset), rows):
                yield np.asarray(dset[start:start + rows], np.float32)

    return MicaBag(xy, chunks, {"source": str(path), "sha256": sha256_file(path), "tiles": len(xy),
                                "grid": "the bag's own coords (--mica-bag)", "patch_size": patch})


CHECK_ROWS = 8192


def _check_finite(path: Path, features: h5py.Dataset) -> None:
    """Features with NaN or Inf would make MICA's risk NaN; the first bad row is named."""
    for start in range(0, len(features), CHECK_ROWS):
        block = np.asarray(features[start:start + CHECK_ROWS])
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            row = start + int(np.argmax(bad))
            raise BagError(path, f"features hold NaN or Inf (the first at row {row}); MICA needs finite features")


def _patch_size(path: Path, value) -> int:
    try:
        item = np.asarray(value).item()
        patch = int(item)
        ok = float(item) == patch and 1 <= patch <= 1 << 16
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise BagError(path, f"coords.attrs['patch_size'] is {value!r}, not a patch size in pixels")
    return patch


def _whole_pixels(path: Path, coords: np.ndarray) -> np.ndarray:
    """Level-0 coords as int64; float coords only when finite and whole."""
    if coords.dtype.kind == "f":
        if not np.isfinite(coords).all() or (coords != np.round(coords)).any():
            raise BagError(path, "coords hold NaN, Inf or fractions of a pixel; CLAM writes whole level-0 pixels")
        if np.abs(coords).max(initial=0) >= 2.0**62:
            raise BagError(path, "coords are beyond any slide")
    return coords.astype(np.int64)


def _type_name(dtype: np.dtype) -> str:
    return {"S": "bytes", "U": "strings", "O": "strings or objects"}.get(dtype.kind, str(dtype))
