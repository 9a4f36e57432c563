"""Tiles → batches: the C++ TileStream's worker threads read, decode, stain-normalise and resize
tiles into a bounded ring of uint8 batches, without the GIL."""

from .stain import METHODS as STAIN_METHODS
from .tile_stream import TileStream, default_cache_mb, estimate_stain, openslide_library

__all__ = ["STAIN_METHODS", "TileStream", "default_cache_mb", "estimate_stain", "openslide_library"]
