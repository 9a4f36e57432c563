"""All of one slide's score outputs, in OUT/<stem>/, and whether they are complete.

OUT/<stem>/<stem>.h5               coords, codex_prediction, features; mica_coords, mica_features,
                                   mica_attention (scores_h5)
OUT/<stem>/<stem>.geojson.gz       the tiles as QuPath tile objects with their measurements (geojson)
OUT/<stem>/virtual_codex.ome.tif   the virtual CODEX grid, 40 named channels (ome_tiff)
OUT/<stem>/overview.png            thumbnail + marker heatmaps (overview)
OUT/<stem>/report.json             metadata, timings, MICA (report) -- written LAST

The h5 and report.json are always written; `outputs` (OUTPUTS, --outputs) chooses the other three.

The set changes as one: a SlideWriter writes the new set into OUT/.<stem>.partial/ and only when
all its files are there swaps it for OUT/<stem>/ (rename the old folder aside, rename the new one
in, delete the old). A run that fails, is interrupted (SIGINT, SIGTERM) or meets a full disk
removes its partial folder and leaves the previous set exactly as it was; a run killed outright
leaves the partial folder, which the next writer of that slide clears, and a kill between the two
renames is undone by it (OUT/.<stem>.old/ is renamed back). Files a user put into OUT/<stem>/
that are not hexfast outputs move over to the new set.

One writer at a time: a SlideWriter holds the lock of OUT/.<stem>.partial/ from start to finish;
a second one (another run into the same OUT, or another Scorer.score() call on the same slide)
fails at once naming the holder, and only the holder clears the partial folder, whose contents
are then certainly a dead run's.

Completeness: a report.json that parses, was made with the same bundle and settings, and agrees
with the other files it lists (each of which opens as what it is) means the set is whole and from one run;
`--resume` skips exactly those slides (outputs_complete).

The pipeline streams into a SlideWriter:

    writer = SlideWriter(OUT, slide, grid, bundle, backend)
    for coords, markers, features in batches: writer.append(coords, markers, features)
    for coords, features in bag: writer.append_mica(coords, features)   # MICA's bag, when it has one
    writer.feature_chunks(4096)  # read back from disk in chunks, for MICA (mica_feature_chunks: the bag)
    writer.finish(coords, markers, codex_grid, mica=..., seconds=...)   # -> {"h5": path, ...}
    (writer.abort() on failure: drops the partial folder; OUT/<stem>/ is as it was)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import json
import os
import shutil
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
from ..files import LOCK_NAME, DirectoryLock, one_line, prepare_output_dir
from ..slide import Slide, TileGrid
from .geojson import write_geojson
from .ome_tiff import write_ome_tiff
from .overview import DEFAULT_MARKERS, write_overview_png
from .report import build_report, write_report_json
from .scores_h5 import ScoresH5, tissue_fraction

# The outputs a run may choose (--outputs); the h5 is always among them and report.json always written.
OUTPUTS = ("h5", "geojson", "ome-tiff", "overview")


def checked_outputs(names: Sequence[str] | str) -> tuple[str, ...]:
    """`names` (a list, or "h5,geojson,...") in OUTPUTS order, with the h5 added; unknown names refused."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise OutputError(Path(unknown[0]), f"not an output hexfast writes (choose from {', '.join(OUTPUTS)})")
    return tuple(n for n in OUTPUTS if n in names or n == "h5")


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
    return _paths_in(Path(out_dir) / stem, stem)


def partial_dir(out_dir: Path, stem: str) -> Path:
    """Where a run writes a slide's new set until it is complete (hidden, beside OUT/<stem>/)."""
    return Path(out_dir) / f".{stem}.partial"


def _old_dir(out_dir: Path, stem: str) -> Path:
    return Path(out_dir) / f".{stem}.old"


