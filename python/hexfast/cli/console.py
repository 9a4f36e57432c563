"""What the `hexfast` command shows a person: one-line errors and warnings on stderr, the demo
banner, per-slide lines and the summary table, and the exit codes. Every command prints through
here, so every message looks the same."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import HexfastError

EXIT_ERROR = 2  # bad input, or any slide failed
EXIT_INTERRUPTED = 130  # Ctrl-C; SIGTERM and SIGHUP exit 128 + their number (143, 129)

DEMO_BANNER = ("DEMO MODEL: untrained random weights. The markers and risk it writes are NOT predictions; "
               "pass --model BUNDLE with real HEX weights (hexfast export).")


# C0 and C1 controls, DEL, and the bidirectional overrides that reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text) -> str:
    """`text` with every control character written as an escape (a newline as \\n, ESC as \\x1b):
    a file name can neither split a one-line message nor drive the terminal."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def out(text: str) -> None:
    """A result line on stdout (what scripts read), escaped like every message."""
    print(printable(text))


_quiet = False


def set_quiet(quiet: bool) -> None:
    """--quiet: lines and notes are not shown; warnings and errors always are."""
    global _quiet
    _quiet = bool(quiet)


def line(text: str) -> None:
    """Progress for a person (a slide done): stderr, so stdout keeps only results."""
    if not _quiet:
        _write(text)


def note(message: str) -> None:
    if not _quiet:
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
    for text in (bar, f"hexfast: WARNING: {DEMO_BANNER}", bar):
        _write(text)


def warn_no_tissue(path: Path, where: Path) -> None:
    warn(f"{path}: NO TISSUE FOUND: no tiles were scored; wrote empty outputs (empty h5, blank virtual CODEX, "
         f"no MICA risk) to {where}; check overview.png")


def _write(text: str) -> None:
    """One line to stderr, above any progress bar (tqdm.write clears and redraws them)."""
    from tqdm import tqdm

    tqdm.write(printable(text), file=sys.stderr)


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

    def print(self, file=None) -> None:
        file = file or sys.stdout
        if not self.rows:
            return
        table = [self.HEADER, *self.rows]
        cells = [(r.slide, r.status, r.tiles, r.tiles_per_s, r.seconds) for r in table]
        cells = [tuple(printable(v) for v in c) for c in cells]
        widths = [max(len(c[i]) for c in cells) for i in range(5)]
        for row, c in zip(table, cells):
            print("  ".join(v.ljust(w) for v, w in zip(c, widths)) + "  " + printable(row.detail), file=file)
        bad = self.failures
        print(f"{len(self.rows) - bad} of {len(self.rows)} slides ok" + (f", {bad} FAILED" if bad else ""), file=file)
