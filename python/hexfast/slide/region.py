"""A part of a slide to score: a rectangle (`--region X,Y,W,H`) or annotations drawn in QuPath (`--roi`).

QuPath exports annotations (File > Export objects as GeoJSON) as a FeatureCollection, or as a
bare JSON array of Features when "Export as FeatureCollection" is off; a Feature's geometry is a
Polygon or MultiPolygon in level-0 pixels of the image, the first ring of each polygon its
outline and the others its holes. All of these are read; any other geometry (points, lines) is
refused by name.

A tile or patch is in the region when its centre is: inside some polygon's outline and in none of
its holes (even-odd rule on each ring; a point on an edge may fall either way).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import HexfastError
from ..files import one_line, sha256_file


class RegionError(HexfastError):
    """A region that cannot be used: one line naming the file (or the --region text) and why."""


@dataclass(frozen=True)
class Region:
    kind: str  # "rectangle" (--region) or "roi" (--roi FILE)
    polygons: tuple = field(repr=False)  # per polygon: (outline (K, 2), hole (K, 2), ...) float64 level-0 px
    source: str  # the --region text, or the ROI file's path
    sha256: str | None = None  # of the ROI file

    def contains(self, points: np.ndarray) -> np.ndarray:
        """(N,) bool: which (x, y) level-0 points lie in the region."""
        points = np.asarray(points, np.float64).reshape(-1, 2)
        out = np.zeros(len(points), bool)
        for rings in self.polygons:
            inside = _in_ring(points, rings[0])
            for hole in rings[1:]:
                inside &= ~_in_ring(points, hole)
            out |= inside
        return out

    def contains_squares(self, coords: np.ndarray, size: int) -> np.ndarray:
        """(N,) bool: which squares (level-0 top-left coords, side `size`) have their centre in the region."""
        return self.contains(np.asarray(coords, np.float64).reshape(-1, 2) + size / 2.0)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) level-0 px."""
        allpts = np.concatenate([rings[0] for rings in self.polygons])
        (x0, y0), (x1, y1) = allpts.min(axis=0), allpts.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)

    @property
    def area_px(self) -> float:
        """Area in level-0 px² (outlines minus holes; overlapping polygons count twice)."""
        return float(sum(_area(rings[0]) - sum(_area(h) for h in rings[1:]) for rings in self.polygons))

    def describe(self, mpp: float | None = None) -> dict:
        """What report.json, the h5 and the other outputs say of the region."""
        x0, y0, x1, y1 = self.bounds
        out = {"kind": self.kind, "source": self.source, "polygons": len(self.polygons),
               "bounds_level0": [round(x0), round(y0), round(x1 - x0), round(y1 - y0)],
               "rule": "tiles and MICA patches whose centre lies inside (holes excluded)"}
        if self.sha256:
            out["sha256"] = self.sha256
        if mpp:
            out["area_mm2"] = round(self.area_px * mpp * mpp / 1e6, 4)
        return out

    def check_on(self, slide_path, size: tuple[int, int]) -> None:
        """Refuse a region that misses the slide altogether (another slide's ROI, or px in another unit)."""
        x0, y0, x1, y1 = self.bounds
        w, h = size
        if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
            raise RegionError(f"{self.source}: the region ({x0:.0f}, {y0:.0f})-({x1:.0f}, {y1:.0f}) lies outside "
                              f"slide {slide_path} ({w} x {h} level-0 px)")


def parse_rectangle(text: str) -> Region:
    """--region X,Y,W,H (level-0 px)."""
    try:
        x, y, w, h = (float(v) for v in text.split(","))
    except ValueError:
        raise RegionError(f"--region {text!r}: expected X,Y,W,H in level-0 pixels, e.g. 10000,8000,4096,4096") \
            from None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise RegionError(f"--region {text!r}: X, Y, W and H must be finite numbers of level-0 pixels")
    if not (w > 0 and h > 0) or min(x, y) < 0:
        raise RegionError(f"--region {text!r}: width and height must be positive and X, Y not negative")
    ring = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float64)
    return Region("rectangle", ((ring,),), text)


def read_roi(path: str | os.PathLike) -> Region:
    """Polygons and multipolygons of a GeoJSON file as QuPath exports annotations."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RegionError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, ValueError) as e:  # ValueError: JSON's own, and numbers of over 4300 digits
        raise RegionError(f"{path}: is not GeoJSON ({one_line(e)})") from None
    except RecursionError:
        raise RegionError(f"{path}: is not GeoJSON (nested too deeply)") from None
    polygons = []
    try:
        geometries = list(_geometries(data, path))
    except RecursionError:
        raise RegionError(f"{path}: is not GeoJSON (nested too deeply)") from None
    for geometry in geometries:
        kind = geometry.get("type") if isinstance(geometry, dict) else None
        try:
            if kind == "Polygon":
                polygons.append(_polygon(geometry["coordinates"]))
            elif kind == "MultiPolygon":
                polygons.extend(_polygon(p) for p in _list(geometry["coordinates"]))
            else:
                raise RegionError(f"{path}: holds a {kind or 'non-geometry'} object; a region is made of Polygons "
                                  "and MultiPolygons (QuPath annotations)")
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise RegionError(f"{path}: a {kind}'s coordinates are not rings of [x, y] positions in finite "
                              f"numbers ({e})") from None
    if not polygons:
        raise RegionError(f"{path}: holds no polygon to score")
    return Region("roi", tuple(polygons), os.fspath(path), sha256_file(path))


def _geometries(data, path: Path):
    if isinstance(data, list):
        for item in data:
            yield from _geometries(item, path)
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        yield from _geometries(data.get("features") or [], path)
    elif isinstance(data, dict) and data.get("type") == "Feature":
        if data.get("geometry") is not None:
            yield data["geometry"]
    elif isinstance(data, dict) and data.get("type") == "GeometryCollection":
        yield from (g for g in data.get("geometries") or [])
    elif isinstance(data, dict) and "type" in data:
        yield data
    else:
        raise RegionError(f"{path}: is not GeoJSON (no FeatureCollection, Feature or geometry)")


def _polygon(coordinates) -> tuple:
    rings = tuple(_ring(ring) for ring in _list(coordinates))
    if not rings or any(len(r) < 3 for r in rings):
        raise ValueError("a ring has fewer than 3 positions")
    return rings


def _ring(ring) -> np.ndarray:
    """(K, 2) float64 from GeoJSON positions [x, y] or [x, y, z] (z, an altitude, is not ours: dropped)."""
    out = np.empty((len(_list(ring)), 2), np.float64)
    for i, position in enumerate(ring):
        if not (isinstance(position, list) and len(position) in (2, 3)
                and all(type(v) in (int, float) for v in position)):  # type(): True is not a coordinate
            raise ValueError(f"position {i} is {str(position)[:40]}")
        out[i] = position[0], position[1]
    if not np.isfinite(out).all():
        raise ValueError("a position is infinite")
    return out


def _list(value) -> list:
    if not isinstance(value, list):
        raise TypeError(f"{type(value).__name__} where a list belongs")
    return value


def _in_ring(points: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """Even-odd (crossing number) test of every point against one closed ring, vectorised over points."""
    x, y = points[:, 0], points[:, 1]
    inside = np.zeros(len(points), bool)
    x0, y0 = ring[:, 0], ring[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for ax, ay, bx, by in zip(x0, y0, x1, y1):
        if ay == by:
            continue
        crosses = (ay > y) != (by > y)
        at = ax + (y - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (x < at)
    return inside


def _area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2.0
