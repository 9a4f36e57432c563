"""The hexfast command, run as a user would, including bad input."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import hexfast, one_line_error
from hexfast.files import atomic_output




def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def test_info(cmu_small):
    r = hexfast("info", cmu_small)
    assert r.returncode == 0, r.stderr
    assert "0.4990 µm/px" in r.stdout and "112 px at level 0" in r.stdout and "20x" in r.stdout
    r = hexfast("info", "--json", cmu_small)
    info = json.loads(r.stdout)
    assert info["dimensions"] == [2220, 2967] and info["tile_size_level0"] == 112


def test_tiles_writes_h5_and_png(cmu_small, tmp_path):
    r = hexfast("tiles", cmu_small, "-o", tmp_path)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith("CMU-1-Small-Region: ") and " tiles, tissue " in line and " mm², " in line
    assert leftovers(tmp_path) == ["CMU-1-Small-Region.h5", "CMU-1-Small-Region.tissue.png"]
    with h5py.File(tmp_path / "CMU-1-Small-Region.h5") as f:
        coords = f["coords"][:]
        attrs = dict(f["coords"].attrs)
    assert coords.dtype == np.int64 and coords.ndim == 2 and coords.shape[1] == 2 and len(coords) > 100
    assert f"{len(coords)} tiles" in line
    assert attrs["patch_size_level0"] == 112 and attrs["stride"] == 112
    assert attrs["mpp"] == pytest.approx(0.499) and attrs["magnification"] == 20
    assert (attrs["level0_width"], attrs["level0_height"]) == (2220, 2967)
    assert attrs["tissue_threshold"] == 0.5
    png = Image.open(tmp_path / "CMU-1-Small-Region.tissue.png")
    assert png.width >= 1000  # large enough to check by eye


def test_tiles_stride_and_threshold_options(cmu_small, tmp_path):
    r = hexfast("tiles", cmu_small, "-o", tmp_path, "--stride", 56, "--min-tissue", 0.9, "--saturation-threshold", 8)
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "CMU-1-Small-Region.h5") as f:
        assert f["coords"].attrs["stride"] == 56 and f["coords"].attrs["overlap"] == 56
        assert f["coords"].attrs["tissue_threshold"] == 0.9
        assert (f["tissue_fraction"][:] >= 0.9).all()


def test_no_tissue_warns_loudly_and_writes_empty_h5(blank_slide, tmp_path):
    r = hexfast("tiles", blank_slide, "-o", tmp_path)
    assert r.returncode == 0
    assert "WARNING" in r.stderr and "NO TISSUE" in r.stderr and "blank.tiff" in r.stderr
    with h5py.File(tmp_path / "blank.h5") as f:
        assert f["coords"].shape == (0, 2)
    assert (tmp_path / "blank.tissue.png").exists()


def test_missing_path(tmp_path):
    one_line_error(hexfast("tiles", tmp_path / "nope.svs", "-o", tmp_path / "out"), "nope.svs", "no such file")
    assert leftovers(tmp_path / "out") == []


def test_directory(tmp_path):
    one_line_error(hexfast("info", tmp_path), str(tmp_path), "is a directory")


def test_unreadable_svs(fixture_slide, tmp_path):
    r = hexfast("tiles", fixture_slide("unreadable.svs"), "-o", tmp_path)
    one_line_error(r, "unreadable.svs", "cannot read pixels", "Bogus marker length")
    assert leftovers(tmp_path) == []


def test_unopenable_tiff(fixture_slide, tmp_path):
    r = hexfast("tiles", fixture_slide("unopenable.tiff"), "-o", tmp_path)
    one_line_error(r, "unopenable.tiff", "cannot open slide", "Unsupported TIFF compression")
    assert leftovers(tmp_path) == []


def test_non_slide_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a slide\n")
    one_line_error(hexfast("tiles", notes, "-o", tmp_path / "out"), "notes.txt", "not a slide format")


@pytest.mark.parametrize(
    "value, fragment",
    [("abc", "'abc' is not a number"), ("-1", "must be a positive number"), ("0", "must be a positive number"),
     ("nan", "must be a positive number"), ("1000", "not a plausible scan resolution")],
)
def test_nonsense_mpp(cmu_small, tmp_path, value, fragment):
    r = hexfast("tiles", cmu_small, "-o", tmp_path / "out", f"--mpp={value}")
    one_line_error(r, "--mpp" if value != "1000" else "CMU-1-Small-Region.svs", fragment)
    assert leftovers(tmp_path / "out") == []


def test_slide_without_mpp_is_refused(no_mpp_slide, tmp_path):
    r = hexfast("tiles", no_mpp_slide, "-o", tmp_path / "out")
    one_line_error(r, "nompp.tiff", "no resolution", "--mpp")
    r = hexfast("tiles", no_mpp_slide, "-o", tmp_path / "out", "--mpp", "0.5")
    assert r.returncode == 0, r.stderr


def test_unwritable_output_directory(cmu_small, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line_error(hexfast("tiles", cmu_small, "-o", blocker / "out"), str(blocker / "out"), "cannot create")
    one_line_error(hexfast("tiles", cmu_small, "-o", blocker), str(blocker), "not a directory")


def test_one_bad_slide_does_not_stop_the_others(cmu_small, fixture_slide, tmp_path):
    r = hexfast("tiles", fixture_slide("unreadable.svs"), cmu_small, "-o", tmp_path)
    assert r.returncode == 2
    assert "unreadable.svs" in r.stderr and "CMU-1-Small-Region" in r.stdout
    assert leftovers(tmp_path) == ["CMU-1-Small-Region.h5", "CMU-1-Small-Region.tissue.png"]


def test_debug_shows_traceback(tmp_path):
    r = hexfast("--debug", "info", tmp_path / "nope.svs")
    assert r.returncode != 0 and "Traceback" in r.stderr and "SlideError" in r.stderr


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.h5"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"  # the previous complete file survives
    assert leftovers(tmp_path) == ["x.h5"]
    with atomic_output(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and leftovers(tmp_path) == ["x.h5"]
