"""All of one slide's score outputs, in OUT/<stem>/, and whether they are complete.

OUT/<stem>/<stem>.h5               coords, codex_prediction, features; mica_coords, mica_features,
                                   mica_attention (scores_h5)
OUT/<stem>/<stem>.geojson.gz       the tiles as QuPath tile objects with their measurements (geojson)
OUT/<stem>/virtual_codex.ome.tif   the virtual CODEX grid, 40 named channels (ome_tiff)
OUT/<stem>/overview.png            thumbnail + marker heatmaps (overview)
OUT/<stem>/report.json             metadata, timings, MICA (report) -- written LAST

One writer at a time: a SlideWriter holds OUT/<stem>/'s DirectoryLock from
start to finish; a second one (another run into the same OUT, or another
Scorer.score() call on the same slide) fails at once naming the holder, and
only the holder removes temp files, which are then certainly a dead run's.

Completeness: each file is written atomically; report.json is removed before
anything else is written and written only after the other three succeeded.
So a report.json that parses, was made with the same bundle and settings, and
agrees with the other four (each of which opens as what it is) means the set
is whole and from one run; `--resume` skips exactly those slides
(outputs_complete).

The pipeline streams into a SlideWriter:

    writer = SlideWriter(OUT, slide, grid, bundle, backend)
    for coords, markers, features in batches: writer.append(coords, markers, features)
    for coords, features in bag: writer.append_mica(coords, features)   # MICA's bag, when it has one
    writer.feature_chunks(4096)  # read back from disk in chunks, for MICA (mica_feature_chunks: the bag)
    writer.finish(coords, markers, codex_grid, mica=..., seconds=...)   # -> {"h5": path, ...}
    (writer.abort() on failure: drops the partial h5; no report.json, so not complete)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import tifffile
from PIL import Image

from .._core import __version__
from ..bundle import Bundle
from ..errors import OutputError
from ..files import DirectoryLock, prepare_output_dir, remove_stale_temps
from ..slide import Slide, TileGrid
from .geojson import write_geojson
from .ome_tiff import write_ome_tiff
from .overview import DEFAULT_MARKERS, write_overview_png
from .report import build_report, write_report_json
from .scores_h5 import ScoresH5, tissue_fraction


@dataclass(frozen=True)
class SlideOutputPaths:
    dir: Path
    h5: Path
    geojson: Path
    ome_tiff: Path
    overview: Path
    report: Path

    def as_dict(self) -> dict[str, Path]:
        return {"h5": self.h5, "geojson": self.geojson, "ome_tiff": self.ome_tiff, "overview": self.overview,
                "report": self.report}


def output_paths(out_dir: Path, stem: str) -> SlideOutputPaths:
    d = Path(out_dir) / stem
    return SlideOutputPaths(d, d / f"{stem}.h5", d / f"{stem}.geojson.gz", d / "virtual_codex.ome.tif",
                            d / "overview.png", d / "report.json")


class SlideWriter:
    """Writes one slide's outputs: tiles as they are scored, the rest at finish()."""

    def __init__(
        self,
        out_dir: Path,
        slide: Slide,
        grid: TileGrid,
        bundle: Bundle,
        backend: str,
        *,
        features_dim: int | None = 1024,
        overview_markers: Sequence[str] | str = DEFAULT_MARKERS,
        settings: Mapping | None = None,
        mica_bag: tuple[int, int, Mapping] | None = None,
        region: Mapping | None = None,
        name: str | None = None,
    ):
        """settings: the options that changed these outputs (report.json's "settings"; --resume
        compares them). mica_bag: (patches, feature width, mica_coords attributes) of MICA's bag.
        region: the scored part of the slide (slide.region.Region.describe()), said by every output.
        name: the output folder's and files' name (default the slide's: OUT/<stem>/)."""
        self.slide, self.grid, self.bundle, self.backend = slide, grid, bundle, backend
        self.settings = dict(settings or {})
        self.region = dict(region) if region else None
        self.overview_markers = overview_markers
        self.started_at = dt.datetime.now(dt.timezone.utc)
        self.paths = output_paths(out_dir, name or slide.name)
        self._done = False
        created = not self.paths.dir.exists()
        prepare_output_dir(self.paths.dir)
        self._lock = DirectoryLock(self.paths.dir)
        try:
            self._lock.acquire()
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    self.paths.dir.rmdir()
            raise
        try:
            remove_stale_temps(self.paths.dir)  # left by a run that was killed outright (SIGKILL, power)
            try:
                self.paths.report.unlink(missing_ok=True)  # incomplete until the new one is written
            except OSError as e:
                raise OutputError(self.paths.report, f"cannot remove the previous report: {e.strerror}") from e
            self._h5 = ScoresH5(
                self.paths.h5, slide, grid, bundle_hash=bundle.hash, demo=bundle.demo,
                marker_names=bundle.markers, features_dim=features_dim, mica_bag=mica_bag,
                extra_attrs={"region": json.dumps(self.region)} if self.region else None,
            )
        except BaseException:
            self._lock.release()
            raise

    def append(self, coords: np.ndarray, markers: np.ndarray, features: np.ndarray | None = None) -> None:
        self._h5.append(coords, markers, features)

    def append_mica(self, coords: np.ndarray, features: np.ndarray) -> None:
        self._h5.append_mica(coords, features)

    def feature_chunks(self, rows: int) -> Iterator[np.ndarray]:
        """The features written so far, read back from the h5 `rows` tiles at a time (for MICA)."""
        for start in range(0, len(self._h5), rows):
            yield self._h5.read("features", start, start + rows)

    def mica_feature_chunks(self, rows: int) -> Iterator[np.ndarray]:
        """MICA's bag as written so far, `rows` patches at a time."""
        for start in range(0, self._h5.mica_rows, rows):
            yield self._h5.read("mica_features", start, start + rows)

    def finish(
        self,
        coords: np.ndarray,
        markers: np.ndarray,
        codex_grid: np.ndarray,
        *,
        mica: Mapping | None = None,
        mica_attention: np.ndarray | None = None,
        bag_coords: np.ndarray | None = None,
        seconds: Mapping[str, float] | None = None,
        skipped: Sequence = (),
        tiles_per_s: float | None = None,
    ) -> dict[str, Path]:
        """Close the h5, then write the GeoJSON, the OME-TIFF, the overview and (last) report.json.

        coords, markers: the tiles appended, in order; codex_grid: them laid out one cell per
        stride ([gh, gw, 40], score.codex_grid.virtual_codex); mica: MICA's summary
        (score.mica_stream.mica_summary) or None; mica_attention: each bag tile's co-attention
        weight averaged over the markers, for the bag `bag_coords` (None: the bag is the HEX
        tiles themselves); seconds, skipped, tiles_per_s: for the report."""
        if len(coords) != len(self._h5):
            raise ValueError(f"finish() got {len(coords)} tiles; {len(self._h5)} were appended")
        t0 = time.perf_counter()
        if mica_attention is not None:
            self._h5.set_mica_attention(mica_attention, "mica_coords" if bag_coords is not None else "coords")
        self._h5.close()
        p, slide, grid, bundle = self.paths, self.slide, self.grid, self.bundle
        about = {"hexfast_version": __version__, "slide": slide.name, "bundle_hash": bundle.hash, "demo": bundle.demo,
                 "tile_size_level0": grid.tile_size, "marker_names": list(bundle.markers), "region": self.region,
                 "mica": ("risk " + format(mica["risk"], ".4g")) if mica and "risk" in mica else None}
        if bundle.demo:
            about["warning"] = "DEMO MODEL: untrained random weights; these values are not predictions"
        write_geojson(p.geojson, coords=coords, markers=markers, marker_names=bundle.markers,
                      tile_size=grid.tile_size, tissue_fraction=tissue_fraction(grid, coords), demo=bundle.demo,
                      hex_attention=mica_attention if bag_coords is None else None,
                      bag_coords=bag_coords, bag_attention=mica_attention if bag_coords is not None else None,
                      about=about)
        region_note = {"hexfast:region": json.dumps(self.region)} if self.region else None
        write_ome_tiff(p.ome_tiff, codex_grid, bundle.markers, grid.stride * slide.mpp, name=p.dir.name,
                       cell_px=grid.stride, level0_size=slide.dimensions, annotations=region_note)
        notes = [f"bundle {bundle.hash[:12]}" + (" (DEMO)" if bundle.demo else "")]
        if self.region:
            notes.append(f"REGION ONLY: {self.region['kind']} {self.region['bounds_level0']}")
        if mica is not None and "risk" in mica:
            notes.append(f"MICA risk {mica['risk']:.3g}" + (" (region only)" if self.region else ""))
        write_overview_png(
            p.overview, slide, grid, markers, codex_grid, coords=coords, demo=bundle.demo,
            marker_names=bundle.markers, show=self.overview_markers, notes=notes,
        )
        stages = dict(seconds or {})
        stages["write_outputs"] = time.perf_counter() - t0
        report = build_report(
            slide, grid, seconds=stages, backend=self.backend, bundle_hash=bundle.hash, demo=bundle.demo,
            bundle_manifest=bundle.manifest, mica=mica, started_at=self.started_at, tile_count=len(coords),
            skipped=skipped, tiles_per_s=tiles_per_s, settings=self.settings,
            outputs={k: v.name for k, v in p.as_dict().items() if k != "report"},
            extra={"region": self.region} if self.region else None,
        )
        write_report_json(p.report, report)
        self._done = True
        self._lock.release()
        return p.as_dict()

    def abort(self) -> None:
        """Drop the partial h5. Files already renamed into place stay, but without
        report.json the slide is not complete, so --resume redoes it."""
        if not self._done:
            self._h5.abort()
            self._lock.release()
            with contextlib.suppress(OSError):  # a first run that failed leaves no empty OUT/<stem>/
                self.paths.dir.rmdir()

    def __enter__(self) -> SlideWriter:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None:
            self.abort()


