"""`hexfast score`, `hexfast demo` and hexfast.Scorer end to end, with the
bundled (untrained) demo model on the CPU.

Every check compares with something computed independently here: tiles read
with openslide-python and run through onnxruntime directly, the tile grid
from `hexfast tiles`, the virtual CODEX grid rebuilt from the h5 by a plain
loop, MICA rerun from the h5's features. Slides: CMU-1-Small-Region (shared
test data) and small synthetic H&E TIFFs written here.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

import hexfast
from conftest import hexfast as hexfast_cli
from conftest import shared_file
from hexfast import cli
from hexfast.bundle import DEFAULT_BUNDLE, load_bundle
from hexfast.errors import SlideError
from hexfast.markers import MARKERS
from hexfast.outputs import outputs_complete
from hexfast.score.mica_stream import INITIAL_LSE
from hexfast.score.pipeline import Cancelled

FILES = ["{stem}.h5", "{stem}.geojson.gz", "virtual_codex.ome.tif", "overview.png", "report.json"]
OME_NS = {"ome": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}
CMU = "slides/CMU-1-Small-Region.svs"
CMU_STEM = "CMU-1-Small-Region"


# ---------------------------------------------------------------- helpers



def run(capsys, *args) -> tuple[int, str, str]:
    """`hexfast ARGS` in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def slide_files(stem: str) -> list[str]:
    return sorted(name.format(stem=stem) for name in FILES)


def temp_files(root: Path) -> list[Path]:
    """Half-written files: hexfast writes hidden `.NAME.PID.tmp` files and renames them into place."""
    return [p for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def mtimes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(d.iterdir())}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


