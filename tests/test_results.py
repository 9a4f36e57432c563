"""Per-slide score outputs: virtual CODEX grid, result h5, OME-TIFF, overview, report."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import write_tiff
from hexfast import open_slide, tile_slide
from hexfast.bundle import Bundle
from hexfast.errors import OutputError
from hexfast.markers import MARKERS
from hexfast.outputs import SlideWriter, output_paths, outputs_complete
from hexfast.outputs.ome_tiff import half, pyramid, write_ome_tiff
from hexfast.outputs.overview import DEFAULT_MARKERS, marker_range, render_overview, write_overview_png
from hexfast.outputs.report import DEMO_WARNING, build_report, bundle_provenance, to_jsonable, write_report_json
from hexfast.outputs.scores_h5 import ScoresH5, tissue_fraction
from hexfast.score.codex_grid import codex_encoder_input, encoder_input, grid_shape, virtual_codex
from hexfast.score.mica_stream import AttentionRanking, mica_summary

OME_NS = {"ome": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def tissue_slide(tmp_path) -> Path:
    """2400 x 1800 px at 0.5 µm/px (20x, 112 px tiles): a pink ellipse with a purple blob."""
    h, w = 1800, 2400
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.full((h, w, 3), 242, np.uint8)
    tissue = ((xx - 1200) / 900) ** 2 + ((yy - 900) / 600) ** 2 < 1
    rgb[tissue] = (225, 140, 190)
    rgb[((xx - 900) / 250) ** 2 + ((yy - 800) / 200) ** 2 < 1] = (120, 60, 150)
    return write_tiff(tmp_path / "synthetic.tiff", rgb, mpp=0.5)


def predictions(coords: np.ndarray, channels: int = 40) -> np.ndarray:
    """Smooth, distinct per channel, so misplaced tiles or channels show."""
    x, y = coords[:, 0:1] / 1000.0, coords[:, 1:2] / 1000.0
    k = np.arange(channels)[None, :]
    return (0.5 + 0.4 * np.sin(x * (k + 1) * 0.7 + y * 0.3 * k)).astype(np.float32)


@pytest.fixture
def scored(tissue_slide):
    slide = open_slide(tissue_slide)
    grid = tile_slide(slide)
    assert len(grid) > 50
    pred = predictions(grid.coords)
    feats = np.random.default_rng(0).standard_normal((len(grid), 1024)).astype(np.float32)
    yield slide, grid, pred, feats
    slide.close()


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def bundle(hash_: str, demo: bool, **manifest) -> Bundle:
    """A bundle as the outputs see it: hash, demo flag, marker names, the manifest's provenance."""
    return Bundle(Path("bundle"), {"demo": demo, "markers": list(MARKERS), "tile": {"um": 56.0}, **manifest}, hash_)


def stride_grid(slide, grid, pred, coords=None) -> np.ndarray:
    """The virtual CODEX at one cell per stride, as the pipeline hands it to the outputs."""
    return virtual_codex(grid.coords if coords is None else coords, pred, grid.stride, slide.dimensions)


def write_h5(path, slide, grid, pred, feats, *, bundle_hash="x", demo=False):
    """All of a grid's tiles at once, through ScoresH5 as the pipeline's writer uses it."""
    h5 = ScoresH5(path, slide, grid, bundle_hash=bundle_hash, demo=demo,
                  features_dim=None if feats is None else np.asarray(feats).shape[1])
    try:
        if len(grid):
            h5.append(grid.coords, pred, feats)
        h5.close()
    except BaseException:
        h5.abort()
        raise


