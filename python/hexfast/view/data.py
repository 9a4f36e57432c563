"""What `hexfast view` shows, read once from a scored slide's outputs (OUT/<stem>/) and its slide.

Everything is laid out in level-0 pixels, as the h5 gives it: the virtual CODEX grid (one cell
per stride from level-0 (0, 0), the OME-TIFF's), each marker rendered from it as a small PNG the
browser stretches over the H&E (cell-exact, no resampling), MICA's attention per bag tile, and a
cell -> tile index for hover. Memory: the grid (gh x gw x 40 float32), the coords and markers of
the tiles, the bag's coords and attention; never the features.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from ..errors import HexfastError
from ..outputs.colormap import COLORMAPS, colorize
from ..outputs.overview import marker_range
from ..outputs.writer import output_paths
from ..slide import open_slide, slide_source


class ViewError(HexfastError):
    """An output directory the viewer cannot show; one line naming it."""


@dataclass
class Overlay:
    values: np.ndarray  # (gh, gw) float32, NaN where no tile
    lo: float
    hi: float


def scored_folder(out_dir: Path) -> Path:
    """`out_dir` when it is one slide's outputs; its only scored slide when it is an OUT of one; else an
    error that lists the slides an OUT holds."""
    if (out_dir / "report.json").is_file():
        return out_dir
    slides = sorted(p.parent.name for p in out_dir.glob("*/report.json") if not p.parent.name.startswith(".")) \
        if out_dir.is_dir() else []
    if len(slides) == 1:
        return out_dir / slides[0]
    if slides:
        shown = ", ".join(slides[:20]) + (f", ... ({len(slides)} in all)" if len(slides) > 20 else "")
        raise ViewError(f"{out_dir}: holds {len(slides)} scored slides; view one: hexfast view {out_dir / slides[0]} "
                        f"(slides here: {shown})")
    raise ViewError(f"{out_dir}: no report.json here and no scored slide in it: give a slide's output folder, "
                    "OUT/<stem>/, as `hexfast score` writes it")


class ViewerData:
    def __init__(self, out_dir: Path, slide_path: Path | None = None):
        out_dir = scored_folder(Path(out_dir))
        self.report = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
        paths = output_paths(out_dir.parent, out_dir.name)
        if not paths.h5.is_file():
            raise ViewError(f"{paths.h5}: missing (the slide's outputs are incomplete; score it again)")
        slide_path = Path(slide_path) if slide_path is not None else Path(self.report["slide"]["path"])
        if not slide_path.exists():
            raise ViewError(f"{slide_path}: the scored slide is not there; pass its path: hexfast view {out_dir} SLIDE")
        self.slide = open_slide(slide_source(slide_path), self.report["slide"].get("mpp"))
        with h5py.File(paths.h5, "r") as f:
            self.coords = np.asarray(f["coords"][:], np.int64)
            self.markers = np.asarray(f["codex_prediction"][:], np.float32)
            attrs = dict(f["coords"].attrs)
            self.marker_names = [str(m) for m in f["codex_prediction"].attrs["marker_names"]]
            self.tile_size = int(attrs["patch_size_level0"])
            self.cell = int(attrs.get("codex_grid_cell_px", attrs["stride"]))
            self.attention = None
            if "mica_attention" in f:
                weights = np.asarray(f["mica_attention"][:], np.float32)
                aligned = f["mica_attention"].attrs.get("aligned_with", "coords")
                where = np.asarray(f["mica_coords"][:], np.int64) if aligned == "mica_coords" else self.coords
                size = int(f["mica_coords"].attrs.get("patch_size", 256)) if aligned == "mica_coords" \
                    else self.tile_size
                self.attention = (where, weights, size)
        w, h = self.slide.dimensions
        scored = tuple(self.report["slide"]["dimensions"])
        if (w, h) != scored:
            self.slide.close()
            raise ViewError(f"{slide_path}: is {w} x {h} px, not the scored slide ({scored[0]} x {scored[1]})")
        self.gh, self.gw = h // self.cell + 1, w // self.cell + 1
        cells = self.coords // self.cell
        self.index = np.full((self.gh, self.gw), -1, np.int32)  # the last tile in a cell wins, as in the grid
        self.index[cells[:, 1], cells[:, 0]] = np.arange(len(self.coords), dtype=np.int32)
        self._png: dict[str, bytes] = {}

    def close(self) -> None:
        self.slide.close()

    # ------------------------------------------------------------- for the page

    def info(self) -> dict:
        w, h = self.slide.dimensions
        ranges = [marker_range(self.markers[:, i]) for i in range(self.markers.shape[1])]
        out = {"slide": self.slide.name, "width": w, "height": h, "mpp": self.slide.mpp, "tile_size": self.tile_size,
               "cell": self.cell, "grid": [self.gh, self.gw], "tiles": len(self.coords),
               "markers": [{"name": n, "lo": lo, "hi": hi} for n, (lo, hi) in zip(self.marker_names, ranges)],
               "demo": bool(self.report.get("demo")), "warning": self.report.get("warning"),
               "region": self.report.get("region"), "mica": None,
               "colormaps": {name: table.tobytes().hex() for name, table in COLORMAPS.items()}}
        mica = self.report.get("mica") or {}
        if self.attention is not None:
            lo, hi = marker_range(self.attention[1])
            out["mica"] = {"lo": lo, "hi": hi, "patch": self.attention[2], "count": len(self.attention[1]),
                           "risk": mica.get("risk"), "partial": mica.get("partial")}
        return out

    def overlay_png(self, channel: int, cmap: str = "fade") -> bytes:
        """Marker `channel` as a gh x gw RGBA PNG: colormap `cmap` (COLORMAPS) between its 1st and 99th
        percentile over the tiles, transparent where no tile was scored (glass shows the H&E untouched)."""
        key = f"m{channel}-{cmap}"
        if key not in self._png:
            lo, hi = marker_range(self.markers[:, channel])
            rgba = np.zeros((self.gh, self.gw, 4), np.uint8)
            scored = self.index >= 0
            values = self.markers[self.index[scored], channel]
            rgba[scored] = colorize((values - lo) / (hi - lo), COLORMAPS[cmap])
            self._png[key] = _png(rgba)
        return self._png[key]

    def attention_json(self) -> bytes:
        if self.attention is None:
            return b"null"
        where, weights, size = self.attention
        return json.dumps({"size": size, "x": where[:, 0].tolist(), "y": where[:, 1].tolist(),
                           "a": [float(v) for v in weights]}).encode()

    def tile_at(self, x: float, y: float) -> dict | None:
        """The tile shown at level-0 (x, y): the one the overlay's cell holds (coords and the 40 values as
        the h5 has them), with MICA's attention where the bag is these tiles."""
        i, j = int(y // self.cell), int(x // self.cell)
        if not (0 <= i < self.gh and 0 <= j < self.gw) or x < 0 or y < 0:
            return None
        t = int(self.index[i, j])
        if t < 0:
            return None
        out = {"index": t, "x": int(self.coords[t, 0]), "y": int(self.coords[t, 1]), "size": self.tile_size,
               "values": {n: float(v) for n, v in zip(self.marker_names, self.markers[t].tolist())}}
        if self.attention is not None and self.attention[0] is self.coords:
            out["mica_attention"] = float(self.attention[1][t])
        return out


def _png(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG", compress_level=3)
    return buf.getvalue()
