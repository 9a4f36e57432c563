"""Slide access: OpenSlide (from the openslide-bin wheel) behind a small API
that knows the slide's physical resolution and HEX's tile size for it.

A slide is a file, or, for DICOM WSI, the folder holding one series' .dcm files
(one file per pyramid level, label, overview...; OpenSlide reads the whole
series from any of them). `slide_source` turns a .dcm file into its folder, so
a series is one slide wherever it is named, and `slide_name` gives the name its
outputs carry: the file's stem, or the series folder's name."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from ..errors import SlideError

# The reference buckets magnification by MPP (half-open intervals) with a fixed
# level-0 tile per bucket; all three are 56 µm on the glass at the nominal MPP.
# Outside the buckets the reference silently falls back to 40x (224 px); we use
# the same 56 µm instead and warn (see TileSpec.in_reference_bucket).
TILE_UM = 56.0
MPP_BUCKETS = (  # (low, high, magnification, tile px at level 0)
    (0.05, 0.2, 80, 448),
    (0.2, 0.3, 40, 224),
    (0.4, 0.6, 20, 112),
)
# Anything outside this is not a microscope scan (e.g. 72 dpi TIFF defaults).
MPP_PLAUSIBLE = (0.05, 4.0)

MPP_HINT = "pass the scan resolution with --mpp (µm per level-0 pixel, e.g. --mpp 0.25 for 40x)"


@dataclass(frozen=True)
class TileSpec:
    """HEX's tile for a given resolution."""

    size: int  # level-0 px
    magnification: float  # nominal objective, from the MPP bucket
    in_reference_bucket: bool  # False: outside the reference's buckets, 56 µm tiles used


def tile_spec_for_mpp(mpp: float) -> TileSpec:
    for low, high, mag, px in MPP_BUCKETS:
        if low <= mpp < high:
            return TileSpec(px, float(mag), True)
    return TileSpec(max(1, round(TILE_UM / mpp)), round(10.0 / mpp, 1), False)


def check_mpp(path, mpp: float, source: str) -> float:
    low, high = MPP_PLAUSIBLE
    if not (math.isfinite(mpp) and low <= mpp <= high):
        raise SlideError(
            path,
            f"MPP {mpp:g} µm/px ({source}) is not a plausible scan resolution "
            f"(expected {low:g}–{high:g}); {MPP_HINT}",
        )
    return mpp


def _mpp_from_properties(props) -> tuple[float, str] | None:
    """MPP from OpenSlide's standard property, then vendor keys, then TIFF resolution."""
    for key in ("openslide.mpp-x", "aperio.MPP", "hamamatsu.XResolution"):
        try:
            value = float(props[key])
        except (KeyError, ValueError):
            continue
        if value > 0:
            return value, key
    unit = props.get("tiff.ResolutionUnit")
    try:
        res = float(props["tiff.XResolution"])
    except (KeyError, ValueError):
        return None
    per_unit_um = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    if per_unit_um and res > 0:
        return per_unit_um / res, "tiff.XResolution"
    return None


DICOM_SUFFIX = ".dcm"
# What OpenSlide reads, by suffix (a DICOM series is its folder; MIRAX is the .mrxs beside its data folder).
SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}


def dicom_files(folder: Path) -> list[Path]:
    """The .dcm files directly in `folder` (one DICOM WSI series), sorted."""
    try:
        return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() == DICOM_SUFFIX and p.is_file())
    except OSError:
        return []


def slide_source(path: str | os.PathLike) -> Path:
    """What names a slide: a .dcm file stands for its series' folder; anything else for itself."""
    path = Path(path)
    return path.parent if path.suffix.lower() == DICOM_SUFFIX and path.is_file() else path


def slide_name(path: str | os.PathLike) -> str:
    """The name a slide's outputs carry (OUT/<name>/): a file's stem, a DICOM series folder's name."""
    path = slide_source(path)
    return path.name if path.is_dir() else path.stem