def _paths_in(d: Path, stem: str) -> SlideOutputPaths:
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
        precision: Mapping | None = None,
        outputs: Sequence[str] = OUTPUTS,
        started_at: dt.datetime | None = None,
    ):
        """settings: the options that changed these outputs (report.json's "settings"; --resume
        compares them). mica_bag: (patches, feature width, mica_coords attributes) of MICA's bag.
        region: the scored part of the slide (slide.region.Region.describe()), said by every output.
        name: the output folder's and files' name (default the slide's: OUT/<stem>/). precision: what HEX
        ran at and its recorded fidelity (score.precision.HexPrecision.describe()), said by report.json and the h5.
        outputs: which of OUTPUTS to write. started_at: when work on the slide began (default now)."""
        self.slide, self.grid, self.bundle, self.backend = slide, grid, bundle, backend
        self.settings = dict(settings or {})
        self.region = dict(region) if region else None
        self.precision = dict(precision) if precision else None
        self.overview_markers = overview_markers
        self.outputs = checked_outputs(outputs)
        self.seconds: dict[str, float] = {}  # report.json's stages, once finish() has written it
        self.started_at = started_at or dt.datetime.now(dt.timezone.utc)
        stem = name or slide.name
        self.paths = output_paths(out_dir, stem)
        if self.paths.dir.exists() and not self.paths.dir.is_dir():
            raise OutputError(self.paths.dir, "output path exists and is not a directory")
        self._stage = _paths_in(partial_dir(out_dir, stem), stem)
        self._done = False
        self._lock = _lock_partial(self._stage.dir, self.paths.dir)
        try:
            _recover(Path(out_dir), stem)
            _clear(self._stage.dir)  # a run killed outright (SIGKILL, power) left it
            self._h5 = ScoresH5(
                self._stage.h5, slide, grid, bundle_hash=bundle.hash, demo=bundle.demo,
                marker_names=bundle.markers, features_dim=features_dim, mica_bag=mica_bag,
                extra_attrs=self._attrs(),
            )
        except BaseException:
            self._discard()
            raise

    def _described(self) -> dict:
        """What every run-level output says beyond the slide: the region scored, HEX's precision."""
        return {k: v for k, v in (("region", self.region), ("hex_precision", self.precision)) if v}

    def _attrs(self) -> dict | None:
        return {k: json.dumps(v) for k, v in self._described().items()} or None

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
        hex_tiles_per_s: float | None = None,
    ) -> dict[str, Path]:
        """Close the h5, then write the GeoJSON, the OME-TIFF, the overview and (last) report.json.

        coords, markers: the tiles appended, in order; codex_grid: them laid out one cell per
        stride ([gh, gw, 40], score.codex_grid.virtual_codex); mica: MICA's summary
        (score.mica_stream.mica_summary) or None; mica_attention: each bag tile's co-attention
        weight averaged over the markers, for the bag `bag_coords` (None: the bag is the HEX
        tiles themselves); seconds, skipped, hex_tiles_per_s: for the report, whose stages (these and
        the writing) are kept in self.seconds."""
        if len(coords) != len(self._h5):
            raise ValueError(f"finish() got {len(coords)} tiles; {len(self._h5)} were appended")
        t0 = time.perf_counter()
        if mica_attention is not None:
            self._h5.set_mica_attention(mica_attention, "mica_coords" if bag_coords is not None else "coords")
        ranking = (mica or {}).get("most_attended")
        if ranking:
            rows = [*ranking["per_marker"], "overall"]
            lists = [*ranking["per_marker"].values(), ranking["overall"]]
            self._h5.set_mica_ranking([[t["tile"] for t in ls] for ls in lists],
                                      [[t["attention"] for t in ls] for ls in lists], rows)
        self._h5.close()
        p, slide, grid, bundle = self._stage, self.slide, self.grid, self.bundle
        about = {"hexfast_version": __version__, "slide": slide.name, "bundle_hash": bundle.hash, "demo": bundle.demo,
                 "tile_size_level0": grid.tile_size, "marker_names": list(bundle.markers), "region": self.region,
                 "mica": ("risk " + format(mica["risk"], ".4g")) if mica and "risk" in mica else None}
        if bundle.demo:
            about["warning"] = "DEMO MODEL: untrained random weights; these values are not predictions"
        if "geojson" in self.outputs:
            write_geojson(p.geojson, coords=coords, markers=markers, marker_names=bundle.markers,
                          tile_size=grid.tile_size, tissue_fraction=tissue_fraction(grid, coords), demo=bundle.demo,
                          hex_attention=mica_attention if bag_coords is None else None,
                          bag_coords=bag_coords, bag_attention=mica_attention if bag_coords is not None else None,
                          about=about)
        region_note = {"hexfast:region": json.dumps(self.region)} if self.region else None
        if "ome-tiff" in self.outputs:
            write_ome_tiff(p.ome_tiff, codex_grid, bundle.markers, grid.stride * slide.mpp, name=self.paths.dir.name,
                           cell_px=grid.stride, level0_size=slide.dimensions, annotations=region_note,
                           demo=bundle.demo)
        notes = [f"bundle {bundle.hash[:12]}" + (" (DEMO)" if bundle.demo else "")]
        if self.region:
            notes.append(f"REGION ONLY: {self.region['kind']} {self.region['bounds_level0']}")
        if mica is not None and "risk" in mica and self.region:
            notes.append("MICA saw the region only")
        if "overview" in self.outputs:
            write_overview_png(p.overview, slide, grid, markers, codex_grid, coords=coords, demo=bundle.demo,
                               marker_names=bundle.markers, show=self.overview_markers, notes=notes, mica=mica)
        stages = {k: v for k, v in (seconds or {}).items() if k != "total"}
        stages["outputs"] = time.perf_counter() - t0
        written = {k: v for k, v in p.as_dict().items() if k in ("h5", "report") or k.replace("_", "-") in self.outputs}
        report = build_report(
            slide, grid, seconds=stages, backend=self.backend, bundle_hash=bundle.hash, demo=bundle.demo,
            bundle_manifest=bundle.manifest, mica=shortened(mica), started_at=self.started_at, tile_count=len(coords),
            skipped=skipped, hex_tiles_per_s=hex_tiles_per_s, settings=resolved_settings(self.settings, grid.stride, slide.mpp),
            outputs={k: v.name for k, v in written.items() if k != "report"},
            extra=self._described() or None,
        )
        self.seconds = dict(report["seconds"])
        write_report_json(p.report, report)
        self._swap_in()
        self._done = True
        return {k: self.paths.as_dict()[k] for k in written}

    def abort(self) -> None:
        """Drop the partial set; OUT/<stem>/ stays exactly as it was (safe to call twice)."""
        if not self._done:
            self._done = True
            self._h5.abort()
            self._discard()

    def _swap_in(self) -> None:
        """The complete new set replaces OUT/<stem>/; files a user added there move over to it."""
        final, old = self.paths.dir, _old_dir(self.paths.dir.parent, self.paths.dir.name)
        new_names = {q.name for q in self._stage.as_dict().values()}
        try:
            if final.is_dir():
                os.replace(final, old)
            try:
                os.replace(self._stage.dir, final)
            except OSError:
                if old.is_dir():
                    os.replace(old, final)
                raise
        except OSError as e:
            raise OutputError(final, f"cannot put the new outputs in place: {one_line(e.strerror or e)}") from e
        self._lock.moved_to(final)  # the lock file went with the set; release() removes it there
        self._lock.release()
        if old.is_dir():
            for entry in old.iterdir():
                if entry.name not in new_names and not entry.name.startswith("."):
                    os.replace(entry, final / entry.name)
            shutil.rmtree(old, ignore_errors=True)

    def _discard(self) -> None:
        _empty_and_unlock(self._stage.dir, self._lock)

    def __enter__(self) -> SlideWriter:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None:
            self.abort()


