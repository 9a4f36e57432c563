"""hexfast's C++ core (csrc/, pybind11): tissue detection, tile grid, stain normalisation, TileStream.

Type stub for editors and type checkers; tests/test_layout.py checks it names exactly what the
extension defines. Arrays in are uint8 RGB (H, W, 3) or masks (H, W) unless said otherwise; arrays
out are numpy arrays that own their C++ buffers.
"""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__version__: str  # pyproject.toml's version, compiled in by CMake
HAVE_JPEG: bool  # built with libjpeg: the TileStream decodes JPEG-tiled slides itself

# -- tissue detection and the tile grid (bindings.cpp) ------------------------------------------

def segment_tissue(
    rgb: npt.ArrayLike,
    mpp: float,
    threshold: int = -1,
    min_threshold: int = 8,
    max_threshold: int = 20,
    median_um: float = 30.0,
    close_um: float = 60.0,
    min_tissue_um2: float = 40000.0,
    max_hole_um2: float = 20000.0,
    min_value: int = 30,
) -> tuple[npt.NDArray[np.uint8], int]: ...
def tile_grid(
    mask: npt.ArrayLike,
    scale_x: float,
    scale_y: float,
    width: int,
    height: int,
    tile: int,
    stride: int,
    min_tissue: float,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...
def hsv_saturation(rgb: npt.ArrayLike) -> npt.NDArray[np.uint8]: ...
def median_blur(img: npt.ArrayLike, ksize: int) -> npt.NDArray[np.uint8]: ...
def otsu_threshold(img: npt.ArrayLike) -> int: ...
def morph_close(mask: npt.ArrayLike, ksize: int) -> npt.NDArray[np.uint8]: ...
def fill_holes(mask: npt.ArrayLike, max_area: int) -> npt.NDArray[np.uint8]: ...
def remove_small_components(mask: npt.ArrayLike, min_area: int) -> npt.NDArray[np.uint8]: ...
def odd_kernel(um: float, mpp: float) -> int: ...

# -- stain normalisation (stain_bindings.cpp); images are (..., 3) uint8 ------------------------

def macenko_estimate(
    rgb: npt.NDArray[np.uint8], io: float = 240.0, alpha: float = 1.0, beta: float = 0.15
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def macenko_apply(
    rgb: npt.NDArray[np.uint8],
    he_source: npt.ArrayLike,
    max_c_source: npt.ArrayLike,
    he_target: npt.ArrayLike | None = None,
    max_c_target: npt.ArrayLike | None = None,
    io: float = 240.0,
) -> npt.NDArray[np.uint8]: ...
def macenko_reference() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def reinhard_stats(rgb: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def reinhard_apply(
    rgb: npt.NDArray[np.uint8],
    mean_src: npt.ArrayLike,
    std_src: npt.ArrayLike,
    mean_tgt: npt.ArrayLike | None = None,
    std_tgt: npt.ArrayLike | None = None,
) -> npt.NDArray[np.uint8]: ...
def reinhard_reference() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...

# -- streaming (stream_bindings.cpp) ------------------------------------------------------------

class TileStream:
    """Worker threads reading `coords` into a ring of batches; see hexfast.stream.TileStream."""

    def __init__(
        self,
        slide_path: str,
        library_path: str,
        coords: npt.ArrayLike,
        read_size: int,
        out_size: int,
        batch_size: int,
        threads: int,
        prefetch: int,
        skip_errors: bool,
        cache_bytes: int,
        reader: str = "auto",
        stain_norm: str = "none",
        stain_source: Sequence[npt.ArrayLike] | None = None,
        stain_target: Sequence[npt.ArrayLike] | None = None,
        stain_io: float = 240.0,
    ) -> None: ...
    def next(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]] | None: ...
    def close(self) -> None: ...
    def __len__(self) -> int: ...
    @property
    def batches(self) -> int: ...
    @property
    def reader(self) -> str: ...
    @property
    def decoded_tiles(self) -> int: ...
    @property
    def skipped(self) -> list[tuple[int, int, int, str]]: ...
