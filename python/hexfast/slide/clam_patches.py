"""CLAM's patch coordinates: the grid the official MICA pipeline builds its H&E bags on.

MICA's README, step 3: "Use CLAM to preprocess WSIs and generate histology feature bags". A MICA
checkpoint trained that way saw the features of exactly CLAM's patches, so hexfast lays them out
exactly as `create_patches_fp.py --seg --patch` does with its defaults (mahmoodlab/CLAM,
create_patches_fp.py and wsi_core/WholeSlideImage.py, read, not copied; the tests run CLAM's own
scripts and compare):

segmentation (WholeSlideImage.segmentTissue), on one pyramid level:
  * level: the slide's only level, else OpenSlide's best level for downsample 64;
  * its RGBA pixels (outside the scan: transparent black) → OpenCV RGB2HSV saturation →
    median blur (7) → binary threshold (> 8 → 255) → morphological close (4x4 ones);
  * contours: cv2.findContours RETR_CCOMP, CHAIN_APPROX_NONE; a top-level contour is tissue when
    its area minus its holes' is nonzero and above a_t = 100 reference patches (ref 512 px at
    level 0, i.e. int(512² / (sx·sy)) level pixels each); its holes: the 8 largest, kept when
    above a_h = 16 reference patches;
  * contours and holes scaled to level 0 by the level's (width, height) downsample, truncated
    to int32;
patching (WholeSlideImage.process_contours, patch level 0, 256 px, step 256, 'four_pt',
padding on), contour by contour:
  * candidates: the contour's bounding box from its top-left in steps of 256, x-major
    (for each x, every y), the last ones reaching past the box (and the slide: padding);
  * kept when any of the four points centre ± 64 px lies inside or on the contour
    (cv2.pointPolygonTest >= 0) and the centre is strictly inside none of its holes;
  * coordinates: the patches' level-0 top-left corners, concatenated over contours in order
    (a patch near two contours is listed twice, as CLAM lists it).

Needs OpenCV (opencv-python-headless): these are its contour rules, and only the library itself
reproduces them exactly. Memory: the segmentation level's saturation plane, one byte a pixel (level
0 is read in strips; another level, typically ~1/64 of the slide's side, whole), and CLAM refuses
segmentation levels over 1e8 pixels, as this does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np

from ..errors import SlideError
from .slide import Slide

SEG_DOWNSAMPLE = 64  # create_patches_fp.py: seg_level -1 → get_best_level_for_downsample(64)
MAX_SEG_PIXELS = 1e8  # create_patches_fp.py skips a slide whose segmentation level is larger
STRIP_BYTES = 64 << 20  # RGBA read per strip of the segmentation level


@dataclass(frozen=True)
class ClamParams:
    """create_patches_fp.py's defaults (its __main__ seg/filter/patch parameters and CLI defaults)."""

    seg_level: int = -1  # -1: the best level for downsample 64
    sthresh: int = 8
    sthresh_up: int = 255
    mthresh: int = 7
    close: int = 4
    use_otsu: bool = False
    ref_patch_size: int = 512
    a_t: float = 100.0  # tissue area threshold, in reference patches
    a_h: float = 16.0  # hole area threshold, in reference patches
    max_n_holes: int = 8
    patch_size: int = 256
    step_size: int = 256
    patch_level: int = 0
    contour_fn: str = "four_pt"
    use_padding: bool = True

    @classmethod
    def from_manifest(cls, values: Mapping, where) -> ClamParams:
        """The bundle's `mica_features.patching`, checked: the names and types above, and only what
        hexfast implements (patch level 0, 'four_pt' contours, padding)."""
        from ..bundle import BundleError

        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known) - {"method"})
        if unknown:
            raise BundleError(where, f"mica_features.patching has unknown setting(s) {', '.join(unknown)}")
        given = {k: v for k, v in values.items() if k in known}
        for name, value in given.items():
            want = known[name].type
            ok = isinstance(value, bool) if want == "bool" else (
                isinstance(value, (int, float)) and not isinstance(value, bool) if want == "float" else
                isinstance(value, int) and not isinstance(value, bool) if want == "int" else isinstance(value, str))
            if not ok:
                raise BundleError(where, f"mica_features.patching.{name} must be a {want}, not {value!r}")
        params = cls(**given)
        if params.patch_level != 0 or params.contour_fn != "four_pt" or not params.use_padding:
            raise BundleError(where, "hexfast lays out CLAM patches at patch_level 0 with contour_fn 'four_pt' "
                                     "and use_padding true only")
        return params

    def as_manifest(self) -> dict:
        return {"method": "CLAM create_patches_fp.py --seg --patch", **asdict(self)}


@dataclass
class ClamPatches:
    """CLAM's patch grid of one slide: level-0 top-left corners and what its h5 records."""

    coords: np.ndarray  # (N, 2) int64
    patch_size: int  # level-0 px (patch level 0)
    seg_level: int
    contours: int  # tissue contours kept

    def __len__(self) -> int:
        return len(self.coords)

    def attrs(self, slide: Slide) -> dict:
        """The attributes CLAM's patching writes on `coords` (save_path aside), and TRIDENT's (patches are
        level-0 pixels at the slide's own magnification)."""
        w, h = slide.dimensions
        mag = slide.tile.magnification
        mag = int(mag) if float(mag).is_integer() else float(mag)
        return {"patch_size": self.patch_size, "patch_level": 0, "downsample": (1.0, 1.0),
                "downsampled_level_dim": (w, h), "level_dim": (w, h), "name": slide.name,
                "patch_size_level0": self.patch_size, "level0_magnification": mag, "target_magnification": mag,
                "overlap": 0, "level0_width": w, "level0_height": h,
                "seg_level": self.seg_level, "grid": "CLAM create_patches_fp.py, the bundle's patching"}


