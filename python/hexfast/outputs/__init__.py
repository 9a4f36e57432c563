"""Results → files: the per-slide outputs (h5, OME-TIFF, overview PNG, report.json) and the tiles
h5 with its check image. Each file has its own module; SlideWriter writes a slide's set."""

from .tiles import write_tiles_h5, write_tissue_png
from .writer import SlideOutputPaths, SlideWriter, output_paths, outputs_complete

__all__ = ["SlideOutputPaths", "SlideWriter", "output_paths", "outputs_complete", "write_tiles_h5",
           "write_tissue_png"]
