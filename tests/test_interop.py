"""Where pathologists and peers' tools read hexfast's outputs: QuPath tile objects (checked against QuPath's own
import rules, read from its source), shapely validity, a region of the slide (--roi / --region), TRIDENT's
coords attributes, the virtual CODEX grid's placement, and the napari reader that keeps the channel names."""

from __future__ import annotations

import gzip
import json
import math
import uuid

import h5py
import numpy as np
import pytest
import tifffile

from conftest import hexfast, one_line_error
from hexfast.slide.region import RegionError, parse_rectangle, read_roi

shapely = pytest.importorskip("shapely", reason="polygon validity is checked with shapely (the [test] extra)")
from shapely.geometry import Point, shape  # noqa: E402

# QuPath (qupath-core: io/GsonTools.java addPathObjects, io/QuPathTypeAdapters.java PathObjectTypeAdapter,
# MeasurementListTypeAdapter): the type names that make tiles, and the measurement strings it understands.
QUPATH_TILE_TYPES = {"tile", "PathTileObject"}
QUPATH_DETECTION_TYPES = QUPATH_TILE_TYPES | {"detection", "PathDetectionObject", "cell", "PathCellObject"}
QUPATH_NUMBER_STRINGS = {"nan", "inf", "-inf"}


def qupath_objects(path):
    """The objects QuPath makes of the file, by its rules: (kind, polygon, measurements, class name, uuid)."""
    name = path.name.lower()
    assert name.endswith((".geojson.gz", ".json.gz")), "QuPath gunzips .geojson.gz / .json.gz only"
    doc = json.loads(gzip.decompress(path.read_bytes()))
    assert doc["type"] == "FeatureCollection" and isinstance(doc["features"], list)
    out = []
    for feature in doc["features"]:
        assert feature["type"] == "Feature"
        props = feature["properties"]
        kind = props.get("objectType", props.get("object_type", props.get("type", "unknown")))
        measurements = props.get("measurements", {})
        assert isinstance(measurements, dict)
        values = {}
        for key, value in measurements.items():
            if isinstance(value, str):
                assert value.lower() in QUPATH_NUMBER_STRINGS or float(value) is not None, (key, value)
                value = float(value.replace("inf", "infinity"))
            assert isinstance(value, (int, float)), (key, value)
            values[key] = float(value)
        klass = props.get("classification")
        if klass is not None:
            assert isinstance(klass["name"], str) and len(klass.get("color", [0, 0, 0])) in (3, 4)
        out.append((kind, shape(feature["geometry"]), values, klass and klass["name"], uuid.UUID(feature["id"])))
    return doc, out


def test_geojson_is_what_qupath_imports_as_measured_tiles(cmu_scored):
    out, _ = cmu_scored
    doc, objects = qupath_objects(out / f"{out.name}.geojson.gz")
    with h5py.File(out / f"{out.name}.h5") as f:
        coords, markers, fraction = f["coords"][:], f["codex_prediction"][:], f["tissue_fraction"][:]
        names = list(f["codex_prediction"].attrs["marker_names"])
        bag, attention = f["mica_coords"][:], f["mica_attention"][:]
    tiles = [o for o in objects if o[3] != "MICA patch"]
    patches = [o for o in objects if o[3] == "MICA patch"]
    assert len(tiles) == len(coords) and len(patches) == len(bag) == len(attention)
    assert all(kind in QUPATH_TILE_TYPES for kind, *_ in objects)  # tiles, not annotations
    assert len({o[4] for o in objects}) == len(objects)  # distinct ids
    for (_, poly, values, klass, _), (x, y), row, frac in zip(tiles, coords, markers, fraction):
        assert poly.is_valid and poly.geom_type == "Polygon" and poly.bounds == (x, y, x + 112, y + 112)
        assert list(values)[:40] == names and klass == "DEMO - untrained"  # the demo bundle says so on each
        np.testing.assert_allclose([values[n] for n in names], row, rtol=1e-5, atol=1e-7)
        assert math.isclose(values["Tissue fraction"], frac, rel_tol=1e-5)
    for (_, poly, values, _, _), (x, y), a in zip(patches, bag, attention):
        assert poly.is_valid and poly.bounds == (x, y, x + 256, y + 256)
        assert math.isclose(values["MICA attention"], a, rel_tol=1e-5)
    about = doc["hexfast"]
    assert about["demo"] is True and "untrained" in about["warning"] and about["marker_names"] == names