def clam_patches(slide: Slide, params: ClamParams = ClamParams()) -> ClamPatches:
    """The patches `create_patches_fp.py --seg --patch` finds on `slide` with `params`."""
    import cv2

    level = _seg_level(slide, params)
    scale = _level_downsample(slide, level)
    saturation = _saturation(slide, level)
    blurred = cv2.medianBlur(saturation, int(params.mthresh))
    if params.use_otsu:
        _, binary = cv2.threshold(blurred, 0, params.sthresh_up, cv2.THRESH_OTSU + cv2.THRESH_BINARY)
    else:
        _, binary = cv2.threshold(blurred, params.sthresh, params.sthresh_up, cv2.THRESH_BINARY)
    if params.close > 0:
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, np.ones((params.close, params.close), np.uint8))
    tissue, holes = _tissue_contours(binary, scale, params)
    coords = [_contour_patches(contour, contour_holes, params) for contour, contour_holes in zip(tissue, holes)]
    coords = [c for c in coords if len(c)]
    return ClamPatches(np.concatenate(coords) if coords else np.zeros((0, 2), np.int64),
                       params.patch_size, level, len(tissue))


def _seg_level(slide: Slide, params: ClamParams) -> int:
    if params.seg_level >= 0:
        if params.seg_level >= slide.level_count:
            raise SlideError(slide.path, f"has {slide.level_count} levels; CLAM's seg_level {params.seg_level} "
                                         "is not one of them")
        level = params.seg_level
    else:
        level = 0 if slide.level_count == 1 else slide.best_level_for_downsample(SEG_DOWNSAMPLE)
    w, h = slide.level_dimensions[level]
    if w * h > MAX_SEG_PIXELS:
        raise SlideError(slide.path, f"level {level} ({w} x {h}) is too large for CLAM's segmentation "
                                     f"(over {MAX_SEG_PIXELS:.0e} pixels; create_patches_fp.py skips such a slide)")
    return level


def _level_downsample(slide: Slide, level: int) -> tuple[float, float]:
    """CLAM's per-axis downsample: level 0's size over the level's (not OpenSlide's rounded figure)."""
    (w0, h0), (w, h) = slide.dimensions, slide.level_dimensions[level]
    return w0 / float(w), h0 / float(h)


def _saturation(slide: Slide, level: int) -> np.ndarray:
    """HSV saturation of the whole level, as cv2.cvtColor(RGBA, COLOR_RGB2HSV) gives it. Level 0 is
    read in strips; another level in one read from (0, 0), as CLAM reads it (a strip's level-0
    offset need not fall on a whole pixel of a level whose downsample is not an integer)."""
    import cv2

    w, h = slide.level_dimensions[level]
    if level != 0:
        return cv2.cvtColor(slide.read_rgba((0, 0), level, (w, h)), cv2.COLOR_RGB2HSV)[:, :, 1]
    out = np.empty((h, w), np.uint8)
    rows = max(1, STRIP_BYTES // (4 * max(w, 1)))
    for y in range(0, h, rows):
        n = min(rows, h - y)
        out[y:y + n] = cv2.cvtColor(slide.read_rgba((0, y), 0, (w, n)), cv2.COLOR_RGB2HSV)[:, :, 1]
    return out


def _tissue_contours(binary: np.ndarray, scale: tuple[float, float], params: ClamParams):
    """Tissue contours and their holes (segmentTissue's area filter), scaled to level 0."""
    import cv2

    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:  # nothing above the threshold
        return [], []
    parent = hierarchy[0][:, 3]
    ref_area = int(params.ref_patch_size ** 2 / (scale[0] * scale[1]))
    # CLAM's thresholds are float32 (its process list's dtype), compared with float64 areas.
    min_tissue = np.float32(params.a_t) * ref_area
    min_hole = np.float32(params.a_h) * ref_area
    tissue, holes = [], []
    for i in np.flatnonzero(parent == -1):
        hole_ids = np.flatnonzero(parent == i)
        area = cv2.contourArea(contours[i]) - np.array([cv2.contourArea(contours[j]) for j in hole_ids]).sum()
        if area == 0 or not min_tissue < area:
            continue
        largest = sorted((contours[j] for j in hole_ids), key=cv2.contourArea, reverse=True)[:params.max_n_holes]
        tissue.append(contours[i])
        holes.append([hole for hole in largest if cv2.contourArea(hole) > min_hole])
    to_level0 = np.array(scale)
    return ([np.array(c * to_level0, dtype=np.int32) for c in tissue],
            [[np.array(hole * to_level0, dtype=np.int32) for hole in hs] for hs in holes])


def _contour_patches(contour: np.ndarray, holes: list[np.ndarray], params: ClamParams) -> np.ndarray:
    """process_contour with contour_fn 'four_pt' and padding: the contour's patches, x-major."""
    import cv2

    x0, y0, w, h = cv2.boundingRect(contour)
    size, step = params.patch_size, params.step_size
    half, shift = size // 2, int(size // 2 * 0.5)  # isInContourV3_Easy(center_shift=0.5)
    corners = ((-shift, -shift), (shift, shift), (shift, -shift), (-shift, shift))
    kept = []
    for x in range(x0, x0 + w, step):
        for y in range(y0, y0 + h, step):
            cx, cy = x + half, y + half
            if not any(cv2.pointPolygonTest(contour, (float(cx + dx), float(cy + dy)), False) >= 0
                       for dx, dy in corners):
                continue
            centre = (x + size / 2, y + size / 2)
            if any(cv2.pointPolygonTest(hole, centre, False) > 0 for hole in holes):
                continue
            kept.append((x, y))
    return np.array(kept, np.int64).reshape(-1, 2)