def reference_grid(coords: np.ndarray, values: np.ndarray, step: int, width: int, height: int) -> np.ndarray:
    """The virtual CODEX grid as HEX's virtual_codex_from_h5.py lays it out: whole slide from (0, 0),
    (height // step + 1, width // step + 1, C), tile (x, y) in cell (y // step, x // step)."""
    grid = np.zeros((height // step + 1, width // step + 1, values.shape[1]), np.float32)
    for (x, y), v in zip(coords.tolist(), values):
        grid[int(y / step), int(x / step)] = v
    return grid


def ome_channels_and_size(tif: tifffile.TiffFile) -> tuple[list[str], float, float, str]:
    root = ET.fromstring(tif.ome_metadata)
    pixels = root.find("ome:Image/ome:Pixels", OME_NS)
    names = [c.get("Name") for c in pixels.findall("ome:Channel", OME_NS)]
    return names, float(pixels.get("PhysicalSizeX")), float(pixels.get("PhysicalSizeY")), pixels.get(
        "PhysicalSizeXUnit")


GLASS = (243, 241, 246)


def he_slide(path: Path, width: int, height: int, islands, *, seed: int = 0, mpp: float = 0.5,
             pyramid: bool = False) -> Path:
    """A tiled, deflate TIFF OpenSlide opens as generic-tiff: near-white glass with pink
    'tissue' islands (x0, y0, x1, y1) full of purple nuclei. With `pyramid`, a 4x-reduced
    level too (so tissue detection reads that, not level 0)."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = GLASS
    for x0, y0, x1, y1 in islands:
        h, w = y1 - y0, x1 - x0
        patch = np.array([232, 160, 200], np.float32) + rng.normal(0, 8, (h, w, 3))
        yy, xx = np.mgrid[0:h, 0:w]
        for cx, cy, r in zip(rng.uniform(0, w, h * w // 300), rng.uniform(0, h, h * w // 300),
                             rng.uniform(3, 7, h * w // 300)):
            y_lo, y_hi, x_lo, x_hi = int(max(0, cy - r)), int(min(h, cy + r + 1)), int(max(0, cx - r)), int(
                min(w, cx + r + 1))
            disc = (xx[y_lo:y_hi, x_lo:x_hi] - cx) ** 2 + (yy[y_lo:y_hi, x_lo:x_hi] - cy) ** 2 < r * r
            patch[y_lo:y_hi, x_lo:x_hi][disc] = (80, 45, 130)
        rgb[y0:y1, x0:x1] = np.clip(patch, 0, 255).astype(np.uint8)
    if not pyramid:
        tifffile.imwrite(path, rgb, tile=(128, 128), compression="zlib", photometric="rgb",
                         resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", metadata=None)
        return path
    reduced = np.asarray(Image.fromarray(rgb).reduce(4))
    with tifffile.TiffWriter(path) as tif:
        for level, kw in ((rgb, {}), (reduced, {"subfiletype": 1})):  # OpenSlide takes reduced IFDs as levels
            scale = rgb.shape[1] / level.shape[1]
            tif.write(level, tile=(128, 128), compression="zlib", photometric="rgb", metadata=None,
                      resolution=(1e4 / mpp / scale, 1e4 / mpp / scale), resolutionunit="CENTIMETER", **kw)
    return path


def small_slide(path: Path, seed: int = 0) -> Path:
    """~16 tiles of 112 px: one 448 x 448 px island (0.05 mm²) on 672 x 672 px of glass, 0.5 µm/px."""
    return he_slide(path, 672, 672, [(112, 112, 560, 560)], seed=seed)


def corrupt_level0_tile(path: Path, x: int, y: int) -> None:
    """Overwrites the stored level-0 TIFF tile holding level-0 pixel (x, y) with garbage."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        across = -(-page.imagewidth // page.tilewidth)
        i = (y // page.tilelength) * across + x // page.tilewidth
        offset, size = page.dataoffsets[i], page.databytecounts[i]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * size)


# ---------------------------------------------------------------- one scored CMU run, shared


@pytest.fixture(scope="module")
def cmu() -> Path:
    return shared_file(CMU)


@pytest.fixture(scope="module")
def cmu_scored(cmu, tmp_path_factory):
    """`python -m hexfast score CMU -o OUT`, as a user runs it: (OUT/<stem>, the finished process)."""
    out = tmp_path_factory.mktemp("score")
    r = hexfast_cli("score", cmu, "-o", out)
    assert r.returncode == 0, r.stderr
    return out / CMU_STEM, r


@pytest.fixture(scope="module")
def cmu_grid(cmu, tmp_path_factory) -> np.ndarray:
    """The tile grid `hexfast tiles` writes for CMU (coords, N x 2)."""
    out = tmp_path_factory.mktemp("tiles")
    assert cli.main(["tiles", str(cmu), "-o", str(out)]) == 0
    with h5py.File(out / f"{CMU_STEM}.h5") as f:
        return f["coords"][:]


# ---------------------------------------------------------------- score CLI on CMU


def test_score_writes_slide_files_and_says_demo(cmu_scored):
    d, r = cmu_scored
    assert sorted(p.name for p in d.iterdir()) == slide_files(CMU_STEM)
    assert temp_files(d.parent) == []
    # The terminal says DEMO where nobody can miss it: a banner before anything else.
    assert "DEMO MODEL" in r.stderr and "NOT predictions" in r.stderr
    assert r.stderr.index("DEMO MODEL") < r.stderr.index(f"{CMU_STEM}.svs")
    assert re.search(rf"^{CMU_STEM}\.svs\s+ok\s+\d+ ", r.stdout, re.M) and "1 of 1 slides ok" in r.stdout

    report = json.loads((d / "report.json").read_text())
    assert report["demo"] is True and "DEMO" in report["warning"] and "UNTRAINED" in report["warning"]
    assert report["bundle"]["hash"] == load_bundle().hash
    assert report["backend"] == "ort-cpu" and report["tile_count"] > 100
    assert np.isfinite(report["mica"]["risk"]) and len(report["mica"]["hazards"]) == 4

    png = Image.open(d / "overview.png")
    assert png.format == "PNG" and 600 < png.width < 4000 and 600 < png.height < 4000
    top = np.asarray(png.convert("RGB"))[:15].astype(int)  # the red DEMO band across the top
    assert ((top[..., 0] > 180) & (top[..., 1] < 40) & (top[..., 2] < 40)).mean() > 0.8

    with h5py.File(d / f"{CMU_STEM}.h5") as f:
        assert f.attrs["demo"] and f["coords"].attrs["demo"]
        assert f.attrs["bundle_hash"] == report["bundle"]["hash"]
        assert len(f["coords"]) == report["tile_count"]


def test_h5_reads_like_hex_and_mil_tools(cmu_scored, cmu_grid):
    d, _ = cmu_scored
    path = str(d / f"{CMU_STEM}.h5")
    # HEX's virtual_codex_from_h5.py, verbatim.
    codex_prediction = h5py.File(path)["codex_prediction"][:]
    coords = h5py.File(path)["coords"][:]
    n = len(cmu_grid)
    assert codex_prediction.shape == (n, 40) and coords.shape == (n, 2) and n > 100
    assert np.isfinite(codex_prediction).all()
    np.testing.assert_array_equal(coords, cmu_grid)  # the same tiles, in the same order, as `hexfast tiles`
    # CLAM / TRIDENT-style MIL readers.
    with h5py.File(path, "r") as f:
        features = f["features"][:]
        assert features.shape == (n, 1024) and features.dtype == np.float32 and np.isfinite(features).all()
        assert f["coords"].attrs["patch_size"] == 112 and f["coords"].attrs["patch_level"] == 0
        assert list(f["codex_prediction"].attrs["marker_names"]) == list(MARKERS)


def test_predictions_equal_onnxruntime_on_openslide_tiles(cmu, cmu_scored):
    """A handful of tiles, read with openslide-python and run through onnxruntime directly on the
    demo bundle's hex.onnx, give the h5's rows (first, last, rightmost, lowest among them)."""
    import onnxruntime as ort

    d, _ = cmu_scored
    with h5py.File(d / f"{CMU_STEM}.h5") as f:
        coords, markers, features = f["coords"][:], f["codex_prediction"][:], f["features"][:]
        tile = int(f["coords"].attrs["patch_size_level0"])
    n = len(coords)
    pick = sorted({0, 1, n // 3, n // 2, n - 1, int(coords[:, 0].argmax()), int(coords[:, 1].argmax())})
    with openslide.OpenSlide(str(cmu)) as osr:
        tiles = np.stack([np.asarray(osr.read_region((int(x), int(y)), 0, (tile, tile)).convert("RGB"))
                          for x, y in coords[pick]])
    session = ort.InferenceSession(str(DEFAULT_BUNDLE / "hex.onnx"), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"tiles": tiles})))
    for name, got in (("markers", markers[pick]), ("embedding", features[pick])):
        ref = want[name]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=name)


