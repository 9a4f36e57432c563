"""Slides → results: the Scorer pipeline (TileStream → HEX → virtual CODEX → CODEX encoder →
MICA → outputs), and the same over a Ray cluster. Prints nothing: callers get results, progress
callbacks and log records."""

from .pipeline import Cancelled, Scorer, SlideResult, open_engine

__all__ = ["Cancelled", "Scorer", "SlideResult", "open_engine"]
