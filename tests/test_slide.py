"""Slide metadata, MPP and tile size, and the strip-wise reduced read."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import hexfast
from conftest import write_tiff
from hexfast.slide import tile_spec_for_mpp


def test_cmu_small_metadata(cmu_small):
    with hexfast.open_slide(cmu_small) as s:
        assert s.dimensions == (2220, 2967)
        assert s.level_count == 1
        assert s.vendor == "aperio"
        assert s.mpp == pytest.approx(0.499)
        assert s.objective_power == 20
        assert (s.tile.size, s.tile.magnification, s.tile.in_reference_bucket) == (112, 20, True)


@pytest.mark.parametrize(
    "mpp, size, mag",
    [(0.125, 448, 80), (0.25, 224, 40), (0.2525, 224, 40), (0.499, 112, 20), (0.2, 224, 40), (0.4, 112, 20)],
)
def test_reference_buckets(mpp, size, mag):
    spec = tile_spec_for_mpp(mpp)
    assert (spec.size, spec.magnification, spec.in_reference_bucket) == (size, mag, True)


@pytest.mark.parametrize("mpp", [0.35, 1.0])
def test_outside_buckets_uses_56_um(mpp):
    spec = tile_spec_for_mpp(mpp)
    assert not spec.in_reference_bucket
    assert spec.size == round(56 / mpp)


def test_mpp_override_and_multilevel(fixture_slide):
    boxes = fixture_slide("boxes.tiff")
    with pytest.raises(hexfast.SlideError, match="not a plausible scan resolution.*--mpp"):
        hexfast.open_slide(boxes)  # 28 px/cm in the TIFF tags: 352 µm/px
    with hexfast.open_slide(boxes, mpp=0.25) as s:
        assert s.level_count == 4
        assert s.mpp_source == "--mpp" and s.tile.size == 224


def test_mpp_from_tiff_resolution(tmp_path):
    path = write_tiff(tmp_path / "res.tiff", np.full((128, 128, 3), 200, np.uint8), mpp=0.26)
    with hexfast.open_slide(path) as s:
        assert s.mpp == pytest.approx(0.26, rel=1e-6)
        assert s.tile.size == 224


def test_missing_mpp_is_refused_with_hint(no_mpp_slide):
    with pytest.raises(hexfast.SlideError, match="no resolution.*--mpp"):
        hexfast.open_slide(no_mpp_slide)
    with hexfast.open_slide(no_mpp_slide, mpp=0.5) as s:
        assert s.tile.size == 112


@pytest.mark.parametrize("downsample", [1.0, 3.0, 7.5])
def test_read_reduced_matches_box_filter_of_level0(fixture_slide, downsample):
    """Strip-wise reads from the best level agree with box-filtering the full level 0."""
    with hexfast.open_slide(fixture_slide("boxes.tiff"), mpp=0.25) as s:
        w, h = s.dimensions
        got = s.read_reduced(downsample, max_strip_bytes=20_000)  # force many strips
        ow, oh = got.shape[1], got.shape[0]
        # Beyond the slide is background (white), as read_region gives it.
        full = Image.fromarray(s.read_region((0, 0), 0, (int(np.ceil(ow * downsample)), int(np.ceil(oh * downsample)))))
        want = np.asarray(full.resize((ow, oh), Image.Resampling.BOX, box=(0, 0, ow * downsample, oh * downsample)))
    assert got.shape == (int(np.ceil(h / downsample)), int(np.ceil(w / downsample)), 3)
    diff = np.abs(got.astype(int) - want.astype(int))
    if downsample == 1.0:
        assert diff.max() == 0
    else:  # read from an upper level: the file's own downsample differs at box edges only
        assert np.median(diff) == 0 and diff.mean() < 6