def outputs_complete(out_dir: Path, stem: str, bundle_hash: str | None = None,
                     settings: Mapping | None = None) -> bool:
    """True when OUT/<stem>/ holds a whole set from one finished run: all five files, report.json
    parses, the h5 has coords (N,2) and codex_prediction (N,C) with N = the report's tile_count,
    the OME-TIFF is a C-channel image and the PNG decodes, and MICA's bag (when the report says it
    read one) has the patches the report counts. With bundle_hash and settings, the run
    must also have used that bundle and those settings (a resume with other weights, another
    stride, MPP, tissue threshold, stain normalisation or precision redoes the slide)."""
    paths = output_paths(out_dir, stem)
    if not all(p.is_file() for p in (paths.h5, paths.geojson, paths.ome_tiff, paths.overview, paths.report)):
        return False
    try:
        report = json.loads(paths.report.read_text(encoding="utf-8"))
        n = int(report["tile_count"])
        if bundle_hash is not None and report["bundle"]["hash"] != bundle_hash:
            return False
        if settings is not None and report.get("settings") != json.loads(json.dumps(dict(settings))):
            return False
        with h5py.File(paths.h5, "r") as f:
            coords, pred = f["coords"], f["codex_prediction"]
            if not (coords.shape == (n, 2) and pred.ndim == 2 and pred.shape[0] == n):
                return False
            channels = pred.shape[1]
            bag = (report.get("mica") or {}).get("bag") or {}
            if bag.get("tiles") and f["mica_coords"].shape != (int(bag["tiles"]), 2):
                return False
        with tifffile.TiffFile(paths.ome_tiff) as tif:
            if not (tif.is_ome and tif.series[0].shape[0] == channels):
                return False
        with Image.open(paths.overview) as png:
            png.verify()
        with gzip.open(paths.geojson, "rt", encoding="utf-8") as f:  # its start; the whole was renamed into place
            if not f.read(64).startswith('{"type":"FeatureCollection"'):
                return False
        return True
    except Exception:  # noqa: BLE001 - whatever does not parse is not complete
        return False
