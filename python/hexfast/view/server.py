"""`hexfast view`: a local web viewer of one scored slide, offline, stdlib HTTP only.

    server = ViewerServer(ViewerData(out_dir), host="127.0.0.1", port=0)
    print(server.url); server.serve_forever()

Routes (all GET):

    /                              the page (static/index.html, viewer.js, viewer.css; no CDN, no build)
    /api/info                      slide size, MPP, grid, markers with their 1st-99th percentiles, demo, MICA
    /dz/<level>/<col>_<row>.jpg    deep-zoom H&E tiles, rendered on demand by OpenSlide's DeepZoomGenerator
                                   (256 px, no overlap, level-0 coordinates: limit_bounds off)
    /overlay/<marker>.png          one marker over the whole grid, one pixel per cell (data.overlay_png)
    /api/attention                 MICA's attention per bag tile (coords and weights, JSON)
    /api/tile?x=X&y=Y              the tile under level-0 (X, Y): coords and its 40 values

Bound to 127.0.0.1 unless told otherwise: the slide and its predictions are patient data.
OpenSlide is not thread-safe for one handle across threads in every build, so deep-zoom reads go
through one lock; JPEG tiles are kept in a bounded LRU cache.
"""

from __future__ import annotations

import collections
import io
import json
import mimetypes
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlparse

from .data import ViewerData

DZ_TILE = 256
CACHE_TILES = 512  # ~15 MB of JPEG
JPEG_QUALITY = 85


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True

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


class _Handler(BaseHTTPRequestHandler):
    server: ViewerServer

    def log_message(self, *args) -> None:  # quiet: the terminal shows the URL, not every tile
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urlparse(self.path)
        parts = [p for p in url.path.split("/") if p]
        try:
            if not parts:
                return self._static("index.html")
            if parts[0] == "static" and len(parts) == 2:
                return self._static(parts[1])
            if parts == ["api", "info"]:
                return self._json(self.server.data.info() | {"deepzoom": self.server.dz_info()})
            if parts == ["api", "attention"]:
                return self._send(self.server.data.attention_json(), "application/json")
            if parts == ["api", "tile"]:
                query = parse_qs(url.query)
                return self._json(self.server.data.tile_at(float(query["x"][0]), float(query["y"][0])))
            if parts[0] == "overlay" and len(parts) == 2 and parts[1].endswith(".png"):
                channel = int(parts[1][:-4])
                if not 0 <= channel < len(self.server.data.marker_names):
                    return self._missing()
                return self._send(self.server.data.overlay_png(channel), "image/png")
            if parts[0] == "dz" and len(parts) == 3 and parts[2].endswith(".jpg"):
                col, row = (int(v) for v in parts[2][:-4].split("_"))
                tile = self.server.dz_tile(int(parts[1]), col, row)
                return self._send(tile, "image/jpeg", cache=True) if tile is not None else self._missing()
        except (ValueError, KeyError):
            return self._send(b"bad request", "text/plain", status=400)
        except (BrokenPipeError, ConnectionResetError):  # the browser moved on
            return None
        return self._missing()

    def _static(self, name: str) -> None:
        files = resources.files("hexfast.view") / "static"
        if name not in {p.name for p in files.iterdir()}:
            return self._missing()
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        self._send((files / name).read_bytes(), kind + ("; charset=utf-8" if kind.startswith("text/") else ""))

    def _json(self, value) -> None:
        self._send(json.dumps(value).encode(), "application/json")

    def _missing(self) -> None:
        self._send(b"not found", "text/plain", status=404)

    def _send(self, body: bytes, kind: str, status: int = 200, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.end_headers()
        self.wfile.write(body)
