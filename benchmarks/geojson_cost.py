"""Size and write time of <stem>.geojson.gz (QuPath tile objects) for a 50,000-tile slide.

    python benchmarks/geojson_cost.py [--tiles 50000] [--bag 38000]

A synthetic 40x slide's worth: tiles of 224 px on a grid, 40 markers each (random values, which compress
worse than real predictions would), tissue fractions, and MICA's CLAM bag of `--bag` 256-px patches with
their attention. Times the writer (outputs.geojson.write_geojson) and, as a reader would, gunzip +
json.load; prints the file size.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from hexfast.markers import MARKERS
from hexfast.outputs.geojson import write_geojson


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=50_000)
    ap.add_argument("--bag", type=int, default=38_000)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(args.tiles)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[: args.tiles] * 224
    markers = rng.gamma(2.0, 0.1, (args.tiles, 40)).astype(np.float32)
    fraction = rng.uniform(0.5, 1.0, args.tiles).astype(np.float32)
    bside = int(np.ceil(np.sqrt(args.bag)))
    bag = np.stack(np.meshgrid(np.arange(bside), np.arange(bside)), -1).reshape(-1, 2)[: args.bag] * 256 + 37
    attention = rng.dirichlet(np.ones(args.bag)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.geojson.gz"
        start = time.perf_counter()
        write_geojson(path, coords=grid, markers=markers, marker_names=MARKERS, tile_size=224,
                      tissue_fraction=fraction, bag_coords=bag, bag_attention=attention, about={"slide": "synthetic"})
        write_s = time.perf_counter() - start
        size = path.stat().st_size
        start = time.perf_counter()
        raw = gzip.decompress(path.read_bytes())
        doc = json.loads(raw)
        read_s = time.perf_counter() - start
    print(f"# {platform.node()} {platform.machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{args.tiles} tiles x 40 markers + {args.bag} MICA patches: {size / 2**20:.1f} MiB gzip "
          f"({len(raw) / 2**20:.0f} MiB of JSON), written in {write_s:.1f} s; gunzip + json.load {read_s:.1f} s; "
          f"{len(doc['features'])} features")


if __name__ == "__main__":
    main()