def test_region_reading_and_the_containment_rule(tmp_path):
    ring = [[100, 100], [900, 100], [900, 700], [100, 700], [100, 100]]
    hole = [[300, 300], [500, 300], [500, 500], [300, 500], [300, 300]]
    second = [[1000, 1000], [1200, 1000], [1100, 1300], [1000, 1000]]
    feature = {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[ring, hole], [second]]},
               "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}
    layouts = {"collection": {"type": "FeatureCollection", "features": [feature]},
               "array": [feature],  # QuPath's export with "Export as FeatureCollection" off
               "feature": feature, "geometry": feature["geometry"]}
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 1400, (4000, 2))
    reference = shape(feature["geometry"])
    expected = np.array([reference.contains(Point(p)) for p in points])
    for name, content in layouts.items():
        path = tmp_path / f"{name}.geojson"
        path.write_text(json.dumps(content))
        region = read_roi(path)
        boundary = np.array([reference.boundary.distance(Point(p)) < 1e-6 for p in points])
        np.testing.assert_array_equal(region.contains(points)[~boundary], expected[~boundary], err_msg=name)
        assert region.area_px == pytest.approx(reference.area)
    bad = {"point.geojson": {"type": "Point", "coordinates": [1, 2]}, "empty.geojson": {"type": "FeatureCollection",
                                                                                        "features": []}}
    for name, content in bad.items():
        (tmp_path / name).write_text(json.dumps(content))
    with pytest.raises(RegionError, match="holds a Point"):
        read_roi(tmp_path / "point.geojson")
    with pytest.raises(RegionError, match="no polygon"):
        read_roi(tmp_path / "empty.geojson")
    (tmp_path / "garbage.geojson").write_text("{nope")
    with pytest.raises(RegionError, match="is not GeoJSON"):
        read_roi(tmp_path / "garbage.geojson")
    rect = parse_rectangle("10,20,30,40")
    assert rect.bounds == (10, 20, 40, 60)
    for text in ("1,2,3", "a,b,c,d", "0,0,-5,5"):
        with pytest.raises(RegionError):
            parse_rectangle(text)


def test_scoring_a_region(tmp_path, cmu_scored):
    """--roi: only the tiles (and MICA patches) whose centre is in the annotation, holes left out; every output
    says which region; MICA's risk is labelled partial. --region likewise; bad regions are one line."""
    full, slide = cmu_scored
    with h5py.File(full / f"{full.name}.h5") as f:
        all_coords, all_markers = f["coords"][:], f["codex_prediction"][:]
        all_bag = f["mica_coords"][:]
    annotation = {"type": "Polygon", "coordinates": [[[200, 300], [1900, 300], [1900, 2600], [200, 2600], [200, 300]],
                                                     [[700, 900], [1300, 900], [1300, 1700], [700, 1700], [700, 900]]]}
    roi = tmp_path / "annotation.geojson"
    roi.write_text(json.dumps([{"type": "Feature", "geometry": annotation, "properties": {"objectType": "annotation"}}]))
    r = hexfast("score", slide, "--roi", roi, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out" / full.name
    poly = shape(annotation)
    inside = np.array([poly.contains(Point(x + 56, y + 56)) for x, y in all_coords])
    with h5py.File(out / f"{out.name}.h5") as f:
        coords, markers, bag = f["coords"][:], f["codex_prediction"][:], f["mica_coords"][:]
        region_attr = json.loads(f.attrs["region"])
    np.testing.assert_array_equal(coords, all_coords[inside])  # the same tiles as the whole run's, inside
    np.testing.assert_allclose(markers, all_markers[inside], rtol=1e-5, atol=1e-6)
    bag_inside = np.array([poly.contains(Point(x + 128, y + 128)) for x, y in all_bag])
    np.testing.assert_array_equal(bag, all_bag[bag_inside])
    report = json.loads((out / "report.json").read_text())
    assert report["region"]["kind"] == "roi" and report["region"]["sha256"] and report["region"] == region_attr
    assert report["settings"]["region"]["source"] == str(roi)
    assert "trained on whole slides" in report["mica"]["partial"]
    assert json.loads(gzip.decompress((out / f"{out.name}.geojson.gz").read_bytes()))["hexfast"]["region"]["kind"] \
        == "roi"
    with tifffile.TiffFile(out / "virtual_codex.ome.tif") as tif:
        assert "hexfast:region" in tif.ome_metadata
    # --resume: the same slide with another region is not "done"
    r = hexfast("score", slide, "--region", "0,0,1000,1000", "--resume", "-o", tmp_path / "out")
    assert r.returncode == 0 and "already complete" not in r.stderr
    assert json.loads((out / "report.json").read_text())["region"]["kind"] == "rectangle"
    (tmp_path / "other.svs").symlink_to(slide)
    one_line_error(hexfast("score", slide, tmp_path / "other.svs", "--region", "0,0,10,10", "-o", tmp_path / "o2"),
                   "--region describes one slide's pixels")
    one_line_error(hexfast("score", slide, "--roi", tmp_path / "missing.geojson", "-o", tmp_path / "o2"),
                   "missing.geojson", "cannot read")
    r = hexfast("score", slide, "--region", "90000,90000,100,100", "-o", tmp_path / "o3")
    assert r.returncode != 0 and "lies outside slide" in r.stderr


def test_trident_reads_the_coords_natively(cmu_scored):
    """TRIDENT's native coords reader (trident/wsi_objects/WSI.py, mahmoodlab/TRIDENT) needs patch_size,
    level0_magnification and target_magnification on `coords`, else falls back to CLAM's reader with a
    warning; its writer (trident/IO.py coords_to_h5) also sets patch_size_level0, overlap, name, level0_width/
    height, with patch_size_level0 = patch_size * level0_magnification // target_magnification."""
    out, _ = cmu_scored
    trident_keys = ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
                    "name", "level0_width", "level0_height")
    with h5py.File(out / f"{out.name}.h5") as f:
        for dataset in ("coords", "mica_coords"):
            attrs = dict(f[dataset].attrs)
            assert all(k in attrs for k in trident_keys), (dataset, sorted(attrs))
            assert attrs["patch_size_level0"] == attrs["patch_size"] * attrs["level0_magnification"] \
                // attrs["target_magnification"]
            assert (attrs["level0_width"], attrs["level0_height"]) == (2220, 2967)