def test_mica_risk_equals_the_models_rerun_on_the_h5(cmu, cmu_scored):
    """The report's MICA risk: CODEX encoder on the reference grid (whole slide, step = tile
    size, float16) built here from the h5's HEX tiles, then MICA on the h5's bag (the demo's MICA
    reads CLAM's patches: mica_coords, mica_features); most-attended tiles in the bag's coords."""
    import onnxruntime as ort

    d, _ = cmu_scored
    with h5py.File(d / f"{CMU_STEM}.h5") as f:
        coords, markers = f["coords"][:], f["codex_prediction"][:]
        bag_coords, features = f["mica_coords"][:], f["mica_features"][:]
    with openslide.OpenSlide(str(cmu)) as osr:
        w, h = osr.dimensions
    grid = reference_grid(coords, markers, 112, w, h).astype(np.float16)
    codex = np.ascontiguousarray(np.moveaxis(grid, -1, 0), np.float32)
    cpu = ["CPUExecutionProvider"]
    enc = ort.InferenceSession(str(DEFAULT_BUNDLE / "codex_encoder.onnx"), providers=cpu)
    h_codex = enc.run(["features"], {"codex": codex})[0]
    mica = ort.InferenceSession(str(DEFAULT_BUNDLE / "mica.onnx"), providers=cpu)
    width = mica.get_inputs()[3].shape[1]
    # All tiles in one call from the empty state (the pipeline streams chunks through the same graph).
    risk, scores, lse = mica.run(["risk", "coattn_scores", "coattn_lse"], {
        "h_path": features, "h_codex": h_codex, "coattn_lse_in": np.full(40, INITIAL_LSE, np.float32),
        "coattn_mean_in": np.zeros((40, width), np.float32)})
    report = json.loads((d / "report.json").read_text())
    assert report["mica"]["risk"] == pytest.approx(float(risk.reshape(())), rel=1e-4, abs=1e-6)
    attention = np.exp(scores.astype(np.float64) - lse[:, None])
    np.testing.assert_allclose(attention.sum(axis=1), 1.0, rtol=1e-5)
    top = report["mica"]["most_attended"]
    best = int(np.argmax(attention.mean(axis=0)))
    assert top["overall"][0]["tile"] == best
    assert [top["overall"][0]["x"], top["overall"][0]["y"]] == bag_coords[best].tolist()
    assert top["per_marker"]["CD8"][0][2] == pytest.approx(attention[1].max(), rel=1e-4)
    assert top["per_marker"]["CD8"][0][:2] == bag_coords[int(np.argmax(attention[1]))].tolist()


