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
    """Reads and checks a CLAM features h5 for `slide`: shapes, the MICA model's feature width, and
    coords on the slide (a bag of another slide reaches past it, or has another patch count)."""
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                raise BagError(path, f"is not a CLAM features h5 (needs 'features' and 'coords'; has "
                                     f"{', '.join(sorted(f)) or 'nothing'})")
            features, coords = f["features"], f["coords"]
            if features.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2:
                raise BagError(path, f"features {features.shape} and coords {coords.shape} are not (N, D) and (N, 2)")
            if len(features) != len(coords):
                raise BagError(path, f"has {len(features)} feature rows for {len(coords)} coords")
            if features.shape[1] != width:
                raise BagError(path, f"features are {features.shape[1]} wide; the bundle's MICA takes {width} "
                                     f"(a bag from another encoder?)")
            xy = np.asarray(coords[:], np.int64)
            patch = int(coords.attrs.get("patch_size", 256))  # extract_features_fp.py writes no attributes
    except OSError as e:
        raise BagError(path, f"cannot be read as HDF5 ({e})") from None
    w, h = slide.dimensions
    if len(xy) == 0:
        raise BagError(path, "holds no patches")
    if xy.min() < 0 or xy[:, 0].max() >= w or xy[:, 1].max() >= h:
        raise BagError(path, f"has patches at level-0 ({int(xy[:, 0].max())}, {int(xy[:, 1].max())}), beyond slide "
                             f"{slide.name} ({w} x {h}): a bag of another slide?")

    def chunks(rows: int):
        with h5py.File(path, "r") as f:
            dset = f["features"]
            for start in range(0, len(dset), rows):
                yield np.asarray(dset[start:start + rows], np.float32)

    return MicaBag(xy, chunks, {"source": str(path), "sha256": sha256_file(path), "tiles": len(xy),
                                "grid": "the bag's own coords (--mica-bag)", "patch_size": patch})