def _lock_partial(stage: Path, final: Path) -> DirectoryLock:
    """The slide's writer lock (OUT/.<stem>.partial/.hexfast.lock); a holder is named as OUT/<stem>."""
    prepare_output_dir(stage)
    try:
        return DirectoryLock(stage).acquire()
    except OutputError as e:
        with contextlib.suppress(OSError):
            stage.rmdir()
        raise OutputError(final, e.problem) from None


def _empty_and_unlock(stage: Path, lock: DirectoryLock) -> None:
    """A partial folder's contents, its lock, then the folder (unless another writer took it in between)."""
    _clear(stage)
    lock.release()
    with contextlib.suppress(OSError):
        stage.rmdir()


def _clear(stage: Path) -> None:
    """Everything in a partial folder but its lock."""
    if stage.is_dir():
        for entry in stage.iterdir():
            if entry.name != LOCK_NAME:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)


def _recover(out_dir: Path, stem: str) -> None:
    """A run killed between the swap's two renames left the previous set in OUT/.<stem>.old/: put it back
    (no OUT/<stem>/) or delete it (the new set made it in)."""
    final, old = out_dir / stem, _old_dir(out_dir, stem)
    if old.is_dir():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


REPORT_TOP = 10  # most-attended tiles report.json lists overall; 3 per marker (all of them: the h5)


