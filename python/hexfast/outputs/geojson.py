"""<stem>.geojson.gz: the scored tiles as QuPath tile objects, to drop onto the slide in QuPath.

What QuPath's importer reads (qupath-core, io/PathIO.java, io/GsonTools.java,
io/QuPathTypeAdapters.java, read to match, not copied): `.geojson.gz` is
gunzipped and read as GeoJSON (QuPath >= 0.4; drag-and-drop and File > Import
objects both accept it); a FeatureCollection's `features` each become an
object; `properties.objectType` "tile" makes a tile object (a detection that
Measure > Measurement maps colour, and that measurement tables list);
`properties.measurements` is an object of name: number ("NaN" for a missing
value); `properties.classification` {"name", "color": [r, g, b]}; `id` a UUID
(kept across imports); geometry coordinates are level-0 pixels of the image.

Objects:

* one per HEX tile: its square, measurements = the 40 markers (the manifest's
  names), "Tissue fraction" and, for a MICA on HEX's own grid, "MICA attention";
* one per patch of MICA's CLAM bag (when MICA read one): classified "MICA patch",
  measurement "MICA attention" (the co-attention weight averaged over the 40
  CODEX channels).

The collection's own `hexfast` member (GeoJSON allows foreign members; QuPath
ignores it) records the bundle, the slide and the scored region; a demo
bundle's tiles are classified "DEMO - untrained" in red, so QuPath shows it on
every object. Written as a stream through gzip, never as one document in memory.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..files import writing_file

DEMO_CLASS = {"name": "DEMO - untrained", "color": [220, 0, 0]}
MICA_CLASS = {"name": "MICA patch", "color": [255, 170, 0]}
GZIP_LEVEL = 6


def _number(value: float) -> str:
    return format(float(value), ".6g") if math.isfinite(value) else '"NaN"'


def _square(x: int, y: int, size: int) -> str:
    x1, y1 = x + size, y + size
    return (f'{{"type":"Polygon","coordinates":[[[{x},{y}],[{x1},{y}],[{x1},{y1}],[{x},{y1}],[{x},{y}]]]}}')


def _ids(namespace: str, n: int, offset: int = 0):
    base = uuid.uuid5(uuid.NAMESPACE_URL, namespace)
    return (str(uuid.uuid5(base, str(offset + i))) for i in range(n))


def write_geojson(path: Path, *, coords: np.ndarray, markers: np.ndarray, marker_names: Sequence[str],
                  tile_size: int, tissue_fraction: np.ndarray | None = None, demo: bool = False,
                  hex_attention: np.ndarray | None = None, bag_coords: np.ndarray | None = None,
                  bag_attention: np.ndarray | None = None, bag_patch: int = 256,
                  about: Mapping | None = None) -> None:
    """Writes the FeatureCollection (gzip) atomically. coords (N, 2) level-0 top-left; markers (N, C);
    hex_attention (N,): MICA's attention on HEX's own tiles (hex-embedding bags); bag_coords (M, 2),
    bag_attention (M,): MICA's CLAM patches and their attention; about: the `hexfast` member."""
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    markers = np.asarray(markers, np.float32)
    names = [json.dumps(str(n)) for n in marker_names]
    fraction = None if tissue_fraction is None else np.asarray(tissue_fraction, np.float64)
    namespace = json.dumps(dict(about or {}), sort_keys=True, default=str)
    tile_class = f',"classification":{json.dumps(DEMO_CLASS)}' if demo else ""
    with writing_file(path) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as gz, \
            io.TextIOWrapper(gz, encoding="utf-8", newline="\n") as out:
        out.write('{"type":"FeatureCollection","hexfast":')
        out.write(json.dumps(dict(about or {}), default=str))
        out.write(',"features":[\n')
        first = True
        for i, (tile_id, (x, y)) in enumerate(zip(_ids(namespace + "tiles", len(coords)), coords.tolist())):
            values = ",".join(f"{n}:{_number(v)}" for n, v in zip(names, markers[i].tolist()))
            if fraction is not None:
                values += f',"Tissue fraction":{_number(fraction[i])}'
            if hex_attention is not None:
                values += f',"MICA attention":{_number(hex_attention[i])}'
            out.write(("" if first else ",\n") + f'{{"type":"Feature","id":"{tile_id}","geometry":'
                      f'{_square(x, y, tile_size)},"properties":{{"objectType":"tile"{tile_class},'
                      f'"measurements":{{{values}}}}}}}')
            first = False
        if bag_coords is not None and bag_attention is not None:
            bag = np.asarray(bag_coords, np.int64).reshape(-1, 2)
            mica_class = json.dumps(MICA_CLASS)
            for i, (patch_id, (x, y)) in enumerate(zip(_ids(namespace + "mica", len(bag)), bag.tolist())):
                out.write(("" if first else ",\n") + f'{{"type":"Feature","id":"{patch_id}","geometry":'
                          f'{_square(x, y, bag_patch)},"properties":{{"objectType":"tile","classification":'
                          f'{mica_class},"measurements":{{"MICA attention":{_number(bag_attention[i])}}}}}}}')
                first = False
        out.write("\n]}\n")