def test_a_tile_maps_to_its_virtual_codex_cell_and_back(cmu_scored):
    """The grid's placement as the OME-TIFF and the h5 record it: tile (x, y) is in cell (y // cell, x // cell)
    and that cell holds the tile's values; the cell's level-0 square holds the tile's top-left corner."""
    out, _ = cmu_scored
    with h5py.File(out / f"{out.name}.h5") as f:
        coords, markers = f["coords"][:], f["codex_prediction"][:]
        origin, cell = tuple(f["coords"].attrs["codex_grid_origin"]), int(f["coords"].attrs["codex_grid_cell_px"])
    with tifffile.TiffFile(out / "virtual_codex.ome.tif") as tif:
        grid = tif.series[0].asarray()  # (40, gh, gw)
        ome = tif.ome_metadata
    assert origin == (0, 0) and f'K="hexfast:cell_level0_px">{cell}<' in ome
    assert 'K="hexfast:grid_origin_level0_px">0,0<' in ome and 'K="hexfast:level0_size_px">2220,2967<' in ome
    for t in (0, 50, len(coords) - 1):
        x, y = coords[t]
        i, j = (y - origin[1]) // cell, (x - origin[0]) // cell
        np.testing.assert_array_equal(grid[:, i, j], markers[t])
        x0, y0 = origin[0] + j * cell, origin[1] + i * cell  # back: the cell's square
        assert x0 <= x < x0 + cell and y0 <= y < y0 + cell


def test_napari_tiff_keeps_the_channel_names_and_the_pyramid(tmp_path):
    """napari-tiff's own reader (napari_tiff_reader.tifffile_reader, no napari needed) opens hexfast's OME-TIFF
    as a multiscale image with the marker names; napari's built-in reader (napari_builtins/io/_read.py:
    imageio's imread, no layer metadata) would give one array without them."""
    reader = pytest.importorskip("napari_tiff.napari_tiff_reader", reason="napari-tiff (the [test] extra)")
    from hexfast.markers import MARKERS
    from hexfast.outputs.ome_tiff import write_ome_tiff

    grid = np.random.default_rng(0).random((600, 500, 40), dtype=np.float32)  # a 40x slide's grid: 3 levels
    write_ome_tiff(tmp_path / "v.ome.tif", grid, MARKERS, 56.0, name="slide", cell_px=224, level0_size=(112000, 134400))
    with tifffile.TiffFile(tmp_path / "v.ome.tif") as tif:
        [(data, kwargs, kind)] = reader.tifffile_reader(tif)
    assert kind == "image" and kwargs["channel_axis"] == 0 and list(kwargs["name"]) == list(MARKERS)
    assert isinstance(data, list) and [d.shape for d in data] == [(40, 600, 500), (40, 300, 250), (40, 150, 125)]
    np.testing.assert_array_equal(np.asarray(data[0][:, :5, :5]), np.moveaxis(grid[:5, :5], -1, 0))
