"""`hexfast view`: a local web viewer of one scored slide, offline, stdlib HTTP only.

    server = ViewerServer(ViewerData(out_dir), host="127.0.0.1", port=0)
    print(server.url); server.serve_forever()

Routes (all GET):

    /                              the page (static/index.html, viewer.js, viewer.css; no CDN, no build)
    /api/info                      slide size, MPP, grid, markers with their 1st-99th percentiles, demo, MICA
    /dz/<level>/<col>_<row>.jpg    deep-zoom H&E tiles, rendered on demand by OpenSlide's DeepZoomGenerator
                                   (256 px, no overlap, level-0 coordinates: limit_bounds off)
    /overlay/<marker>.png[?cmap=]  one marker over the whole grid, one pixel per cell (data.overlay_png;
                                   cmap: fade (default), viridis, heat)
    /api/attention                 MICA's attention per bag tile (coords and weights, JSON)
    /api/tile?x=X&y=Y              the tile under level-0 (X, Y): coords and its 40 values

Bound to 127.0.0.1 unless told otherwise: the slide and its predictions are patient data. Requests that
name another host are refused, and connections are bounded in number and idle time (localhttp.py).
OpenSlide is not thread-safe for one handle across threads in every build, so deep-zoom reads go
through one lock; JPEG tiles are kept in a bounded LRU cache.
"""

from __future__ import annotations

import collections
import io
import json
import mimetypes
import threading
from importlib import resources
from urllib.parse import parse_qs

from ..localhttp import LocalHandler, LocalServer
from ..outputs.colormap import COLORMAPS
from .data import ViewerData

DZ_TILE = 256
CACHE_TILES = 512  # ~15 MB of JPEG
JPEG_QUALITY = 85


class ViewerServer(LocalServer):
    def __init__(self, data: ViewerData, host: str = "127.0.0.1", port: int = 0):
        self.data = data
        self.deepzoom = data.slide.deepzoom(DZ_TILE, 0)
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/"

    def dz_info(self) -> dict:
        dz = self.deepzoom
        return {"tile": DZ_TILE, "levels": dz.level_count, "dimensions": [list(d) for d in dz.level_dimensions]}

    def dz_tile(self, level: int, col: int, row: int) -> bytes | None:
        key = f"{level}/{col}_{row}"
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            dz = self.deepzoom
            if not (0 <= level < dz.level_count):
                return None
            cols, rows = dz.level_tiles[level]
            if not (0 <= col < cols and 0 <= row < rows):
                return None
            tile = dz.get_tile(level, (col, row))
            buf = io.BytesIO()
            tile.convert("RGB").save(buf, "JPEG", quality=JPEG_QUALITY)
            data = buf.getvalue()
            self._cache[key] = data
            while len(self._cache) > CACHE_TILES:
                self._cache.popitem(last=False)
            return data

    def server_close(self) -> None:
        super().server_close()
        self.data.close()


class _Handler(LocalHandler):
    server: ViewerServer

    def get(self, path: str, query: str) -> None:
        parts = [p for p in path.split("/") if p]
        try:
            if not parts:
                return self._static("index.html")
            if parts[0] == "static" and len(parts) == 2:
                return self._static(parts[1])
            if parts == ["api", "info"]:
                return self._json(self.server.data.info() | {"deepzoom": self.server.dz_info()})
            if parts == ["api", "attention"]:
                return self.send(self.server.data.attention_json(), "application/json")
            if parts == ["api", "tile"]:
                values = parse_qs(query)
                return self._json(self.server.data.tile_at(float(values["x"][0]), float(values["y"][0])))
            if parts[0] == "overlay" and len(parts) == 2 and parts[1].endswith(".png"):
                channel = int(parts[1][:-4])
                if not 0 <= channel < len(self.server.data.marker_names):
                    return self._missing()
                cmap = parse_qs(query).get("cmap", ["fade"])[0]
                if cmap not in COLORMAPS:
                    return self._missing()
                return self.send(self.server.data.overlay_png(channel, cmap), "image/png")
            if parts[0] == "dz" and len(parts) == 3 and parts[2].endswith(".jpg"):
                col, row = (int(v) for v in parts[2][:-4].split("_"))
                tile = self.server.dz_tile(int(parts[1]), col, row)
                return self.send(tile, "image/jpeg", cache=True) if tile is not None else self._missing()
        except (ValueError, KeyError):
            return self.send(b"bad request", "text/plain", status=400)
        return self._missing()

    def _static(self, name: str) -> None:
        files = resources.files("hexfast.view") / "static"
        if name not in {p.name for p in files.iterdir()}:
            return self._missing()
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        self.send((files / name).read_bytes(), kind + ("; charset=utf-8" if kind.startswith("text/") else ""))

    def _json(self, value) -> None:
        self.send(json.dumps(value).encode(), "application/json")

    def _missing(self) -> None:
        self.send(b"not found", "text/plain", status=404)