class Slide:
    """An open whole-slide image. Use `open_slide(path, mpp=None)`."""

    def __init__(self, path: str | os.PathLike, mpp: float | None = None):
        self.path = slide_source(path)
        self.name = slide_name(self.path)
        self.file, self._osr = _open(self.path)  # the file OpenSlide opened (a DICOM series: one of its files)
        props = self._osr.properties
        self.vendor = props.get("openslide.vendor", "unknown")
        self.dimensions: tuple[int, int] = self._osr.dimensions
        self.level_dimensions: tuple[tuple[int, int], ...] = self._osr.level_dimensions
        self.level_downsamples: tuple[float, ...] = self._osr.level_downsamples
        power = props.get("openslide.objective-power")
        self.objective_power: float | None = float(power) if power else None
        bg = props.get("openslide.background-color", "FFFFFF")
        self.background = tuple(int(bg[i : i + 2], 16) for i in (0, 2, 4))

        if mpp is not None:
            self.mpp, self.mpp_source = check_mpp(self.path, float(mpp), "from --mpp"), "--mpp"
        else:
            found = _mpp_from_properties(props)
            if found is None:
                raise SlideError(self.path, f"slide has no resolution (MPP) metadata; {MPP_HINT}")
            self.mpp = check_mpp(self.path, found[0], f"from {found[1]}")
            self.mpp_source = found[1]
        self.tile = tile_spec_for_mpp(self.mpp)

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def properties(self):
        return self._osr.properties

    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3); transparent areas (outside the scan) take the slide's background colour."""
        return np.asarray(self._read_rgb(location, level, size))

    def read_rgba(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGBA uint8 (h, w, 4) as OpenSlide gives it: outside the scan transparent black (CLAM's input)."""
        try:
            return np.asarray(self._osr.read_region(location, level, size))
        except openslide.OpenSlideError as e:
            raise SlideError(self.path, f"cannot read pixels at level {level}, level-0 {location}: {e}") from e

    def deepzoom(self, tile_size: int = 256, overlap: int = 0):
        """OpenSlide's DeepZoomGenerator over the whole level 0 (limit_bounds off: deep-zoom coordinates
        are level-0 pixels scaled by a power of two), for `hexfast view`."""
        from openslide.deepzoom import DeepZoomGenerator

        return DeepZoomGenerator(self._osr, tile_size=tile_size, overlap=overlap, limit_bounds=False)

    def best_level_for_downsample(self, downsample: float) -> int:
        return self._osr.get_best_level_for_downsample(downsample)

    def _read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        try:
            rgba = self._osr.read_region(location, level, size)
        except openslide.OpenSlideError as e:
            raise SlideError(self.path, f"cannot read pixels at level {level}, level-0 {location}: {e}") from e
        if rgba.getchannel("A").getextrema()[0] < 255:  # some of it lies outside the scanned area
            bg = Image.new("RGBA", rgba.size, (*self.background, 255))
            bg.alpha_composite(rgba)
            rgba = bg
        return rgba.convert("RGB")

    def read_reduced(self, downsample: float, max_strip_bytes: int = 8 << 20) -> np.ndarray:
        """The whole slide at `downsample` (level-0 px per output px), box-filtered.

        Output pixel (i, j) covers level-0 [i*d, (i+1)*d) x [j*d, (j+1)*d). Reads
        the coarsest sufficient level in horizontal strips of at most
        `max_strip_bytes`, so memory is the output plus one strip even on
        single-level slides."""
        w0, h0 = self.dimensions
        out_w, out_h = math.ceil(w0 / downsample), math.ceil(h0 / downsample)
        level = self._osr.get_best_level_for_downsample(downsample)
        dl = self.level_downsamples[level]
        span_w = out_w * downsample / dl  # output width, in level pixels
        level_rows_per_out_row = downsample / dl
        rows = max(1, int(max_strip_bytes / (4 * span_w * level_rows_per_out_row)))
        out = np.empty((out_h, out_w, 3), np.uint8)
        for r0 in range(0, out_h, rows):
            r1 = min(out_h, r0 + rows)
            y0, y1 = r0 * level_rows_per_out_row, r1 * level_rows_per_out_row  # level px
            ly0, ly1 = math.floor(y0), math.ceil(y1)
            region = self._read_rgb((0, round(ly0 * dl)), level, (math.ceil(span_w), ly1 - ly0))
            strip = region.resize(
                (out_w, r1 - r0), Image.Resampling.BOX, box=(0, y0 - ly0, span_w, y1 - ly0)
            )
            out[r0:r1] = np.asarray(strip)
        return out


def _open(path: Path) -> tuple[Path, openslide.OpenSlide]:
    if not path.exists():
        raise SlideError(path, "no such file")
    if path.is_dir():
        series = dicom_files(path)
        if not series:
            raise SlideError(path, "is a directory, not a slide file (nor a DICOM WSI series: no .dcm files in it)")
        path = series[0]  # OpenSlide finds the series' other files beside it
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise SlideError(path, f"cannot read file: {e.strerror}") from e
    if openslide.OpenSlide.detect_format(str(path)) is None:
        raise SlideError(path, _truncated(path) or "not a slide format OpenSlide can read")
    try:
        osr = openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as e:
        cut = _tiff_problem(path)
        raise SlideError(path, cut if cut and cut.startswith("is truncated") else f"cannot open slide: {e}") from e
    problem = _tiff_problem(path)
    if problem:
        osr.close()
        raise SlideError(path, problem)
    return path, osr


# TIFF tag 262 (photometric interpretation); a brightfield scan is 8-bit RGB or YCbCr.
PHOTOMETRIC = {0: "grayscale", 1: "grayscale", 2: "RGB", 3: "palette", 5: "separated (CMYK)", 6: "YCbCr"}
BRIGHTFIELD_PHOTOMETRIC = (2, 6)


TIFF_MAGIC = {b"II*\0": 4, b"MM\0*": 4, b"II+\0": 8, b"MM\0+": 8}  # -> size of the first-directory offset


def _tiff_problem(path: Path) -> str | None:
    """Why a TIFF-based slide OpenSlide opened cannot be scored, from its tags, or None. Its image data
    must lie inside the file (a copy cut short opens, and fails tiles later); it must be 8-bit colour:
    OpenSlide renders a 5-channel uint16 fluorescence TIFF as nearly white RGB, which would pass for
    glass, so the file's own samples per pixel, bit depth and photometric say what it is. Other
    formats pass."""
    with open(path, "rb") as f:
        if f.read(4) not in TIFF_MAGIC:
            return None
    cut = _directory_past_end(path)
    if cut is not None:
        return cut
    try:
        import tifffile

        with _quiet("tifffile"), tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            samples, bits, photometric = int(page.samplesperpixel), int(page.bitspersample), int(page.photometric)
            end = max((int(o) + int(n) for p in tif.pages for o, n in zip(p.dataoffsets, p.databytecounts)),
                      default=0)
    except Exception:  # noqa: BLE001 - OpenSlide opened it; tifffile's view of odd TIFFs is no reason to refuse
        return None
    size = path.stat().st_size
    if end > size:
        return (f"is truncated: its image data runs to byte {end:,}, and the file ends at byte {size:,} "
                f"(a copy cut short?)")
    if samples in (3, 4) and bits == 8 and photometric in BRIGHTFIELD_PHOTOMETRIC:
        return None
    layout = (f"{samples} channel{'s' if samples != 1 else ''} of {bits}-bit samples "
              f"({PHOTOMETRIC.get(photometric, f'photometric {photometric}')})")
    return (f"holds {layout}: a fluorescence, multiplex or grayscale image, not an 8-bit colour (RGB) brightfield "
            f"H&E scan, which HEX needs")


def _truncated(path: Path) -> str | None:
    """For a file OpenSlide does not recognise: what is wrong with it, when it is empty or a TIFF."""
    if path.stat().st_size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        if f.read(4) not in TIFF_MAGIC:
            return None
    return _tiff_problem(path) or "a TIFF that OpenSlide does not read as a slide (damaged, or not a whole-slide image)"


def _directory_past_end(path: Path, most: int = 100_000) -> str | None:
    """Follows a TIFF's chain of image directories; says where the first one the file cannot hold lies."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
        order = "little" if head[:2] == b"II" else "big"
        big = TIFF_MAGIC[head[:4]] == 8
        if not big and size >= 1 << 32:  # NDPI: 32-bit offsets with their high bits kept elsewhere
            return None
        count_bytes, entry_bytes, offset_bytes = (8, 20, 8) if big else (2, 12, 4)
        offset = int.from_bytes(head[8:16] if big else head[4:8], order)
        for _ in range(most):
            if offset == 0:
                return None
            f.seek(offset)
            count = int.from_bytes(f.read(count_bytes), order)
            end = offset + count_bytes + count * entry_bytes + offset_bytes
            if end > size:
                return (f"is truncated: an image directory runs to byte {end:,}, past the end of the {size:,}-byte "
                        f"file (a copy cut short?)")
            f.seek(end - offset_bytes)
            offset = int.from_bytes(f.read(offset_bytes), order)
    return None


@contextlib.contextmanager
def _quiet(logger: str):
    """A library's log records kept off the terminal (its warnings about a damaged file are ours to word)."""
    log = logging.getLogger(logger)
    before = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = before


def open_slide(path: str | os.PathLike, mpp: float | None = None) -> Slide:
    """Open a slide; `mpp` (µm per level-0 pixel) overrides the slide's own metadata."""
    return Slide(path, mpp)
