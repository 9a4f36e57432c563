"""Tile-streaming benchmark: hexfast's TileStream against the path users run
today, on the same tiles, in one run. Each case runs in its own process so its
peak RSS is its own.

    hexfast bench stream SLIDE [--tiles N] [--repeat 3]     (or: python -m hexfast.bench.stream CASE SLIDE N)

Cases:
  reference    openslide-python read_region → PIL RGB → resize 384 bilinear → float normalise (one process)
  decode       raw decode of the stored JPEG tiles those tiles cover (PIL, one core): the decode limit
  stream-1/2   TileStream uint8 at 1 and 2 threads (direct JPEG reader where the slide allows)
  openslide-2  TileStream uint8, 2 threads, through OpenSlide's read_region instead
  macenko      TileStream, 2 threads, Macenko normalisation (the once-per-slide stain estimate timed apart)
  resize       TileStream, 2 threads, C++ resize to 384
"""

from __future__ import annotations

import io
import json
import sys
import time

import numpy as np

from ..errors import HexfastError
from ..slide import open_slide, tile_slide
from ..stream import TileStream, estimate_stain
from .proc import cpu_seconds, peak_rss_mib, run_in_subprocess

CASES = ("reference", "decode", "stream-1", "stream-2", "openslide-2", "macenko", "resize")
THREADS = {"reference": 1, "decode": 1, "stream-1": 1, "stream-2": 2, "openslide-2": 2, "macenko": 2, "resize": 2}


def pick_tiles(path: str, n: int) -> tuple[np.ndarray, int]:
    """The first `n` tissue tiles in grid order (a contiguous band, as a slide run reads them)."""
    with open_slide(path) as slide:
        grid = tile_slide(slide)
    return grid.coords[:n], grid.tile_size


def _reference(path, coords, size):
    import openslide
    from PIL import Image

    osr = openslide.OpenSlide(path)
    for x, y in coords:
        img = osr.read_region((int(x), int(y)), 0, (size, size)).convert("RGB")
        img = img.resize((384, 384), Image.Resampling.BILINEAR)
        (np.asarray(img, np.float32) / 255.0 - 0.5) / 0.5


def _decode(path, coords, size):
    """Decodes every stored tile the grid tiles touch, once each."""
    import tifffile
    from PIL import Image

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tw, tl = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tw)
        needed = set()
        for x, y in coords:
            for ty in range(y // tl, (y + size - 1) // tl + 1):
                for tx in range(x // tw, (x + size - 1) // tw + 1):
                    needed.add(int(ty * across + tx))
        fh = tif.filehandle
        blobs = []
        for i in sorted(needed):
            fh.seek(page.dataoffsets[i])
            blobs.append(fh.read(page.databytecounts[i]))
        tables = page.jpegtables
    start, cpu = time.perf_counter(), time.process_time()
    for blob in blobs:
        if tables:  # abbreviated stream: splice in the shared tables
            blob = tables[:-2] + blob[2:]
        Image.open(io.BytesIO(blob)).load()
    return time.perf_counter() - start, time.process_time() - cpu, len(blobs)


def stream_tiles(path, coords, size, threads, out_size=None, batch_size=64, **options) -> str:
    """Reads `coords` through a TileStream, throwing the batches away; the reader it used."""
    with open_slide(path) as slide:
        stream = TileStream(slide, coords, read_size=size, out_size=out_size, batch_size=batch_size,
                            threads=threads, **options)
        for _ in stream:
            pass
    return stream.reader


def run_case(name: str, path: str, n: int) -> dict:
    coords, size = pick_tiles(path, n)
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    extra = {}
    if name == "reference":
        _reference(path, coords, size)
    elif name == "decode":
        seconds, cpu, stored = _decode(path, coords, size)
        extra = {"stored_tiles": stored, "decode_seconds": seconds, "decode_seconds_cpu": cpu}
    elif name.startswith("stream-"):
        extra["reader"] = stream_tiles(path, coords, size, threads=THREADS[name])
    elif name == "openslide-2":
        extra["reader"] = stream_tiles(path, coords, size, threads=2, reader="openslide")
    elif name == "macenko":
        # The slide's stain estimate is made once per slide (32 sampled tiles): timed on its own, so the
        # row gives the per-tile cost of normalising, and the estimate its own column.
        with open_slide(path) as slide:
            source = estimate_stain(slide, coords, "macenko", size)
        extra["estimate_ms"] = 1e3 * (time.perf_counter() - start)
        cpu_before, start = cpu_seconds(), time.perf_counter()
        extra["reader"] = stream_tiles(path, coords, size, threads=2, stain_norm="macenko", stain_source=source)
    elif name == "resize":
        extra["reader"] = stream_tiles(path, coords, size, threads=2, out_size=384)
    else:
        raise ValueError(f"unknown case {name}")
    seconds = extra.pop("decode_seconds", time.perf_counter() - start)
    cpu = extra.pop("decode_seconds_cpu", cpu_seconds() - cpu_before)
    rss = peak_rss_mib()
    return {"case": name, "threads": THREADS[name], "tiles": len(coords), "seconds": seconds,
            "tiles_per_s": len(coords) / seconds, "cpu_ms_per_tile": 1e3 * cpu / len(coords),
            "peak_rss_mib": rss, **extra}


def bench_stream(path: str, n: int = 6000, cases=CASES, on_row=None, repeat: int = 3) -> list[dict]:
    """Runs each case in a fresh process (its own peak RSS, no shared caches),
    `repeat` rounds with the cases interleaved so background load hits them
    alike; returns one row per case with the median rate and CPU time."""
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name in cases:
            try:
                runs[name].append(run_in_subprocess(__name__, name, path, str(n)))
            except HexfastError as e:
                raise HexfastError(f"{path}: {e}") from None
            if on_row:
                on_row(runs[name][-1])
    return [_median_row(rows) for rows in runs.values()]


def _median_row(rows: list[dict]) -> dict:
    row = dict(sorted(rows, key=lambda r: r["tiles_per_s"])[len(rows) // 2])
    row["tiles_per_s"] = float(np.median([r["tiles_per_s"] for r in rows]))
    row["cpu_ms_per_tile"] = float(np.median([r["cpu_ms_per_tile"] for r in rows]))
    row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rows)
    row["runs"] = len(rows)
    return row


def format_table(rows: list[dict]) -> str:
    """Markdown table; ratios against the reference and the decode limit measured in the same run."""
    by = {r["case"]: r for r in rows}
    ref = by.get("reference", {}).get("tiles_per_s")
    dec = by.get("decode", {}).get("tiles_per_s")
    lines = ["| case | reader | threads | tiles/s | × reference | × reference per core | % of decode limit "
             "| CPU ms/tile | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = f"{r['tiles_per_s'] / ref:.1f}" if ref else "-"
        per_core = f"{r['tiles_per_s'] / r['threads'] / ref:.1f}" if ref else "-"
        d = f"{100 * r['tiles_per_s'] / dec:.0f}" if dec else "-"
        note = f" ({r['stored_tiles']} stored tiles)" if "stored_tiles" in r else ""
        if "estimate_ms" in r:
            note = f" (+ {r['estimate_ms']:.0f} ms once per slide for the stain estimate)"
        lines.append(f"| {r['case']}{note} | {r.get('reader', '-')} | {r['threads']} | {r['tiles_per_s']:.0f} "
                     f"| {x} | {per_core} | {d} | {r['cpu_ms_per_tile']:.3f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(run_case(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
