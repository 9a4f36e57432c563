"""hexfast: fast whole-slide inference for HEX and MICA."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hexfast")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

from .errors import HexfastError, OutputError, SlideError
from .slide import Slide, open_slide
from .tiling import TileGrid, TissueParams, detect_tissue, tile_slide

__all__ = [
    "HexfastError",
    "OutputError",
    "Slide",
    "SlideError",
    "TileGrid",
    "TissueParams",
    "detect_tissue",
    "open_slide",
    "tile_slide",
    "__version__",
]
