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
    "Cancelled",
    "HexfastError",
    "OutputError",
    "Slide",
    "SlideError",
    "SlideResult",
    "Scorer",
    "TileGrid",
    "TissueParams",
    "detect_tissue",
    "open_slide",
    "tile_slide",
    "__version__",
]

_LAZY = {"Scorer": "pipeline", "SlideResult": "pipeline", "Cancelled": "pipeline"}


def __getattr__(name: str):
    """hexfast.Scorer and friends, imported on first use: `import hexfast` stays light
    (no engines, no onnxruntime) for the slide and tiling API."""
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
