"""All of one slide's score outputs, in OUT/<stem>/, and whether they are complete.

OUT/<stem>/<stem>.h5               coords, codex_prediction, features (scores_h5)
OUT/<stem>/virtual_codex.ome.tif   the virtual CODEX grid, 40 named channels (ome_tiff)
OUT/<stem>/overview.png            thumbnail + marker heatmaps (overview)
OUT/<stem>/report.json             metadata, timings, MICA (report) -- written LAST

Completeness: each file is written atomically; report.json is removed before
anything else is written and written only after the other three succeeded.
So a report.json that parses and agrees with the h5 means the set is whole and
from one run; `--resume` skips exactly those slides (outputs_complete).

The pipeline streams into a SlideWriter:

    writer = SlideWriter(OUT, slide, grid, bundle, backend)
    for coords, markers, features in batches: writer.append(coords, markers, features)
    writer.feature_chunks(4096)  # read back from disk in chunks, e.g. for MICA
    writer.finish(result)        # -> {"h5": path, "ome_tiff": ..., "overview": ..., "report": ...}
    (writer.abort() on failure: drops the partial h5; no report.json, so not complete)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .codex_grid import virtual_codex
from .errors import OutputError
from .markers import MARKERS
from .ome_tiff import write_ome_tiff
from .outputs import prepare_output_dir
from .overview import DEFAULT_MARKERS, write_overview_png
from .report import build_report, mica_from_outputs, write_report_json
from .scores_h5 import ScoresH5
from .slide import Slide
from .tiling import TileGrid


@dataclass(frozen=True)
class SlideOutputPaths:
    dir: Path
    h5: Path
    ome_tiff: Path
    overview: Path
    report: Path

    def as_dict(self) -> dict[str, Path]:
        return {"h5": self.h5, "ome_tiff": self.ome_tiff, "overview": self.overview, "report": self.report}


def output_paths(out_dir: Path, stem: str) -> SlideOutputPaths:
    d = Path(out_dir) / stem
    return SlideOutputPaths(d, d / f"{stem}.h5", d / "virtual_codex.ome.tif", d / "overview.png", d / "report.json")


@dataclass
class BundleInfo:
    """What the outputs need from a model bundle (hexfast.bundle.Bundle has these attributes)."""

    hash: str
    demo: bool
    manifest: Mapping = field(default_factory=dict)
    markers: Sequence[str] = MARKERS


class SlideWriter:
    """Writes one slide's outputs: tiles as they are scored, the rest at finish()."""

    def __init__(
        self,
        out_dir: Path,
        slide: Slide,
        grid: TileGrid,
        bundle: Any,
        backend: str,
        *,
        stem: str | None = None,
        features_dim: int | None = 1024,
        overview_markers: Sequence[str] | str = DEFAULT_MARKERS,
    ):
        """bundle: a hexfast.bundle.Bundle or BundleInfo (hash, demo, manifest, markers)."""
        self.slide, self.grid, self.bundle, self.backend = slide, grid, bundle, backend
        self.marker_names = list(getattr(bundle, "markers", MARKERS))
        self.overview_markers = overview_markers
        self.started_at = dt.datetime.now(dt.timezone.utc)
        self.paths = output_paths(out_dir, stem or slide.path.stem)
        prepare_output_dir(self.paths.dir)
        for stale in self.paths.dir.glob(".*.tmp"):  # left by a run that was killed outright (SIGKILL, power)
            stale.unlink(missing_ok=True)
        try:
            self.paths.report.unlink(missing_ok=True)  # incomplete until the new one is written
        except OSError as e:
            raise OutputError(self.paths.report, f"cannot remove the previous report: {e.strerror}") from e
        self._h5 = ScoresH5(
            self.paths.h5, slide, grid, bundle_hash=bundle.hash, demo=bundle.demo,
            marker_names=self.marker_names, features_dim=features_dim,
        )
        self._done = False

    def append(self, coords: np.ndarray, markers: np.ndarray, features: np.ndarray | None = None) -> None:
        self._h5.append(coords, markers, features)

    def feature_chunks(self, rows: int) -> Iterator[np.ndarray]:
        """The features written so far, read back from the h5 `rows` tiles at a time (for MICA)."""
        for start in range(0, len(self._h5), rows):
            yield self._h5.read("features", start, start + rows)

    def finish(
        self,
        result: Any = None,
        *,
        mica: Mapping | None = None,
        seconds: Mapping[str, float] | None = None,
        skipped: Sequence | None = None,
        tiles_per_s: float | None = None,
    ) -> dict[str, Path]:
        """Close the h5, then write the OME-TIFF, the overview and (last) report.json.

        result: the pipeline's SlideResult (its .mica, .seconds, .skipped and
        .tiles_per_s are used), or pass those directly. mica: the MICA
        engine's outputs (hazards, survival, risk, coattn) or a mica_summary().
        """
        if result is not None:
            mica = mica if mica is not None else getattr(result, "mica", None)
            seconds = seconds if seconds is not None else getattr(result, "seconds", None)
            skipped = skipped if skipped is not None else getattr(result, "skipped", None)
            tiles_per_s = tiles_per_s if tiles_per_s is not None else getattr(result, "tiles_per_s", None)
        t0 = time.perf_counter()
        coords = self._h5.read("coords")
        markers = self._h5.read("codex_prediction")
        self._h5.close()
        p, slide, grid = self.paths, self.slide, self.grid
        # One pixel per tile: step = stride (= the reference's tile-size grid at the default stride).
        codex, _ = virtual_codex(coords, markers, grid.stride, slide.dimensions)
        write_ome_tiff(p.ome_tiff, codex, self.marker_names, grid.stride * slide.mpp, name=p.dir.name)
        summary = mica_from_outputs(mica, coords, self.marker_names) if mica is not None else None
        notes = [f"bundle {self.bundle.hash[:12]}" + (" (DEMO)" if self.bundle.demo else "")]
        if summary is not None:
            notes.append(f"MICA risk {summary['risk']:.3g}")
        write_overview_png(
            p.overview, slide, grid, markers, coords=coords, demo=self.bundle.demo,
            marker_names=self.marker_names, show=self.overview_markers, notes=notes,
        )
        stages = dict(seconds or {})
        stages["write_outputs"] = time.perf_counter() - t0
        report = build_report(
            slide, grid, seconds=stages, backend=self.backend, bundle_hash=self.bundle.hash,
            demo=self.bundle.demo, bundle_manifest=getattr(self.bundle, "manifest", None), mica=summary,
            started_at=self.started_at, tile_count=len(coords), skipped=skipped, tiles_per_s=tiles_per_s,
            outputs={k: v.name for k, v in p.as_dict().items() if k != "report"},
        )
        write_report_json(p.report, report)
        self._done = True
        return p.as_dict()

    def abort(self) -> None:
        """Drop the partial h5. Files already renamed into place stay, but without
        report.json the slide is not complete, so --resume redoes it."""
        if not self._done:
            self._h5.abort()
            with contextlib.suppress(OSError):  # a first run that failed leaves no empty OUT/<stem>/
                self.paths.dir.rmdir()

    def __enter__(self) -> SlideWriter:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None:
            self.abort()


