"""hexfast: fast whole-slide inference for HEX and MICA.

The package is laid out as the data flows (imports point one way, down this list):

    cli/      the `hexfast` command                       bench/    benchmark internals
    watch/    beside a scanner: Watcher                    view/     the browser viewer
    score/    slides -> results: Scorer, Ray cohorts       outputs/  h5, GeoJSON, OME-TIFF, PNG, report
    engines/  ONNX Runtime, TensorRT, torch programs       stream/   tiles -> batches (C++ workers)
    slide/    slide -> tile grid (C++ tissue detection)    errors, markers, bundle, files: the base
"""

from ._core import __version__
from .errors import HexfastError, OutputError, SlideError
from .slide import Slide, TileGrid, TissueParams, detect_tissue, open_slide, tile_slide

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
    "Watcher",
    "detect_tissue",
    "open_slide",
    "tile_slide",
    "__version__",
]

_LAZY = {"Scorer", "SlideResult", "Cancelled", "Watcher"}


def __getattr__(name: str):
    """hexfast.Scorer and friends, imported on first use: `import hexfast` stays light
    (no engines, no onnxruntime) for the slide and tiling API."""
    if name == "Watcher":
        from .watch import Watcher as value

        globals()[name] = value
        return value
    if name in _LAZY:
        from .score import pipeline

        value = getattr(pipeline, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
