"""The C++ core against independent implementations: OpenCV (what CLAM uses),
brute-force searches, and exact area sums."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

import hexfast
from hexfast import _core

RNG = np.random.default_rng(42)


def random_rgb(h=53, w=71):
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_saturation_matches_opencv():
    rgb = random_rgb()
    rgb[0, :3] = 0  # black: V = 0
    want = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    np.testing.assert_array_equal(_core.hsv_saturation(rgb), want)


@pytest.mark.parametrize("k", [1, 3, 5, 7, 15])
def test_median_blur_matches_opencv(k):
    img = random_rgb()[..., 0].copy()
    np.testing.assert_array_equal(_core.median_blur(img, k), cv2.medianBlur(img, k))


def test_median_blur_rejects_even_kernel():
    with pytest.raises(ValueError):
        _core.median_blur(np.zeros((5, 5), np.uint8), 4)


def brute_force_otsu(img: np.ndarray) -> int:
    values = img.ravel().astype(np.float64)
    best, best_t = -1.0, 0
    for t in range(256):
        lo, hi = values[values <= t], values[values > t]
        if len(lo) == 0 or len(hi) == 0:
            continue
        between = len(lo) * len(hi) * (lo.mean() - hi.mean()) ** 2
        if between > best:
            best, best_t = between, t
    return best_t


@pytest.mark.parametrize("seed", range(5))
def test_otsu_matches_brute_force_and_opencv(seed):
    rng = np.random.default_rng(seed)
    img = np.concatenate([rng.normal(30, 8, 700), rng.normal(120, 20, 300)]).clip(0, 255).astype(np.uint8)
    img = img.reshape(20, 50)
    t = _core.otsu_threshold(img)
    assert t == brute_force_otsu(img)
    opencv_t, _ = cv2.threshold(img, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    assert t == int(opencv_t)


@pytest.mark.parametrize("k", [3, 5, 9])
def test_morph_close_matches_opencv(k):
    mask = (RNG.random((40, 60)) < 0.3).astype(np.uint8)
    want = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((k, k), np.uint8))
    np.testing.assert_array_equal(_core.morph_close(mask, k), want)


def test_components_match_opencv():
    mask = (cv2.GaussianBlur(RNG.random((120, 160)).astype(np.float32), (0, 0), 2.5) > 0.5).astype(np.uint8)
    # Small components (8-connected) removed.
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    want = mask.copy()
    for i in range(1, n):
        if stats[i, cv2.CC_STAT_AREA] < 30:
            want[labels == i] = 0
    np.testing.assert_array_equal(_core.remove_small_components(mask, 30), want)
    # Holes (4-connected background not touching the border) below the size filled.
    n, labels, stats, _ = cv2.connectedComponentsWithStats(1 - mask, connectivity=4)
    want = mask.copy()
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
    for i in range(1, n):
        if i not in border and stats[i, cv2.CC_STAT_AREA] < 25:
            want[labels == i] = 1
    assert (want != mask).any(), "the random mask should have small holes to fill"
    np.testing.assert_array_equal(_core.fill_holes(mask, 25), want)


def brute_force_fractions(mask, scale, width, height, tile, stride):
    """Upsample the mask by an integer scale and count tissue pixels under each tile."""
    full = np.kron(mask, np.ones((scale, scale), np.uint8))[:height, :width]
    out = {}
    for y in range(0, height, stride):
        for x in range(0, width, stride):
            out[(x, y)] = full[y : y + tile, x : x + tile].sum() / tile**2
    return out


@pytest.mark.parametrize("stride", [16, 9, 40])
def test_tile_grid_matches_brute_force(stride):
    mask = (RNG.random((30, 25)) < 0.6).astype(np.uint8)
    scale, width, height, tile = 4, 97, 113, 16  # the slide ends inside the last mask pixel
    fractions = brute_force_fractions(mask, scale, width, height, tile, stride)
    coords, frac = _core.tile_grid(mask, scale, scale, width, height, tile, stride, 0.0)
    assert [tuple(c) for c in coords] == list(fractions)  # all tiles, row-major
    np.testing.assert_allclose(frac, list(fractions.values()), atol=1e-6)
    coords, frac = _core.tile_grid(mask, scale, scale, width, height, tile, stride, 0.5)
    assert [tuple(c) for c in coords] == [k for k, v in fractions.items() if v >= 0.5 - 1e-9]


def test_tile_grid_fractional_scale_is_exact_area():
    # Mask pixels of 2.5 level-0 px: a tile [0,5)x[0,5) covers exactly 2x2 mask pixels.
    mask = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 0]], np.uint8)
    coords, frac = _core.tile_grid(mask, 2.5, 2.5, 7, 7, 5, 5, 0.0)
    assert coords.tolist() == [[0, 0], [5, 0], [0, 5], [5, 5]]
    # Tile (5, 0) covers mask x in [2, 4), of which only [2, 2.8) is inside the
    # 7-px slide, and y in [0, 2): tissue 0.8 * (1 + 0) of a 4-mask-px tile.
    np.testing.assert_allclose(frac, [3 / 4, 0.8 / 4, 0.8 / 4, 0], atol=1e-6)


def test_results_are_numpy_without_copy():
    mask, _ = _core.segment_tissue(random_rgb(), 4.0)
    assert mask.dtype == np.uint8 and mask.flags.c_contiguous
    assert not mask.flags.owndata and mask.base is not None  # owned by the C++ buffer
    coords, _ = _core.tile_grid(np.ones((4, 4), np.uint8), 1, 1, 4, 4, 2, 2, 0.5)
    assert coords.dtype == np.int64 and coords.shape == (4, 2) and not coords.flags.owndata


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        _core.segment_tissue(np.zeros((4, 4), np.uint8), 4.0)  # not RGB
    with pytest.raises(ValueError):
        _core.tile_grid(np.ones((4, 4), np.uint8), 1, 1, 4, 4, 0, 2, 0.5)  # tile 0


def clam_reference_mask(rgb, mpp, params: hexfast.TissueParams) -> np.ndarray:
    """CLAM's segmentation written with OpenCV: HSV saturation (0 where the HSV value is below
    hexfast's dark floor), median blur, threshold, close, then contours with holes filtered by area."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = np.where(hsv[..., 2] < params.min_value, 0, hsv[..., 1]).astype(np.uint8)
    sat = cv2.medianBlur(sat, _core.odd_kernel(params.median_um, mpp))
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = int(np.clip(otsu, params.min_threshold, params.max_threshold))
    _, binary = cv2.threshold(sat, threshold, 1, cv2.THRESH_BINARY)
    k = _core.odd_kernel(params.close_um, mpp)
    binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, np.ones((k, k), np.uint8))
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    px_area = mpp * mpp
    out = np.zeros_like(binary)
    if hierarchy is None:
        return out
    for i, contour in enumerate(contours):
        if hierarchy[0][i][3] != -1:
            continue  # a hole; handled with its parent
        holes = [contours[j] for j in range(len(contours)) if hierarchy[0][j][3] == i]
        kept = [h for h in holes if cv2.contourArea(h) * px_area >= params.max_hole_um2]
        area = cv2.contourArea(contour) - sum(cv2.contourArea(h) for h in kept)
        if area * px_area >= params.min_tissue_um2:
            cv2.drawContours(out, [contour], -1, 1, thickness=cv2.FILLED)
            cv2.drawContours(out, kept, -1, 0, thickness=cv2.FILLED)
    return out


def test_tissue_mask_matches_opencv_clam_on_real_slide(cmu_small):
    params = hexfast.TissueParams()
    with hexfast.open_slide(cmu_small) as slide:
        tissue = hexfast.detect_tissue(slide, params)
    want = clam_reference_mask(tissue.thumbnail, tissue.mpp, params)
    got = tissue.mask.astype(bool)
    iou = (got & (want > 0)).sum() / (got | (want > 0)).sum()
    assert iou >= 0.9, f"IoU {iou:.3f} against the OpenCV CLAM-style mask"
    assert 0.2 < got.mean() < 0.8  # a real mix of tissue and glass