def test_ome_tiff_end_to_end(cmu, cmu_scored):
    d, _ = cmu_scored
    with h5py.File(d / f"{CMU_STEM}.h5") as f:
        coords, markers = f["coords"][:], f["codex_prediction"][:]
        stride, mpp = int(f.attrs["stride"]), float(f.attrs["mpp"])
    with openslide.OpenSlide(str(cmu)) as osr:
        w, h = osr.dimensions
    with tifffile.TiffFile(d / "virtual_codex.ome.tif") as tif:
        assert tif.is_ome
        series = tif.series[0]
        names, sx, sy, unit = ome_channels_and_size(tif)
        level0 = series.levels[0].asarray()
        levels = len(series.levels)
    assert names == list(MARKERS)
    assert sx == pytest.approx(stride * mpp) and sy == pytest.approx(stride * mpp) and unit == "µm"
    assert series.axes == "CYX" and level0.shape == (40, h // stride + 1, w // stride + 1)
    assert levels == 1  # 27 x 20 cells: below the 256 px where halving starts (the pyramid: see the API test)
    np.testing.assert_array_equal(np.moveaxis(level0, 0, -1), reference_grid(coords, markers, stride, w, h))


# ---------------------------------------------------------------- --resume


def test_resume_skips_a_complete_slide(cmu, cmu_scored, tmp_path):
    d, _ = cmu_scored
    out = tmp_path / "out"
    shutil.copytree(d.parent, out)  # copy2: mtimes kept
    before = mtimes(out / CMU_STEM)
    start = time.perf_counter()
    r = hexfast_cli("score", "--resume", cmu, "-o", out)
    seconds = time.perf_counter() - start
    assert r.returncode == 0, r.stderr
    assert "1 of 1 slides already complete" in r.stderr
    assert re.search(rf"^{CMU_STEM}\.svs\s+done before", r.stdout, re.M)
    assert "ort-cpu" not in r.stderr  # no engine was even loaded
    assert mtimes(out / CMU_STEM) == before
    assert seconds < 30


def test_resume_redoes_incomplete_and_other_bundle(tmp_path, capsys):
    a, b = small_slide(tmp_path / "a.tiff", 1), small_slide(tmp_path / "b.tiff", 2)
    out = tmp_path / "out"
    assert run(capsys, "score", a, b, "-o", out)[0] == 0
    ma, mb = mtimes(out / "a"), mtimes(out / "b")

    (out / "a" / "report.json").unlink()  # a run that did not finish
    code, stdout, err = run(capsys, "score", "--resume", a, b, "-o", out)
    assert code == 0 and "1 of 2 slides already complete" in err
    assert re.search(r"^a\.tiff\s+ok", stdout, re.M) and re.search(r"^b\.tiff\s+done before", stdout, re.M)
    assert outputs_complete(out, "a") and mtimes(out / "b") == mb
    assert all(mtimes(out / "a")[k] > ma[k] for k in ma if k != "report.json")

    # Other weights: a copy of the demo bundle whose manifest differs (so its hash does).
    other = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["created"] = "2000-01-01T00:00:00Z"
    (other / "manifest.json").write_text(json.dumps(manifest))
    new_hash = load_bundle(other).hash
    assert new_hash != load_bundle().hash
    ma, mb = mtimes(out / "a"), mtimes(out / "b")
    code, stdout, err = run(capsys, "score", "--resume", "--model", other, a, b, "-o", out)
    assert code == 0 and "already complete" not in err
    for stem, before in (("a", ma), ("b", mb)):
        assert json.loads((out / stem / "report.json").read_text())["bundle"]["hash"] == new_hash
        assert mtimes(out / stem)[f"{stem}.h5"] > before[f"{stem}.h5"]
    assert temp_files(out) == []


# ---------------------------------------------------------------- failures


def test_bad_slides_do_not_stop_the_good_ones(tmp_path, capsys, fixture_slide):
    """good, corrupt mid-stream (a damaged level-0 tile: opens and tiles fine, fails after the first
    batches), unreadable.svs (fails while tiling), good: the good ones complete, exit code 2."""
    good = small_slide(tmp_path / "good.tiff")
    twin = tmp_path / "good-twin.tiff"
    twin.symlink_to(good)
    broken = he_slide(tmp_path / "broken.tiff", 1120, 896, [(0, 0, 1120, 896)], pyramid=True)
    with hexfast.open_slide(broken) as slide:
        coords = hexfast.tile_slide(slide).coords
    x, y = coords[len(coords) // 2]
    corrupt_level0_tile(broken, int(x), int(y))
    unreadable = fixture_slide("unreadable.svs")
    out = tmp_path / "out"

    code, stdout, err = run(capsys, "score", "--batch-size", "8", good, broken, unreadable, twin, "-o", out)
    assert code == 2
    errors = error_lines(err)
    assert len(errors) == 2 and "Traceback" not in err
    assert errors[0].startswith(f"hexfast: error: {broken}: tile ") and "ZIPDecode" in errors[0]
    assert errors[1].startswith(f"hexfast: error: {unreadable}: cannot read pixels")
    for name, status in (("good.tiff", "ok"), ("broken.tiff", "FAILED"), ("unreadable.svs", "FAILED"),
                         ("good-twin.tiff", "ok")):
        assert re.search(rf"^{re.escape(name)}\s+{status}\s", stdout, re.M), stdout
    assert "2 of 4 slides ok, 2 FAILED" in stdout
    assert outputs_complete(out, "good") and outputs_complete(out, "good-twin")
    assert sorted(p.name for p in out.iterdir()) == ["good", "good-twin"]  # nothing at all for the bad ones
    assert temp_files(out) == []
    with h5py.File(out / "good" / "good.h5") as f1, h5py.File(out / "good-twin" / "good-twin.h5") as f2:
        np.testing.assert_array_equal(f1["codex_prediction"][:], f2["codex_prediction"][:])


def test_two_slides_with_one_name_are_not_merged(tmp_path, capsys):
    """a/x.tiff and b/x.tiff would both write OUT/x/: the second is refused, not silently
    written over the first's outputs."""
    first, second = tmp_path / "a" / "x.tiff", tmp_path / "b" / "x.tiff"
    first.parent.mkdir()
    second.parent.mkdir()
    small_slide(first, seed=1), small_slide(second, seed=2)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "score", first, second, "-o", out)
    assert code == 2
    errors = error_lines(err)
    assert len(errors) == 1 and errors[0].startswith(f"hexfast: error: {second}: ") and str(first) in errors[0]
    assert "1 of 2 slides ok, 1 FAILED" in stdout
    assert json.loads((out / "x" / "report.json").read_text())["slide"]["path"] == str(first.resolve())


@pytest.fixture
def bad_inputs(tmp_path, fixture_slide):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a slide\n")
    garbage = tmp_path / "garbage.svs"
    garbage.write_bytes(os.urandom(4096))
    (tmp_path / "empty").mkdir()
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    return {"notes": notes, "garbage": garbage, "empty": tmp_path / "empty", "blocker": blocker,
            "missing": tmp_path / "nope.svs", "glob": tmp_path / "nomatch-*.svs"}


@pytest.mark.parametrize("case, argv, fragments", [
    ("missing path", ["{missing}"], ["{missing}: no such file"]),
    ("directory without slides", ["{empty}"], ["{empty}: directory holds no slide files"]),
    ("unopenable tiff", ["{unopenable}"], ["{unopenable}: cannot open slide", "Unsupported TIFF compression"]),
    ("text file", ["{notes}"], ["{notes}: not a slide format"]),
    ("garbage .svs", ["{garbage}"], ["{garbage}: not a slide format"]),
    ("glob matching nothing", ["{glob}"], ["{glob}: no file matches this pattern"]),
    ("implausible --mpp", ["{cmu}", "--mpp", "1000"], ["CMU-1-Small-Region.svs: MPP 1000", "not a plausible"]),
    ("non-numeric --mpp", ["{cmu}", "--mpp", "abc"], ["argument --mpp: 'abc' is not a number"]),
    ("negative --mpp", ["{cmu}", "--mpp=-0.5"], ["argument --mpp: '-0.5' must be a positive number"]),
    ("output below a file", ["{cmu}", "-o", "{blocker}/out"], ["{blocker}/out: cannot create output directory"]),
    ("output is a file", ["{cmu}", "-o", "{blocker}"], ["{blocker}: output path exists and is not a directory"]),
])
def test_bad_input_is_one_line_naming_it(case, argv, fragments, bad_inputs, fixture_slide, tmp_path, capsys):
    names = dict(bad_inputs)
    if "{unopenable}" in argv:  # shared test data only where the case needs it
        names["unopenable"] = fixture_slide("unopenable.tiff")
    if "{cmu}" in argv:
        names["cmu"] = shared_file(CMU)
    argv = [a.format(**names) for a in argv]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "out")]
    code, stdout, err = run(capsys, "score", *argv)
    assert code == 2, err
    assert "Traceback" not in err
    errors = error_lines(err)
    assert len(errors) == 1, err
    assert errors[0].startswith(("hexfast: error: ", "hexfast score: error: ")), errors[0]
    for fragment in fragments:
        assert fragment.format(**names) in errors[0], errors[0]
    # Nothing written for the bad input, not even a slide's directory.
    out = tmp_path / "out"
    assert not out.exists() or list(out.iterdir()) == []