def shortened(mica: Mapping | None) -> dict | None:
    """MICA's summary for report.json: the top tiles overall and per marker, not every ranked tile (those
    go to the h5's mica_most_attended)."""
    if not mica or "most_attended" not in mica:
        return mica
    top = mica["most_attended"]
    short = {"top_k": min(REPORT_TOP, len(top["overall"])), "coords": top["coords"],
             "overall": top["overall"][:REPORT_TOP],
             "per_marker_format": "[x, y, attention] of the 3 tiles MICA attended to most for the marker, best first",
             "per_marker": {m: [[t["x"], t["y"], round(t["attention"], 6)] for t in ls[:3]]
                            for m, ls in top["per_marker"].items()},
             "all": "the h5's mica_most_attended group (rows of mica_coords, or coords)"}
    return dict(mica) | {"most_attended": short}


def resolved_settings(settings: Mapping, stride, mpp) -> dict:
    """`settings` with the slide's own values for those left to it (stride None: the tile size; MPP None:
    the file's), as report.json records them."""
    out = dict(settings)
    if out.get("stride") is None:
        out["stride"] = stride
    if out.get("mpp") is None:
        out["mpp"] = mpp
    return out


def _own_values(slide: Mapping) -> tuple:
    """(stride, MPP) a run without --stride / --mpp gets, from a report's "slide": the tile size, and the
    file's MPP (none known when that run had an --mpp)."""
    return slide.get("tile_size_level0"), slide.get("mpp") if slide.get("mpp_source") != "--mpp" else "the file's"


def drop_partial(out_dir: Path, stem: str) -> None:
    """What a run killed mid-slide left for OUT/<stem>/ (the partial set), unless a live writer holds it."""
    stage = partial_dir(out_dir, stem)
    if not stage.is_dir():
        return
    try:
        lock = DirectoryLock(stage).acquire()
    except OutputError:
        return
    _empty_and_unlock(stage, lock)


def outputs_complete(out_dir: Path, stem: str, bundle_hash: str | None = None,
                     settings: Mapping | None = None) -> bool:
    """True when OUT/<stem>/ holds a whole set from one finished run: all five files, report.json
    parses, the h5 has coords (N,2) and codex_prediction (N,C) with N = the report's tile_count,
    the OME-TIFF is a C-channel image and the PNG decodes, and MICA's bag (when the report says it
    read one) has the patches the report counts. With bundle_hash and settings, the run
    must also have used that bundle and those settings (a resume with other weights, another
    stride, MPP, tissue threshold, stain normalisation or precision redoes the slide)."""
    paths = output_paths(out_dir, stem)
    if not (paths.h5.is_file() and paths.report.is_file()):
        return False
    try:
        report = json.loads(paths.report.read_text(encoding="utf-8"))
        n = int(report["tile_count"])
        listed = set(report["outputs"])
        files = {"h5": paths.h5, "geojson": paths.geojson, "ome_tiff": paths.ome_tiff, "overview": paths.overview}
        if not all(files[k].is_file() for k in listed):
            return False
        if bundle_hash is not None and report["bundle"]["hash"] != bundle_hash:
            return False
        if settings is not None and report.get("settings") != json.loads(json.dumps(
                resolved_settings(settings, *_own_values(report["slide"])))):
            return False
        with h5py.File(paths.h5, "r") as f:
            coords, pred = f["coords"], f["codex_prediction"]
            if not (coords.shape == (n, 2) and pred.ndim == 2 and pred.shape[0] == n):
                return False
            channels = pred.shape[1]
            bag = (report.get("mica") or {}).get("bag") or {}
            if bag.get("tiles") and f["mica_coords"].shape != (int(bag["tiles"]), 2):
                return False
        if "ome_tiff" in listed:
            with tifffile.TiffFile(paths.ome_tiff) as tif:
                if not (tif.is_ome and tif.series[0].shape[0] == channels):
                    return False
        if "overview" in listed:
            with Image.open(paths.overview) as png:
                png.verify()
        if "geojson" in listed:
            with gzip.open(paths.geojson, "rt", encoding="utf-8") as f:  # its start; the set was renamed into place
                if not f.read(64).startswith('{"type":"FeatureCollection"'):
                    return False
        return True
    except Exception:  # noqa: BLE001 - whatever does not parse is not complete
        return False