def write_slide_outputs(
    out_dir: Path,
    stem: str,
    *,
    slide: Slide,
    grid: TileGrid,
    codex_prediction: np.ndarray,
    features: np.ndarray | None,
    bundle_hash: str,
    demo: bool,
    seconds: Mapping[str, float],
    backend: str,
    bundle_manifest: Mapping | None = None,
    mica: Mapping | None = None,
    coords: np.ndarray | None = None,
    skipped: Sequence | None = None,
    marker_names: Sequence[str] = MARKERS,
    overview_markers: Sequence[str] | str = DEFAULT_MARKERS,
) -> SlideOutputPaths:
    """All four outputs at once, for results already in memory (coords default to the grid's)."""
    coords = np.asarray(grid.coords if coords is None else coords, np.int64).reshape(-1, 2)
    bundle = BundleInfo(bundle_hash, demo, bundle_manifest or {}, list(marker_names))
    dim = None if features is None else np.asarray(features).shape[-1]
    with SlideWriter(
        out_dir, slide, grid, bundle, backend, stem=stem, features_dim=dim, overview_markers=overview_markers
    ) as writer:
        if len(coords):
            writer.append(coords, codex_prediction, features)
        writer.finish(mica=mica, seconds=seconds, skipped=skipped)
    return writer.paths


def outputs_complete(out_dir: Path, stem: str, bundle_hash: str | None = None) -> bool:
    """True when OUT/<stem>/ holds a whole set from one finished run: all four
    files, report.json parses, and the h5 has coords (N,2) and codex_prediction
    (N,C) with N = the report's tile_count. With bundle_hash, the run must also
    have used that bundle (a resume with other weights redoes the slide)."""
    paths = output_paths(out_dir, stem)
    if not all(p.is_file() for p in (paths.h5, paths.ome_tiff, paths.overview, paths.report)):
        return False
    try:
        report = json.loads(paths.report.read_text(encoding="utf-8"))
        n = int(report["tile_count"])
        if bundle_hash is not None and report["bundle"]["hash"] != bundle_hash:
            return False
        with h5py.File(paths.h5, "r") as f:
            coords, pred = f["coords"], f["codex_prediction"]
            return coords.shape == (n, 2) and pred.ndim == 2 and pred.shape[0] == n
    except (OSError, ValueError, KeyError, TypeError):
        return False
