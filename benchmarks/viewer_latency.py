"""`hexfast view` tile latency: deep-zoom H&E tiles, marker overlays and hover lookups, cold, one client.

    python benchmarks/viewer_latency.py OUT/<stem> [OUT/<stem> ...] [--tiles 300]

For each scored slide: a ViewerServer in this process (a thread), and a client requesting, over HTTP on
127.0.0.1, `--tiles` distinct deep-zoom tiles spread over the levels a viewer visits (every level from
the one that fits the slide in 1024 px down to full resolution; no tile twice, so every one is read and
JPEG-encoded, not served from the cache), then each marker overlay PNG once and 200 hover lookups.
Prints p50 / p95 per kind, and the full-resolution tiles on their own.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import threading
import time
import urllib.request
from pathlib import Path

from hexfast.view import ViewerData, ViewerServer


def timed(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        r.read()
    return time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run(out: Path, tiles: int, seed: int) -> dict:
    server = ViewerServer(ViewerData(out), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        dz = server.deepzoom
        first = next(i for i, (w, h) in enumerate(dz.level_dimensions) if max(w, h) >= 1024)
        keys = [(level, c, r) for level in range(first, dz.level_count)
                for c in range(dz.level_tiles[level][0]) for r in range(dz.level_tiles[level][1])]
        rng = random.Random(seed)
        top = dz.level_count - 1
        # as many full-resolution tiles as the other levels together, where the slide has them
        full = [k for k in keys if k[0] == top]
        rest = [k for k in keys if k[0] != top]
        picked = rng.sample(full, min(len(full), tiles // 2)) + rng.sample(rest, min(len(rest), tiles - tiles // 2))
        base = server.url.rstrip("/")
        times = {k: timed(f"{base}/dz/{k[0]}/{k[1]}_{k[2]}.jpg") for k in picked}
        overlay = [timed(f"{base}/overlay/{i}.png") for i in range(len(server.data.marker_names))]
        w, h = server.data.slide.dimensions
        hover = [timed(f"{base}/api/tile?x={rng.uniform(0, w)}&y={rng.uniform(0, h)}") for _ in range(200)]
        dz_all = list(times.values())
        dz_full = [t for k, t in times.items() if k[0] == top]
        return {"slide": out.name, "size": (w, h), "reader": server.data.slide.vendor, "dz_levels": dz.level_count,
                "dz": dz_all, "dz_full": dz_full, "overlay": overlay, "hover": hover, "grid": (server.data.gh,
                                                                                               server.data.gw)}
    finally:
        server.shutdown()
        server.server_close()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outs", type=Path, nargs="+", metavar="OUT/STEM")
    ap.add_argument("--tiles", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"# {platform.node()}: {platform.machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for out in args.outs:
        r = run(out, args.tiles, args.seed)
        ms = lambda v: f"{statistics.median(v) * 1e3:.1f} / {pct(v, 95) * 1e3:.1f} ms"  # noqa: E731
        print(f"{r['slide']} ({r['size'][0]} x {r['size'][1]}, {r['reader']}, {r['dz_levels']} deep-zoom levels, "
              f"grid {r['grid'][0]} x {r['grid'][1]}): H&E tiles p50/p95 {ms(r['dz'])} over {len(r['dz'])} "
              f"(full resolution: {ms(r['dz_full'])} over {len(r['dz_full'])}); marker overlay PNG "
              f"{ms(r['overlay'])}; hover lookup {ms(r['hover'])}")


if __name__ == "__main__":
    main()