def test_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(SlideError, match="no such file"):
        cli.main(["score", "--debug", str(tmp_path / "nope.svs"), "-o", str(tmp_path / "out")])
    r = hexfast_cli("--debug", "score", tmp_path / "nope.svs", "-o", tmp_path / "out")
    assert r.returncode != 0 and "Traceback" in r.stderr and "SlideError" in r.stderr


def test_no_tissue_scores_empty_and_warns_loudly(blank_slide, tmp_path, capsys):
    """Decision: a slide without tissue is not an error (exit 0) but a loud warning, with a
    complete, valid, empty set of outputs that say so (so --resume does not redo it)."""
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "score", blank_slide, "-o", out)
    assert code == 0, err
    warning = [line for line in err.splitlines() if "NO TISSUE" in line]
    assert len(warning) == 1 and "WARNING" in warning[0] and str(blank_slide) in warning[0]
    assert re.search(r"^blank\.tiff\s+NO TISSUE\s+0\s", stdout, re.M), stdout
    d = out / "blank"
    assert sorted(p.name for p in d.iterdir()) == slide_files("blank") and outputs_complete(out, "blank")
    with h5py.File(d / "blank.h5") as f:
        assert f["coords"].shape == (0, 2) and f["codex_prediction"].shape == (0, 40)
        assert f["features"].shape == (0, 1024)
    report = json.loads((d / "report.json").read_text())
    assert report["tile_count"] == 0 and report["mica"] is None
    assert any("NO TISSUE" in w for w in report["warnings"])
    with tifffile.TiffFile(d / "virtual_codex.ome.tif") as tif:
        assert tif.is_ome and not tif.series[0].asarray().any()
    assert Image.open(d / "overview.png").width > 600