def reference_grid(coords, values, step, width, height):
    """The reference's layout, restated independently: whole-slide grid from (0, 0),
    one cell per step, tile in cell (y // step, x // step), later tiles win."""
    out = np.zeros((height // step + 1, width // step + 1, values.shape[1]), np.float32)
    for (x, y), v in zip(coords.tolist(), values):
        col, row = int(x / step), int(y / step)
        if row < out.shape[0] and col < out.shape[1]:
            out[row, col] = v
    return out


# ---------------------------------------------------------------- virtual CODEX grid


def test_virtual_codex_matches_reference_layout():
    rng = np.random.default_rng(1)
    step, w, h = 224, 5000, 3000
    cells = rng.integers(0, [w // step + 1, h // step + 1], size=(300, 2))
    coords = cells * step + rng.integers(0, step, size=(300, 2))  # not only multiples of step
    coords = np.concatenate([coords, coords[:20]])  # repeated cells: the later tile wins
    values = rng.random((len(coords), 40)).astype(np.float32)
    values[300:] += 10
    coords = np.clip(coords, 0, [w - 1, h - 1])
    grid = virtual_codex(coords, values, step, (w, h))
    assert grid.shape == (h // step + 1, w // step + 1, 40) == (*grid_shape((w, h), step), 40)
    assert grid.dtype == np.float32
    np.testing.assert_array_equal(grid, reference_grid(coords, values, step, w, h))
    occupied = np.zeros(grid.shape[:2], bool)
    for x, y in coords.tolist():
        occupied[y // step, x // step] = True
    assert not grid[~occupied].any()  # empty cells are 0


def test_virtual_codex_grid_starts_at_zero_and_skips_outside():
    coords = np.array([[448, 224], [672, 224], [10_000, 0]])
    values = np.arange(6, dtype=np.float32).reshape(3, 2)
    grid = virtual_codex(coords, values, 224, (1000, 500))
    assert grid.shape == (3, 5, 2)
    np.testing.assert_array_equal(grid[1, 2], [0, 1])
    np.testing.assert_array_equal(grid[1, 3], [2, 3])
    assert grid[0].sum() == 0 and grid[:, :2].sum() == 0  # nothing shifted to the first tile
    # without the slide size the grid ends at the last tile
    grid = virtual_codex(coords[:2], values[:2], 224)
    assert grid.shape == (2, 4, 2)
    empty = virtual_codex(np.zeros((0, 2), np.int64), np.zeros((0, 40)), 224)
    assert empty.shape == (0, 0, 40)


def test_virtual_codex_rejects_bad_input():
    with pytest.raises(ValueError, match="coords"):
        virtual_codex(np.zeros((3, 3)), np.zeros((3, 40)), 224)
    with pytest.raises(ValueError, match="values"):
        virtual_codex(np.zeros((3, 2)), np.zeros((2, 40)), 224)
    with pytest.raises(ValueError, match="step"):
        virtual_codex(np.zeros((3, 2)), np.zeros((3, 40)), 0)
    with pytest.raises(ValueError, match="non-negative"):
        virtual_codex(np.array([[-1, 0]]), np.zeros((1, 40)), 224)


def test_encoder_input_is_channel_first_with_reference_rounding():
    grid = np.random.default_rng(2).random((7, 9, 40)).astype(np.float32)
    x = encoder_input(grid)
    assert x.shape == (40, 7, 9) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_array_equal(x[5], grid[..., 5].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(encoder_input(grid, reference_float16=False)[5], grid[..., 5])
    coords = np.array([[0, 0], [224, 448], [4000, 100]])
    markers = np.random.default_rng(3).random((3, 40)).astype(np.float32)
    x = codex_encoder_input(coords, markers, 224, (5000, 3000))
    assert x.shape == (40, 3000 // 224 + 1, 5000 // 224 + 1)
    np.testing.assert_array_equal(x[:, 2, 1], markers[1].astype(np.float16).astype(np.float32))


# ---------------------------------------------------------------- result h5


def test_scores_h5_reads_like_hex_and_mil_tools(scored, tmp_path):
    slide, grid, pred, feats = scored
    path = tmp_path / "synthetic.h5"
    write_h5(path, slide, grid, pred, feats, bundle_hash="abc123", demo=True)
    assert files_in(tmp_path) == ["synthetic.h5", "synthetic.tiff"]

    # HEX's virtual_codex_from_h5.py: the two arrays, then its own grid from the slide's MPP bucket.
    with h5py.File(path, "r") as f:
        codex_prediction = f["codex_prediction"][:]
        coords = f["coords"][:]
    np.testing.assert_array_equal(coords, grid.coords)
    np.testing.assert_array_equal(codex_prediction, pred)
    mag = 20  # 0.5 µm/px
    step = int(224 / (40 / mag))
    w, h = slide.dimensions
    ours = virtual_codex(coords, codex_prediction, grid.tile_size, slide.dimensions)
    np.testing.assert_array_equal(ours, reference_grid(coords, codex_prediction, step, w, h))

    # CLAM / TRIDENT-style MIL readers: features + coords, patch size/level on coords.
    with h5py.File(path, "r") as f:
        assert f["features"].shape == (len(grid), 1024) and f["features"].dtype == np.float32
        np.testing.assert_array_equal(f["features"][:], feats)
        assert f["coords"].dtype == np.int64
        assert f["coords"].attrs["patch_size"] == 112 and f["coords"].attrs["patch_level"] == 0
        a = f.attrs
        assert [str(m) for m in a["marker_names"]] == list(MARKERS)
        assert a["patch_size_level0"] == 112 and a["stride"] == 112
        assert a["mpp"] == pytest.approx(0.5) and a["magnification"] == 20
        assert (a["level0_width"], a["level0_height"]) == slide.dimensions
        assert a["bundle_hash"] == "abc123" and bool(a["demo"]) is True
        assert "hexfast_version" in a and "tissue_area_mm2" in a and a["has_features"]
        assert f["codex_prediction"].compression == "gzip" and f["codex_prediction"].chunks[1] == 40
        assert f["features"].chunks == (256, 1024) and f["features"].compression is None


def test_scores_h5_without_features_and_empty(scored, blank_slide, tmp_path):
    slide, grid, pred, _ = scored
    write_h5(tmp_path / "a.h5", slide, grid, pred, None)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert "features" not in f and not f.attrs["has_features"] and not f.attrs["demo"]
    with open_slide(blank_slide) as blank:
        empty = tile_slide(blank)
        assert len(empty) == 0
        write_h5(tmp_path / "b.h5", blank, empty, np.zeros((0, 40)), np.zeros((0, 1024)))
    with h5py.File(tmp_path / "b.h5", "r") as f:
        assert f["coords"][:].shape == (0, 2) and f["codex_prediction"][:].shape == (0, 40)
    with pytest.raises(ValueError, match="codex_prediction"):
        write_h5(tmp_path / "c.h5", slide, grid, pred[:, :39], None)
    assert not (tmp_path / "c.h5").exists()


# ---------------------------------------------------------------- OME-TIFF


def test_ome_tiff_channels_pixel_size_pyramid_values(tmp_path):
    grid = np.random.default_rng(3).random((300, 520, 40)).astype(np.float32)
    path = tmp_path / "virtual_codex.ome.tif"
    write_ome_tiff(path, grid, MARKERS, pixel_um=55.888, name="slide")
    assert files_in(tmp_path) == ["virtual_codex.ome.tif"]
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome
        root = ET.fromstring(tf.ome_metadata)
        series = tf.series[0]
        assert series.axes == "CYX"
        levels = series.levels
        assert [lv.shape for lv in levels] == [(40, 300, 520), (40, 150, 260), (40, 75, 130)]
        np.testing.assert_array_equal(levels[0].asarray(), np.moveaxis(grid, -1, 0))
        np.testing.assert_allclose(levels[1].asarray(), half(np.moveaxis(grid, -1, 0)), rtol=1e-6)
        page = tf.pages[0]
        assert page.is_tiled and page.dtype == np.float32
        num, den = page.tags["XResolution"].value
        assert 1e4 * den / num == pytest.approx(55.888, rel=1e-4)  # px per cm
    pixels = root.find("ome:Image/ome:Pixels", OME_NS)
    assert (pixels.get("SizeX"), pixels.get("SizeY"), pixels.get("SizeC")) == ("520", "300", "40")
    assert pixels.get("Type") == "float"
    assert float(pixels.get("PhysicalSizeX")) == pytest.approx(55.888)
    assert float(pixels.get("PhysicalSizeY")) == pytest.approx(55.888)
    assert pixels.get("PhysicalSizeXUnit") == "µm" and pixels.get("PhysicalSizeYUnit") == "µm"
    names = [c.get("Name") for c in pixels.findall("ome:Channel", OME_NS)]
    assert names == list(MARKERS)


def test_pyramid_stops_below_256_and_half_averages_edges():
    assert len(pyramid(np.zeros((1, 255, 100), np.float32))) == 1
    assert [lv.shape for lv in pyramid(np.zeros((1, 256, 1030), np.float32))] == [
        (1, 256, 1030), (1, 128, 515), (1, 64, 258), (1, 32, 129)
    ]
    a = np.arange(15, dtype=np.float32).reshape(1, 3, 5)
    h = half(a)
    assert h.shape == (1, 2, 3)
    assert h[0, 0, 0] == np.mean([0, 1, 5, 6]) and h[0, 1, 2] == 14 and h[0, 0, 2] == np.mean([4, 9])


def test_ome_tiff_small_grid_and_bad_input(tmp_path):
    grid = np.random.default_rng(4).random((10, 14, 40)).astype(np.float32)
    write_ome_tiff(tmp_path / "s.ome.tif", grid, MARKERS, pixel_um=56.0)
    with tifffile.TiffFile(tmp_path / "s.ome.tif") as tf:
        assert tf.is_ome and len(tf.series[0].levels) == 1
        np.testing.assert_array_equal(tf.series[0].asarray(), np.moveaxis(grid, -1, 0))
    with pytest.raises(ValueError):
        write_ome_tiff(tmp_path / "t.ome.tif", grid[..., :39], MARKERS, 56.0)
    assert files_in(tmp_path) == ["s.ome.tif"]


def test_ome_tiff_needs_no_imagecodecs(tmp_path):
    """The runtime has no imagecodecs: deflate must come from the stdlib."""
    code = f"""
import sys
sys.modules["imagecodecs"] = None  # import fails as if absent
import numpy as np, tifffile
from pathlib import Path
from hexfast.outputs.ome_tiff import write_ome_tiff
from hexfast.markers import MARKERS
g = np.random.default_rng(0).random((270, 20, 40)).astype(np.float32)
p = Path({str(tmp_path)!r}) / "n.ome.tif"
write_ome_tiff(p, g, MARKERS, 56.0)
with tifffile.TiffFile(p) as tf:
    assert len(tf.series[0].levels) == 2
    assert np.array_equal(tf.series[0].asarray(), np.moveaxis(g, -1, 0))
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# ---------------------------------------------------------------- overview


def red_fraction(img: Image.Image, box) -> float:
    a = np.asarray(img.crop(box)).astype(int)
    return float(((a[..., 0] > 180) & (a[..., 1] < 40) & (a[..., 2] < 40)).mean())


def test_overview_demo_banner_and_panels(scored):
    slide, grid, pred, _ = scored
    codex = stride_grid(slide, grid, pred)
    demo = render_overview(slide, grid, pred, codex, demo=True)
    real = render_overview(slide, grid, pred, codex, demo=False)
    assert demo.mode == "RGB" and 900 < demo.width < 2000
    assert red_fraction(demo, (0, 0, demo.width, 20)) > 0.8  # red band across the top
    assert red_fraction(demo, (0, demo.height - 3, demo.width, demo.height)) > 0.8  # and a frame
    assert red_fraction(real, (0, 0, real.width, real.height)) < 0.001
    every = render_overview(slide, grid, pred, codex, demo=False, show="all")
    assert every.height > real.height
    with pytest.raises(ValueError, match="unknown marker"):
        render_overview(slide, grid, pred, codex, demo=False, show=["CD8", "CD999"])
    assert set(DEFAULT_MARKERS) <= set(MARKERS) and len(DEFAULT_MARKERS) == 12


def test_overview_heatmap_follows_the_values(scored):
    """A marker that is high on the left half of the tissue only: its panel is yellow on the left."""
    slide, grid, pred, _ = scored
    pred = np.zeros_like(pred)
    i = MARKERS.index("CD8")
    pred[:, i] = (grid.coords[:, 0] < 1200).astype(np.float32)
    img = np.asarray(render_overview(slide, grid, pred, stride_grid(slide, grid, pred), demo=False, show=["CD8"]))
    yellow = (img[..., 0] > 200) & (img[..., 1] > 180) & (img[..., 2] < 100)
    ys, xs = np.nonzero(yellow)
    assert len(xs) > 500
    purple = (img[..., 0] < 110) & (img[..., 1] < 60) & (img[..., 2] > 70)
    purple[: ys.min()] = purple[ys.max() + 1 :] = False  # the panel's rows only, not the colour bar
    assert purple.sum() > 500
    assert np.median(xs) < np.median(np.nonzero(purple)[1])


def test_marker_range():
    v = np.linspace(0, 1, 1001)
    lo, hi = marker_range(v)
    assert lo == pytest.approx(0.01) and hi == pytest.approx(0.99)
    lo, hi = marker_range(np.full(10, 0.3))
    assert hi > lo == pytest.approx(0.3)


def test_overview_cmu_small(cmu_small, tmp_path):
    with open_slide(cmu_small) as slide:
        grid = tile_slide(slide)
        th = grid.tissue.thumbnail.astype(np.float32)
        ds = grid.tissue.downsample
        rgb = np.array([th[int(y / ds), int(x / ds)] for x, y in grid.coords.tolist()])
        pred = 1 / (1 + np.exp(-(rgb - rgb.mean(0)) @ np.random.default_rng(0).standard_normal((3, 40)) / 40))
        write_overview_png(tmp_path / "overview.png", slide, grid, pred, stride_grid(slide, grid, pred), demo=True)
    img = Image.open(tmp_path / "overview.png")
    assert img.format == "PNG" and img.width > 800
    assert files_in(tmp_path) == ["overview.png"]


# ---------------------------------------------------------------- report


def test_report_json(scored, tmp_path):
    slide, grid, pred, _ = scored
    n = len(grid)
    att = np.random.default_rng(5).random((40, n))
    ranking = AttentionRanking(40, 5)
    ranking.add(att)
    mica = mica_summary(np.float32([0.1, 0.2, 0.3, 0.4]), np.array([0.9, 0.72, 0.5, 0.3]), np.float32(-2.42),
                        coords=grid.coords, ranking=ranking)
    report = build_report(
        slide, grid, seconds={"tiling": np.float64(0.5), "inference": 1.5}, backend="onnxruntime-cpu",
        bundle_hash="deadbeef", demo=True, mica=mica,
        bundle_manifest={"exporter": "hexfast_export 0.1.0", "sources": {"hex": "demo"}, "files": {"a": "…"}},
        extra={"nan_value": float("nan")},
    )
    write_report_json(tmp_path / "report.json", report)
    r = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert list(r)[0] == "warning" and DEMO_WARNING in r["warning"] and r["demo"] is True
    assert r["tile_count"] == n and r["tiles_per_s"] == pytest.approx(n / 2.0) and r["seconds"]["total"] == 2.0
    assert r["backend"] == "onnxruntime-cpu"
    assert r["slide"]["vendor"] == "generic-tiff" and r["slide"]["dimensions"] == [2400, 1800]
    assert r["slide"]["mpp"] == pytest.approx(0.5) and r["slide"]["tile_size_level0"] == 112
    assert r["slide"]["stride"] == 112 and r["slide"]["magnification"] == 20
    assert r["bundle"] == {"hash": "deadbeef", "exporter": "hexfast_export 0.1.0", "sources": {"hex": "demo"}}
    assert r["mica"]["risk"] == pytest.approx(-2.42) and len(r["mica"]["hazards"]) == 4
    top = r["mica"]["most_attended"]
    best = int(np.argmax(att.mean(0)))
    assert top["overall"][0]["tile"] == best
    assert [top["overall"][0]["x"], top["overall"][0]["y"]] == grid.coords[best].tolist()
    cd8 = top["per_marker"]["CD8"]
    assert [t["tile"] for t in cd8] == np.argsort(-att[1])[:5].tolist()
    assert r["nan_value"] is None and r["hexfast_version"] and r["finished_at"]
    assert r["mica"] is not None and "warning" not in build_report(
        slide, grid, seconds={}, backend="x", bundle_hash=None, demo=False
    )


def test_report_rejects_what_json_cannot_hold(tmp_path):
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        write_report_json(tmp_path / "report.json", {"x": object()})
    assert files_in(tmp_path) == []
    assert to_jsonable({"a": np.int64(3), "b": (np.float32(1.5), Path("/x"))}) == {"a": 3, "b": [1.5, "/x"]}
    ranking = AttentionRanking(40, 10)
    ranking.add(np.zeros((40, 3)))
    with pytest.raises(ValueError, match="saw 3 tiles, not 4"):
        mica_summary([0.1] * 4, [0.9] * 4, -1.0, coords=np.zeros((4, 2)), ranking=ranking)


# ---------------------------------------------------------------- atomic writes


def assert_one_line_output_error(excinfo, path: Path):
    text = str(excinfo.value)
    assert "\n" not in text and str(path) in text


def test_h5_failure_midway_leaves_nothing(scored, tmp_path, monkeypatch):
    slide, grid, pred, feats = scored
    out = tmp_path / "out"
    out.mkdir()
    path = out / "s.h5"
    path.write_bytes(b"previous complete file")
    real = h5py.Dataset.__setitem__
    calls = []

    def failing(self, key, value):
        calls.append(1)
        if len(calls) == 5:  # second batch, after the first is on disk
            raise OSError(28, "No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", failing)
    monkeypatch.setattr("hexfast.outputs.scores_h5.FLUSH_ROWS", 8)  # every batch goes to disk
    h5 = ScoresH5(path, slide, grid, bundle_hash="x", demo=False)
    h5.append(grid.coords[:10], pred[:10], feats[:10])
    with pytest.raises(OutputError) as e:
        h5.append(grid.coords[10:20], pred[10:20], feats[10:20])
    assert_one_line_output_error(e, path)
    assert "No space left" in str(e.value)
    assert files_in(out) == ["s.h5"] and path.read_bytes() == b"previous complete file"
    h5.abort()  # the pipeline's cleanup after a failure: harmless now
    assert files_in(out) == ["s.h5"]


def test_h5_cannot_be_created(scored, tmp_path):
    slide, grid, pred, _ = scored
    path = tmp_path / "missing-dir" / "s.h5"
    with pytest.raises(OutputError) as e:
        write_h5(path, slide, grid, pred, None)
    assert_one_line_output_error(e, path)


def test_ome_tiff_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    grid = np.random.default_rng(6).random((300, 300, 40)).astype(np.float32)
    real = tifffile.TiffWriter.write
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the full-resolution level is on disk
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffWriter, "write", failing)
    path = tmp_path / "virtual_codex.ome.tif"
    with pytest.raises(OutputError) as e:
        write_ome_tiff(path, grid, MARKERS, 56.0)
    assert_one_line_output_error(e, path)
    assert files_in(tmp_path) == []


def test_png_failure_leaves_nothing(scored, tmp_path, monkeypatch):
    slide, grid, pred, _ = scored

    def failing(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Image.Image, "save", failing)
    with pytest.raises(OutputError) as e:
        write_overview_png(tmp_path / "overview.png", slide, grid, pred, stride_grid(slide, grid, pred), demo=False)
    assert_one_line_output_error(e, tmp_path / "overview.png")
    assert files_in(tmp_path) == ["synthetic.tiff"]


# ---------------------------------------------------------------- the whole set, and --resume


def write_all(out, slide, grid, pred, feats, mica=None):
    """A slide's whole set, through SlideWriter as the pipeline writes it."""
    with SlideWriter(out, slide, grid, bundle("b" * 64, demo=True), "onnxruntime-cpu") as writer:
        writer.append(grid.coords, pred, feats)
        writer.finish(grid.coords, pred, stride_grid(slide, grid, pred), mica=mica,
                      seconds={"inference": 1.0, "total": 2.0})
    return writer.paths


def test_slide_outputs_and_resume_check(scored, tmp_path):
    slide, grid, pred, feats = scored
    out = tmp_path / "out"
    assert not outputs_complete(out, "synthetic")
    paths = write_all(out, slide, grid, pred, feats, mica=mica_summary([0.1] * 4, [0.9] * 4, -1.0))
    assert paths == output_paths(out, "synthetic")
    assert files_in(out / "synthetic") == ["overview.png", "report.json", "synthetic.geojson.gz", "synthetic.h5",
                                           "virtual_codex.ome.tif"]
    assert outputs_complete(out, "synthetic")
    assert outputs_complete(out, "synthetic", bundle_hash="b" * 64)
    assert not outputs_complete(out, "synthetic", bundle_hash="c" * 64)

    report = json.loads(paths.report.read_text())
    assert report["outputs"] == {"h5": "synthetic.h5", "geojson": "synthetic.geojson.gz",
                                 "ome_tiff": "virtual_codex.ome.tif", "overview": "overview.png"}
    assert report["seconds"]["outputs"] > 0 and report["seconds"]["total"] == report["wall_seconds"] and report["mica"]["risk"] == -1.0
    with tifffile.TiffFile(paths.ome_tiff) as tf:
        pixels = ET.fromstring(tf.ome_metadata).find("ome:Image/ome:Pixels", OME_NS)
        assert float(pixels.get("PhysicalSizeX")) == pytest.approx(112 * 0.5)
        w, h = slide.dimensions
        assert tf.series[0].shape == (40, h // 112 + 1, w // 112 + 1)

    # a truncated h5, a missing file, or a report that disagrees: not complete
    data = paths.h5.read_bytes()
    paths.h5.write_bytes(data[: len(data) // 2])
    assert not outputs_complete(out, "synthetic")
    paths.h5.write_bytes(data)
    assert outputs_complete(out, "synthetic")
    objects = paths.geojson.read_bytes()  # the QuPath objects: missing, or not what they should be
    paths.geojson.unlink()
    assert not outputs_complete(out, "synthetic")
    paths.geojson.write_bytes(b"\x1f\x8b not gzip")
    assert not outputs_complete(out, "synthetic")
    paths.geojson.write_bytes(objects)
    assert outputs_complete(out, "synthetic")
    report["tile_count"] += 1
    paths.report.write_text(json.dumps(report))
    assert not outputs_complete(out, "synthetic")
    paths.report.write_text("{")
    assert not outputs_complete(out, "synthetic")
    paths.report.unlink()
    assert not outputs_complete(out, "synthetic")


def test_a_failed_rewrite_leaves_the_previous_set_as_it_was(scored, tmp_path, monkeypatch):
    slide, grid, pred, feats = scored
    out = tmp_path / "out"
    write_all(out, slide, grid, pred, feats)
    assert outputs_complete(out, "synthetic")
    before = {p.name: p.read_bytes() for p in (out / "synthetic").iterdir()}

    def failing(self, fp, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing)
    with pytest.raises(OutputError, match="overview.png"):
        write_all(out, slide, grid, pred[::-1].copy(), feats)
    assert {p.name: p.read_bytes() for p in (out / "synthetic").iterdir()} == before
    assert outputs_complete(out, "synthetic") and files_in(out) == ["synthetic"]  # no partial set left


# ---------------------------------------------------------------- streaming, as the pipeline writes


@pytest.mark.parametrize("flush_rows", [16, 4096])
def test_slide_writer_streams_batches_with_skipped_tiles(scored, tmp_path, monkeypatch, flush_rows):
    monkeypatch.setattr("hexfast.outputs.scores_h5.FLUSH_ROWS", flush_rows)
    slide, grid, pred, feats = scored
    keep = np.ones(len(grid), bool)
    keep[[3, 17]] = False  # tiles the stream could not read
    skipped = [(3, *grid.coords[3].tolist(), "JPEG error"), (17, *grid.coords[17].tolist(), "JPEG error")]
    coords, pred, feats = grid.coords[keep], pred[keep], feats[keep]
    n = len(coords)
    writer = SlideWriter(tmp_path / "out", slide, grid, bundle("f" * 64, demo=False, exporter="hexfast_export 0.1.0"),
                         "onnxruntime-cpu")
    for i in range(0, n, 7):  # batches smaller than a chunk
        writer.append(coords[i : i + 7], pred[i : i + 7], feats[i : i + 7])
    for rows in (5, 4096):  # read back for MICA, a chunk at a time
        np.testing.assert_array_equal(np.concatenate(list(writer.feature_chunks(rows))), feats)
    assert all(len(c) <= 5 for c in writer.feature_chunks(5))
    att = np.random.default_rng(7).random((40, n)).astype(np.float32)
    ranking = AttentionRanking(40, 10)
    ranking.add(att)
    mica = mica_summary(np.float32([[0.1, 0.2, 0.3, 0.4]]), np.float32([[0.9, 0.7, 0.5, 0.3]]), np.float32([-2.4]),
                        coords=coords, ranking=ranking)
    with pytest.raises(ValueError, match="got 3 tiles"):
        writer.finish(coords[:3], pred[:3], stride_grid(slide, grid, pred[:3], coords[:3]))
    paths = writer.finish(coords, pred, stride_grid(slide, grid, pred, coords), mica=mica,
                          seconds={"stream+hex": 3.0, "hex engine": 2.5}, skipped=skipped, hex_tiles_per_s=n / 3.0)
    writer.abort()  # after success: a no-op
    assert set(paths) == {"h5", "geojson", "ome_tiff", "overview", "report"}
    assert outputs_complete(tmp_path / "out", "synthetic", bundle_hash="f" * 64)
    assert files_in(tmp_path / "out" / "synthetic") == [
        "overview.png", "report.json", "synthetic.geojson.gz", "synthetic.h5", "virtual_codex.ome.tif"
    ]
    with h5py.File(paths["h5"], "r") as f:
        np.testing.assert_array_equal(f["coords"][:], coords)
        np.testing.assert_array_equal(f["codex_prediction"][:], pred)
        np.testing.assert_array_equal(f["features"][:], feats)
        np.testing.assert_array_equal(f["tissue_fraction"][:], grid.fraction[keep])
    r = json.loads(paths["report"].read_text())
    assert r["tile_count"] == n and r["grid_tile_count"] == len(grid)
    assert r["hex_tiles_per_s"] == pytest.approx(n / 3.0, rel=1e-3) and r["wall_seconds"] == r["seconds"]["total"] > 5.5
    assert r["tiles_per_s"] == pytest.approx(n / r["seconds"]["total"], rel=1e-3)
    assert [t["index"] for t in r["skipped_tiles"]] == [3, 17] and r["skipped_tiles"][0]["error"] == "JPEG error"
    assert r["mica"]["hazards"] == pytest.approx([0.1, 0.2, 0.3, 0.4]) and r["mica"]["risk"] == pytest.approx(-2.4)
    best = int(np.argmax(att.mean(0)))
    assert r["mica"]["most_attended"]["overall"][0]["x"] == int(coords[best, 0])
    assert r["bundle"]["exporter"] == "hexfast_export 0.1.0" and "warning" not in r
    with tifffile.TiffFile(paths["ome_tiff"]) as tf:
        img = tf.series[0].asarray()
    x, y = coords[5] // grid.stride
    np.testing.assert_array_equal(img[:, y, x], pred[5])
    x, y = grid.coords[3] // grid.stride
    assert not img[:, y, x].any()  # a skipped tile is an empty cell


def test_slide_writer_abort_leaves_no_partial_file(scored, tmp_path):
    slide, grid, pred, feats = scored
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with SlideWriter(out, slide, grid, bundle("a" * 64, True), "cpu") as writer:
            writer.append(grid.coords[:5], pred[:5], feats[:5])
            raise RuntimeError("engine failed")
    assert not (out / "synthetic").exists()  # not even an empty directory
    assert not outputs_complete(out, "synthetic")


def test_tissue_fraction_lookup(scored):
    _, grid, _, _ = scored
    coords = np.concatenate([grid.coords[[5, 2, 9]], [[999_999, 0]]])
    frac = tissue_fraction(grid, coords)
    np.testing.assert_array_equal(frac[:3], grid.fraction[[5, 2, 9]])
    assert np.isnan(frac[3])


def test_bundle_provenance_from_a_manifest():
    manifest = {
        "schema": 1, "demo": True, "exporter": "hexfast_export 0.1.0", "created": "2026-01-01T00:00:00Z",
        "markers": list(MARKERS), "tile": {"um": 56.0, "px_at_40x": 224}, "mica_features": "hex-embedding",
        "sources": {"hex": {"path": "hex.pt", "sha256": "ab"}}, "files": {"hex.onnx": "cd"},
        "models": {"hex": {"files": {"fp32": "hex.onnx"}, "parity": {"fp32": {"markers": 1e-6}}}},
    }
    p = bundle_provenance("h" * 64, manifest)
    assert p["hash"] == "h" * 64 and p["exporter"] == "hexfast_export 0.1.0" and p["demo"] is True
    assert p["sources"] == manifest["sources"] and p["mica_features"] == "hex-embedding"
    assert p["models"] == {"hex": {"parity": {"fp32": {"markers": 1e-6}}}}
    assert "files" not in p and "markers" not in p
