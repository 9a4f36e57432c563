"""All of one slide's score outputs, in OUT/<stem>/, and whether they are complete.

OUT/<stem>/<stem>.h5               coords, codex_prediction, features (outputs.write_scores_h5)
OUT/<stem>/virtual_codex.ome.tif   the virtual CODEX grid, 40 named channels (ome_tiff)
OUT/<stem>/overview.png            thumbnail + marker heatmaps (overview)
OUT/<stem>/report.json             metadata, timings, MICA (report) -- written LAST

Completeness: each file is written atomically, and report.json is removed
before anything else is written and written only after the other three
succeed. So a report.json that parses and agrees with the h5 means the set is
whole and from one run; `--resume` skips exactly those slides.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .codex_grid import virtual_codex
from .errors import OutputError
from .markers import MARKERS
from .ome_tiff import write_ome_tiff
from .outputs import prepare_output_dir, write_scores_h5
from .overview import DEFAULT_MARKERS, write_overview_png
from .report import build_report, write_report_json
from .slide import Slide
from .tiling import TileGrid


@dataclass(frozen=True)
class SlideOutputPaths:
    dir: Path
    h5: Path
    ome_tiff: Path
    overview: Path
    report: Path


def output_paths(out_dir: Path, stem: str) -> SlideOutputPaths:
    d = Path(out_dir) / stem
    return SlideOutputPaths(d, d / f"{stem}.h5", d / "virtual_codex.ome.tif", d / "overview.png", d / "report.json")


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
    marker_names: Sequence[str] = MARKERS,
    overview_markers: Sequence[str] | str = DEFAULT_MARKERS,
    started_at: dt.datetime | None = None,
) -> SlideOutputPaths:
    """Write the four outputs into OUT/<stem>/ (report.json last; see the module doc).

    mica: report.mica_summary(...) or None. The OME-TIFF grid uses step = stride
    (one pixel per tile; with the default stride = tile size this is the
    reference's virtual CODEX grid) and pixel size stride x MPP.
    """
    paths = output_paths(out_dir, stem)
    prepare_output_dir(paths.dir)
    try:
        paths.report.unlink(missing_ok=True)  # incomplete until the new one is written
    except OSError as e:
        raise OutputError(paths.report, f"cannot remove the previous report: {e.strerror}") from e
    t0 = time.perf_counter()
    write_scores_h5(
        paths.h5, slide, grid, codex_prediction, features,
        bundle_hash=bundle_hash, demo=demo, marker_names=marker_names,
    )
    codex, _ = virtual_codex(grid.coords, codex_prediction, grid.stride, slide.dimensions)
    write_ome_tiff(paths.ome_tiff, codex, marker_names, grid.stride * slide.mpp, name=stem)
    notes = [f"bundle {bundle_hash[:12]}" + (" (DEMO)" if demo else "")]
    if mica is not None:
        notes.append(f"MICA risk {mica['risk']:.3g}")
    write_overview_png(
        paths.overview, slide, grid, codex_prediction,
        demo=demo, marker_names=marker_names, show=overview_markers, notes=notes,
    )
    stages = dict(seconds)
    stages["write_outputs"] = time.perf_counter() - t0
    report = build_report(
        slide, grid, seconds=stages, backend=backend, bundle_hash=bundle_hash, demo=demo,
        bundle_manifest=bundle_manifest, mica=mica, started_at=started_at,
        outputs={k: p.name for k, p in (("h5", paths.h5), ("ome_tiff", paths.ome_tiff), ("overview", paths.overview))},
    )
    write_report_json(paths.report, report)
    return paths


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
