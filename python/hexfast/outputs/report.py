"""report.json: what was run on a slide, how long it took, and MICA's answer."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .._core import __version__
from ..files import writing_file
from ..slide import Slide, TileGrid

DEMO_WARNING = "DEMO MODEL \u2014 UNTRAINED WEIGHTS \u2014 NOT A PREDICTION"
DEMO_DETAIL = (
    f"{DEMO_WARNING}: these outputs come from hexfast's demo bundle, whose weights are untrained; "
    "they exercise the pipeline and say nothing about this slide."
)
REPORT_SCHEMA = 2  # 2: seconds.total is the slide's time; per-tile attention lists moved to the h5
# What MICA's numbers mean (the official core_utils.py: risk = -sum(survival); dataset.py: the bins are
# quartiles of the training cohort's uncensored survival times), said beside them in report.json.
MICA_RISK_SCALE = ("-(sum of the survival probabilities over MICA's 4 time bins): from -4 (lowest risk) to 0 "
                   "(highest); larger means higher risk. Comparable only between slides scored with the same model")
MICA_BINS = ("4 discrete survival-time intervals: the quartiles of the training cohort's uncensored survival times "
             "(official dataset.py). The checkpoint does not record their bounds; hazards[i] is the probability "
             "of the event in interval i given survival to it, survival[i] the probability of surviving past it")
# Manifest fields worth carrying into every report (the rest stays in the bundle).
MANIFEST_KEYS = (
    "schema", "demo", "exporter", "created", "tile", "input_normalisation", "mica_features",
    "sources", "environment",
)


def to_jsonable(obj):
    """numpy scalars/arrays, paths, datetimes, tuples -> plain JSON types; NaN/inf -> None (not valid JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):  # 10 significant digits: 0.6450399999999998 is 0.64504
        return float(f"{obj:.10g}") if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (dt.datetime, dt.date)):
        return obj.isoformat()
    raise TypeError(f"report value of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")


def slide_metadata(slide: Slide, grid: TileGrid) -> dict:
    return {
        "path": str(slide.path.resolve()),
        "name": slide.path.name,
        "vendor": slide.vendor,
        "dimensions": list(slide.dimensions),
        "level_count": slide.level_count,
        "mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
        "objective_power": slide.objective_power,
        "magnification": slide.tile.magnification,
        "in_reference_bucket": slide.tile.in_reference_bucket,
        "tile_size_level0": grid.tile_size,
        "tile_um": grid.tile_size * slide.mpp,
        "stride": grid.stride,
        "min_tissue": grid.min_tissue,
        "saturation_threshold": grid.tissue.threshold,
        "tissue_area_mm2": round(grid.tissue.area_mm2, 4),
    }


def bundle_provenance(bundle_hash: str | None, manifest: Mapping | None = None) -> dict:
    """The bundle's hash and the manifest fields that say where its weights came from."""
    out = {"hash": bundle_hash}
    manifest = manifest or {}
    for key in MANIFEST_KEYS:
        if key in manifest:
            out[key] = manifest[key]
    models = manifest.get("models")
    if isinstance(models, Mapping):  # which models, and how close the export was to the source
        out["models"] = {name: {"parity": m.get("parity")} for name, m in models.items() if isinstance(m, Mapping)}
    return out


def no_tissue_warning(grid: TileGrid) -> str:
    return (
        f"NO TISSUE FOUND: no tile is at least {grid.min_tissue:g} tissue (tissue area "
        f"{grid.tissue.area_mm2:.3f} mm\u00b2, saturation threshold {grid.tissue.threshold}); the h5 is empty, "
        "the virtual CODEX is blank and MICA did not run"
    )


def build_report(
    slide: Slide,
    grid: TileGrid,
    *,
    seconds: Mapping[str, float],
    backend: str,
    bundle_hash: str | None,
    demo: bool,
    bundle_manifest: Mapping | None = None,
    mica: Mapping | None = None,
    outputs: Mapping[str, str] | None = None,
    started_at: dt.datetime | None = None,
    tile_count: int | None = None,
    skipped: Sequence | None = None,
    hex_tiles_per_s: float | None = None,
    settings: Mapping | None = None,
    extra: Mapping | None = None,
) -> dict:
    """The report as a dict (JSON-ready after to_jsonable).

    seconds: wall time per stage, each counted once (a stage "within" another is shown but not added);
    the report adds "total", the slide's time, and tiles_per_s = tiles / total, the figures the terminal
    and the summary table show. hex_tiles_per_s: tiles over the streaming + HEX stage alone.
    mica: MICA's summary (score.mica_stream.mica_summary), or None when MICA did not run.
    settings: every option that changes an output (stride, MPP, tissue, stain, precision):
    `--resume` redoes a slide scored with others.
    tile_count: tiles scored (default: the grid's); skipped: the stream's
    (index, x, y, message) for tiles that could not be read.
    """
    n = len(grid) if tile_count is None else int(tile_count)
    stages = {k: round(float(v), 3) for k, v in seconds.items() if k != "total"}
    total = round(sum(v for k, v in stages.items() if "within" not in k), 3)  # of the figures shown: they add up
    finished = dt.datetime.now(dt.timezone.utc)
    report: dict = {}
    if demo:
        report["warning"] = DEMO_DETAIL  # first, where nobody can miss it
    if len(grid) == 0:
        report["warnings"] = [no_tissue_warning(grid)]
    report |= {
        "schema": REPORT_SCHEMA,
        "hexfast_version": __version__,
        "demo": bool(demo),
        "slide": slide_metadata(slide, grid),
        "tile_count": n,
        "grid_tile_count": len(grid),
        "skipped_tiles": [
            {"index": int(i), "x": int(x), "y": int(y), "error": str(msg)} for i, x, y, msg in (skipped or [])
        ],
        "seconds": stages | {"total": total},
        "tiles_per_s": round(n / total, 2) if total > 0 else None,
        "hex_tiles_per_s": round(hex_tiles_per_s, 2) if hex_tiles_per_s else None,
        "backend": backend,
        "settings": dict(settings or {}),
        "bundle": bundle_provenance(bundle_hash, bundle_manifest),
        "mica": _explained(mica),
        "outputs": dict(outputs or {}),
        "started_at": started_at.isoformat() if started_at else None,
        "finished_at": finished.isoformat(),
        "wall_seconds": total,  # = seconds.total; a slide opened ahead while another ran did not count its wait
    }
    if extra:
        report |= dict(extra)
    return report


def _explained(mica: Mapping | None) -> dict | None:
    """MICA's summary with what its risk and hazard bins mean beside them."""
    if mica is None:
        return None
    out = dict(mica)
    if "risk" in out:
        out = {"risk": out.pop("risk"), "risk_scale": MICA_RISK_SCALE, "time_bins": MICA_BINS} | out
    return out


def write_report_json(path: Path, report: Mapping) -> None:
    text = json.dumps(to_jsonable(report), indent=2, ensure_ascii=False, allow_nan=False)
    with writing_file(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
