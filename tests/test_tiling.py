"""Tissue detection and tile grids on real and synthetic slides."""

from __future__ import annotations

import cv2
import numpy as np

import hexfast
from conftest import write_tiff


def saturation_fraction(rgb: np.ndarray, threshold: int = 20) -> float:
    return float((cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1] > threshold).mean())


def test_cmu_small_tiles_lie_on_tissue(cmu_small):
    with hexfast.open_slide(cmu_small) as slide:
        grid = hexfast.tile_slide(slide)
        w, h = slide.dimensions
        glass_mm2 = w * h * slide.mpp**2 / 1e6
        # Tissue covers roughly 40% of this crop (checked by eye on tissue.png).
        assert 0.25 < grid.tissue.area_mm2 / glass_mm2 < 0.6
        assert 150 <= len(grid) <= 260
        assert grid.tile_size == 112 and grid.stride == 112
        assert (grid.fraction >= 0.5).all()
        # Independent check at full resolution: kept tiles are mostly stained,
        # tiles left out are mostly glass.
        kept = {tuple(c) for c in grid.coords}
        on, off = [], []
        for y in range(0, h - 112, 112):
            for x in range(0, w - 112, 112):
                frac = saturation_fraction(slide.read_region((x, y), 0, (112, 112)))
                (on if (x, y) in kept else off).append(frac)
    assert np.median(on) > 0.7
    assert np.median(off) < 0.05
    assert np.mean(np.array(on) > 0.2) > 0.97


def test_grid_is_row_major_and_deterministic(cmu_small):
    with hexfast.open_slide(cmu_small) as slide:
        a = hexfast.tile_slide(slide)
        b = hexfast.tile_slide(slide)
    np.testing.assert_array_equal(a.coords, b.coords)
    order = np.lexsort((a.coords[:, 0], a.coords[:, 1]))
    np.testing.assert_array_equal(order, np.arange(len(a.coords)))


def test_overlapping_stride_gives_finer_grid(cmu_small):
    with hexfast.open_slide(cmu_small) as slide:
        plain = hexfast.tile_slide(slide)
        half = hexfast.tile_slide(slide, stride=56)
    assert 3.2 * len(plain) < len(half) < 4.8 * len(plain)
    assert set(map(tuple, plain.coords)) <= set(map(tuple, half.coords))
    assert (half.coords % 56 == 0).all()


def test_same_tissue_at_20x_and_40x(tmp_path):
    """Physical parameters: one synthetic section scanned at 0.5 and 0.25 µm/px gives the same tissue area."""
    yy, xx = np.mgrid[0:1200, 0:1600]
    section = ((xx - 800) ** 2 / 500**2 + (yy - 600) ** 2 / 350**2) < 1
    rgb = np.where(section[..., None], np.array([200, 100, 170], np.uint8), np.uint8(242)).astype(np.uint8)
    s20 = write_tiff(tmp_path / "s20.tiff", rgb, mpp=0.5)
    s40 = write_tiff(tmp_path / "s40.tiff", np.repeat(np.repeat(rgb, 2, 0), 2, 1), mpp=0.25)
    areas = []
    for path in (s20, s40):
        with hexfast.open_slide(path) as slide:
            grid = hexfast.tile_slide(slide)
            areas.append(grid.tissue.area_mm2)
            assert len(grid) > 0
    true_area = np.pi * 500 * 350 * 0.5**2 / 1e6
    assert abs(areas[0] - true_area) / true_area < 0.03
    assert abs(areas[1] - areas[0]) / areas[0] < 0.01


def test_blank_slide_has_no_tissue(blank_slide):
    with hexfast.open_slide(blank_slide) as slide:
        grid = hexfast.tile_slide(slide)
    assert len(grid) == 0 and grid.coords.shape == (0, 2)
    assert grid.tissue.area_mm2 == 0


def test_mask_memory_is_capped(tmp_path):
    """A huge slide's mask is computed at a coarser resolution, never beyond max_mask_pixels."""
    params = hexfast.TissueParams(max_mask_pixels=10_000)
    path = write_tiff(tmp_path / "s.tiff", np.full((512, 768, 3), 240, np.uint8), mpp=0.5)
    with hexfast.open_slide(path) as slide:
        tissue = hexfast.detect_tissue(slide, params)
    assert tissue.mask.size <= 10_000 * 1.05