# ---------------------------------------------------------------- demo


def test_demo_command(tmp_path):
    out = tmp_path / "demo"
    r = hexfast_cli("demo", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "DEMO MODEL" in r.stderr and "wrote a synthetic H&E slide" in r.stderr
    assert (out / "demo-slide.tif").is_file() and outputs_complete(out, "demo-slide")
    report = json.loads((out / "demo-slide" / "report.json").read_text())
    assert report["demo"] is True and report["tile_count"] > 100
    assert temp_files(out) == []


# ---------------------------------------------------------------- Python API


def test_api_in_memory_equals_the_cli(cmu, cmu_scored):
    d, _ = cmu_scored
    calls = []
    with hexfast.Scorer(model=None, backend="ort-cpu") as scorer:
        result = scorer.score(cmu, out=None, progress=lambda stage, done, total: calls.append((stage, done, total)))
    assert isinstance(result, hexfast.SlideResult) and result.demo and result.outputs == {}
    with h5py.File(d / f"{CMU_STEM}.h5") as f:
        np.testing.assert_array_equal(result.coords, f["coords"][:])
        np.testing.assert_allclose(result.markers, f["codex_prediction"][:], rtol=1e-5, atol=1e-6)
        assert result.features.shape == (len(result.coords), 1024)
        np.testing.assert_allclose(result.features, f["features"][:], rtol=1e-5, atol=1e-5)
    assert result.marker_names == list(MARKERS) and result.tile_size == 112 and result.mpp == pytest.approx(0.499)
    report = json.loads((d / "report.json").read_text())
    assert result.mica["risk"] == pytest.approx(report["mica"]["risk"], rel=1e-4)
    api_top, cli_top = result.mica["most_attended"]["overall"], report["mica"]["most_attended"]["overall"]
    assert [t["tile"] for t in api_top] == [t["tile"] for t in cli_top]
    assert [t["attention"] for t in api_top] == pytest.approx([t["attention"] for t in cli_top], rel=1e-4)
    n, m = len(result.coords), len(result.mica_coords)  # HEX's tiles, then MICA's bag (CLAM's patches)
    stages = [stage for stage, _, _ in calls]
    k = stages.count("tiles")
    assert stages == ["tiles"] * k + ["mica tiles"] * (len(stages) - k)
    for stage, total in (("tiles", n), ("mica tiles", m)):
        done = [d for s, d, _ in calls if s == stage]
        assert {t for s, _, t in calls if s == stage} == {total}
        assert done[0] == 0 and done[-1] == total and len(done) >= 2 and done == sorted(done)
    assert k > 2  # HEX's tiles arrive batch by batch


def test_api_writes_outputs_with_overlap_and_a_pyramid(tmp_path):
    """Stride 36 (< a third of the 112 px tile: the overview's shifted grid once crashed there) on a
    10000 px wide slide: a 278-cell-wide virtual CODEX, so the OME-TIFF has a reduced level."""
    slide = he_slide(tmp_path / "wide.tiff", 10000, 448, [(224, 0, 672, 448)])
    with hexfast.Scorer(backend="ort-cpu", stride=36) as scorer:
        result = scorer.score(slide, out=tmp_path / "out")
    d = tmp_path / "out" / "wide"
    assert result.outputs == {"h5": d / "wide.h5", "geojson": d / "wide.geojson.gz", "ome_tiff": d / "virtual_codex.ome.tif",
                              "overview": d / "overview.png", "report": d / "report.json"}
    assert all(p.is_file() for p in result.outputs.values()) and result.features is None
    with h5py.File(d / "wide.h5") as f:
        coords, markers = f["coords"][:], f["codex_prediction"][:]
        assert f["coords"].attrs["stride"] == 36 and f["features"].shape == (len(coords), 1024)
    np.testing.assert_array_equal(coords, result.coords)
    assert len(coords) > 50 and (coords % 36 == 0).all()
    grid = np.moveaxis(reference_grid(coords, markers, 36, 10000, 448), -1, 0)
    with tifffile.TiffFile(d / "virtual_codex.ome.tif") as tif:
        names, sx, _, _ = ome_channels_and_size(tif)
        levels = [level.asarray() for level in tif.series[0].levels]
    assert names == list(MARKERS) and sx == pytest.approx(36 * 0.5)
    assert [lv.shape for lv in levels] == [(40, 13, 278), (40, 7, 139)]
    np.testing.assert_array_equal(levels[0], grid)
    block = grid[:, :12].reshape(40, 6, 2, 139, 2).mean(axis=(2, 4))  # 2x2 means (even rows)
    np.testing.assert_allclose(levels[1][:, :6], block, rtol=1e-6, atol=1e-7)
    assert Image.open(d / "overview.png").width > 600


def test_cancel_from_another_thread(cmu, tmp_path):
    """Thousands of tiles (stride 16, batches of 8); cancel() from another thread once scoring is under
    way (not after a fixed time: a fast CPU could finish first): Cancelled soon after, no report.json,
    no h5, no temp files."""
    out = tmp_path / "out"
    seen = []
    cancelled_at = []
    under_way = threading.Event()

    def progress(stage, done, total):
        seen.append((done, total))
        if done >= 64:
            under_way.set()

    with hexfast.Scorer(backend="ort-cpu", stride=16, batch_size=8) as scorer:
        def cancel():
            if under_way.wait(timeout=120):
                cancelled_at.append(time.perf_counter())
                scorer.cancel()

        canceller = threading.Thread(target=cancel)
        canceller.start()
        try:
            with pytest.raises(Cancelled, match="cancelled after"):
                scorer.score(cmu, out=out, progress=progress)
            raised_at = time.perf_counter()
        finally:
            under_way.set()
            canceller.join()
    assert cancelled_at, "score finished before cancel() was called"
    assert raised_at - cancelled_at[0] < 3.0
    done, total = seen[-1]
    assert total > 2000 and done < total
    assert temp_files(out) == []
    d = out / CMU_STEM
    assert not (d / "report.json").exists() and not (d / f"{CMU_STEM}.h5").exists()


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_score_many_prepares_ahead_and_leaks_nothing(tmp_path):
    slides = [small_slide(tmp_path / f"s{i}.tiff", seed=i) for i in range(3)]
    with hexfast.Scorer(backend="ort-cpu") as warm:  # onnxruntime's process-wide threads start once
        warm.score(slides[0])
    gc.collect()
    py_threads, threads = threading.active_count(), os_threads()

    with hexfast.Scorer(backend="ort-cpu") as scorer:
        results = list(scorer.score_many(slides, out=tmp_path / "out"))
        # Done means done: the prepare-ahead thread and the slides' reader threads are gone.
        assert threading.active_count() == py_threads, threading.enumerate()
        assert [p for p, _ in results] == slides
        for path, result in results:
            assert isinstance(result, hexfast.SlideResult), result
            assert outputs_complete(tmp_path / "out", path.stem) and len(result.coords) > 5
        # Abandoned after the first slide: the one being prepared ahead is closed too.
        many = scorer.score_many(slides)
        path, first = next(many)
        assert path == slides[0] and isinstance(first, hexfast.SlideResult)
        many.close()
        assert threading.active_count() == py_threads, threading.enumerate()
    gc.collect()
    assert threading.active_count() == py_threads, threading.enumerate()
    assert os_threads() == threads


@pytest.mark.parametrize("signum, code, message", [(signal.SIGINT, 130, "hexfast: interrupted"),
                                                   (signal.SIGTERM, 143, "hexfast: terminated (SIGTERM)"),
                                                   (signal.SIGHUP, 129, "hexfast: terminated (SIGHUP)")])
def test_ctrl_c_and_sigterm_exit_cleanly_and_leave_no_partial_outputs(cmu, tmp_path, signum, code, message):
    """Ctrl-C, SIGTERM (how batch schedulers stop a job) and SIGHUP (a closed terminal or ssh
    session) unwind like an exception."""
    out = tmp_path / "out"
    d = out / CMU_STEM
    # The default SIGINT action: a test run started in the background would hand down SIG_IGN.
    proc = subprocess.Popen(
        [sys.executable, "-m", "hexfast", "score", str(cmu), "-o", str(out), "--stride", "16", "--batch-size", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 60
        while not temp_files(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the h5 being written: tiles are streaming
        assert temp_files(out), "scoring never started"
        time.sleep(1.0)
        sent = time.monotonic()
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=30)
        waited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    assert message in stderr and "Traceback" not in stderr
    assert waited < 5.0
    assert temp_files(out) == []
    assert not (d / "report.json").exists() and not (d / f"{CMU_STEM}.h5").exists()


def test_import_hexfast_stays_light():
    code = "import sys, hexfast; print('onnxruntime' in sys.modules, 'hexfast.score.pipeline' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["False", "False"], r.stderr
    assert hexfast.Scorer is hexfast.score.pipeline.Scorer and "Scorer" in hexfast.__all__
