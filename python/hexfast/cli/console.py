"""What the `hexfast` command shows a person: one-line errors and warnings on stderr, the demo
banner, per-slide lines and the summary table, and the exit codes. Every command prints through
here, so every message looks the same."""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import HexfastError

EXIT_ERROR = 2  # bad input, or any slide failed
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM

DEMO_BANNER = ("DEMO MODEL: untrained random weights. The markers and risk it writes are NOT predictions; "
               "pass --model BUNDLE with real HEX weights (hexfast export).")


def line(text: str) -> None:
    """Progress for a person (a slide done): stderr, so stdout keeps only results."""
    _write(text)


def note(message: str) -> None:
    _write(f"hexfast: {message}")


def warn(message: str) -> None:
    _write(f"hexfast: WARNING: {message}")


def error(e: BaseException | str) -> None:
    """A failure, one line: hexfast's own errors as they are, anything else (a bug, not bad input)
    with its type and the hint that --debug shows the traceback."""
    if isinstance(e, (HexfastError, str)):
        _write(f"hexfast: error: {e}")
    else:
        _write(f"hexfast: internal error: {type(e).__name__}: {e} (rerun with --debug)")


def warn_demo() -> None:
    bar = "!" * 100
    _write(f"{bar}\nhexfast: WARNING: {DEMO_BANNER}\n{bar}")


def warn_no_tissue(path: Path, where: Path) -> None:
    warn(f"{path}: NO TISSUE FOUND: no tiles were scored; wrote empty outputs (empty h5, blank virtual CODEX, "
         f"no MICA risk) to {where}; check overview.png")


def _write(text: str) -> None:
    """To stderr, above any progress bar (tqdm.write clears and redraws them)."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


@contextlib.contextmanager
def log_records_shown():
    """While a command runs, warnings logged by hexfast's modules (engine fallbacks, Ray retries)
    appear as hexfast's own: `hexfast: WARNING: ...`."""
    logger = logging.getLogger("hexfast")
    handler = _WarningHandler(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


class _WarningHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            warn(record.getMessage())
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


@dataclass(frozen=True)
class Row:
    """One slide in the summary table."""

    slide: str
    status: str  # ok, NO TISSUE, done before, FAILED
    tiles: str = "-"
    tiles_per_s: str = "-"
    seconds: str = "-"
    detail: str = ""  # the output directory, or the problem


class Summary:
    """The table that ends a run: a row per slide, then `N of M slides ok, K FAILED`."""

    HEADER = Row("slide", "status", "tiles", "tiles/s", "seconds", "output / problem")

    def __init__(self):
        self.rows: list[Row] = []

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def failed(self, slide: str, problem: str) -> None:
        self.add(Row(slide, "FAILED", detail=problem))

    @property
    def failures(self) -> int:
        return sum(r.status == "FAILED" for r in self.rows)

    def print(self) -> None:
        if not self.rows:
            return
        table = [self.HEADER, *self.rows]
        cells = [(r.slide, r.status, r.tiles, r.tiles_per_s, r.seconds) for r in table]
        widths = [max(len(c[i]) for c in cells) for i in range(5)]
        for row, c in zip(table, cells):
            print("  ".join(v.ljust(w) for v, w in zip(c, widths)) + "  " + row.detail)
        bad = self.failures
        print(f"{len(self.rows) - bad} of {len(self.rows)} slides ok" + (f", {bad} FAILED" if bad else ""))
