"""The watcher's journal: every slide it has seen and what became of it, in SQLite (OUT/.hexfast-watch.sqlite).

A slide is a (path, size, mtime) -- the same path with other bytes (a slide scanned again under the same
name) is another slide. States: queued -> running -> done | failed. On open, `running` rows (a watcher
killed mid-slide) go back to queued and are redone from scratch; `failed` rows stay failed (quarantined,
with their reason) unless the watcher is started with --retry-failed. Each row has the output name it
will write, OUT/<name>/: the slide's stem, or stem-2, stem-3... when an earlier slide already has it,
so two slides of the same name never overwrite each other's outputs.

Written with one connection behind a lock (the inbox scanner and the scoring loop are two threads);
WAL mode and synchronous=FULL, so a row that says done was on disk before the next slide started.

A file that is not one (garbage, a truncated copy, another program's database) is refused in one line
naming it; an empty one (0 bytes) opens as an empty journal, and the watcher then reports the output
folders it does not know instead of scoring their slides again.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import HexfastError

JOURNAL = ".hexfast-watch.sqlite"
FULL_BELOW = 1 << 20  # bytes free under which a failed write is a full disk
SCHEMA = """
CREATE TABLE IF NOT EXISTS slides (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    reason TEXT,
    tiles INTEGER,
    tiles_per_s REAL,
    seconds REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    queued_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    UNIQUE (source, size, mtime_ns)
);
CREATE INDEX IF NOT EXISTS slides_state ON slides (state, id);
"""


@dataclass(frozen=True)
class Entry:
    id: int
    source: str
    size: int
    mtime_ns: int
    name: str
    state: str
    reason: str | None
    tiles: int | None
    tiles_per_s: float | None
    seconds: float | None
    attempts: int
    queued_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def path(self) -> Path:
        return Path(self.source)


class Journal:
    def __init__(self, out: Path, *, retry_failed: bool = False, taken_names=(), read_only: bool = False):
        """taken_names: output folders already in OUT, never given to a new slide; read_only: for a status
        (nothing is requeued under a live watcher)."""
        self.path = Path(out) / JOURNAL
        self._lock = threading.Lock()
        self._taken = set(taken_names)
        self.requeued: list[Entry] = []
        self.retried: list[Entry] = []
        existed = self.path.exists()
        self.was_empty = not read_only and existed and self.path.stat().st_size == 0
        try:
            self._open(read_only, retry_failed)
        except sqlite3.DatabaseError as e:
            with contextlib.suppress(Exception):
                self._db.close()
            if not existed:  # e.g. a full disk: leave no empty journal behind
                for leftover in ("", "-wal", "-shm"):
                    Path(f"{self.path}{leftover}").unlink(missing_ok=True)
            raise _journal_error(self.path, e) from None

    def _open(self, read_only: bool, retry_failed: bool) -> None:
        target = f"file:{self.path}?mode=ro" if read_only else str(self.path)
        self._db = sqlite3.connect(target, uri=read_only, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        if self._db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("database disk image is malformed")
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "slides" not in tables:  # another program's database: never add our table to it
            raise sqlite3.DatabaseError(f"a database with other tables ({', '.join(sorted(tables)[:3])})")
        if not read_only:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(slides)")}
        if columns != {f.name for f in fields(Entry)}:
            raise sqlite3.DatabaseError("no table of slides as hexfast writes it")
        if read_only:
            return
        with self._lock:
            self.requeued = [Entry(**r) for r in self._db.execute("SELECT * FROM slides WHERE state = 'running'")]
            self._db.execute("UPDATE slides SET state = 'queued', started_at = NULL WHERE state = 'running'")
            if retry_failed:
                self.retried = [Entry(**r) for r in self._db.execute("SELECT * FROM slides WHERE state = 'failed'")]
                self._db.execute("UPDATE slides SET state = 'queued', reason = NULL WHERE state = 'failed'")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def known(self, source: str, size: int, mtime_ns: int) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM slides WHERE source = ? AND size = ? AND mtime_ns = ?",
                                    (source, size, mtime_ns)).fetchone() is not None

    def names(self) -> set[str]:
        """Every output name the journal has given out."""
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT name FROM slides")}

    def add(self, source: str, size: int, mtime_ns: int, stem: str, state: str = "queued",
            reason: str | None = None, name: str | None = None, tiles: int | None = None) -> Entry | None:
        """A newly settled slide (None if it was already there), with a free output name (or `name`: the
        folder already holding its outputs, state done)."""
        with self._lock:
            if name is None:
                used = {r[0] for r in self._db.execute("SELECT name FROM slides")} | self._taken
                name, n = stem, 1
                while name in used:
                    n += 1
                    name = f"{stem}-{n}"
            now = time.time()
            try:
                cur = self._db.execute(
                    "INSERT INTO slides (source, size, mtime_ns, name, state, reason, tiles, queued_at, finished_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (source, size, mtime_ns, name, state, reason, tiles, now, now if state != "queued" else None))
            except sqlite3.IntegrityError:
                return None
            return self._get(cur.lastrowid)

    def next_queued(self) -> Entry | None:
        """The oldest queued slide, marked running (arrival order)."""
        with self._lock:
            row = self._db.execute("SELECT * FROM slides WHERE state = 'queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE slides SET state = 'running', started_at = ?, attempts = attempts + 1 "
                             "WHERE id = ?", (time.time(), row["id"]))
            return self._get(row["id"])

    def finish(self, entry_id: int, *, tiles: int, tiles_per_s: float, seconds: float) -> Entry:
        with self._lock:
            self._db.execute("UPDATE slides SET state = 'done', reason = NULL, tiles = ?, tiles_per_s = ?, seconds = ?, "
                             "finished_at = ? WHERE id = ?", (tiles, tiles_per_s, seconds, time.time(), entry_id))
            return self._get(entry_id)

    def fail(self, entry_id: int, reason: str) -> Entry:
        with self._lock:
            self._db.execute("UPDATE slides SET state = 'failed', reason = ?, finished_at = ? WHERE id = ?",
                             (reason, time.time(), entry_id))
            return self._get(entry_id)

    def requeue(self, entry_id: int) -> None:
        """A slide whose scoring was stopped (a clean stop): queued again, to be redone from scratch."""
        with self._lock:
            self._db.execute("UPDATE slides SET state = 'queued', started_at = NULL WHERE id = ?", (entry_id,))

    def entries(self, state: str | None = None, limit: int | None = None, newest_first: bool = False) -> list[Entry]:
        query = "SELECT * FROM slides" + (" WHERE state = ?" if state else "")
        query += " ORDER BY " + ("COALESCE(finished_at, queued_at) DESC, id DESC" if newest_first else "id")
        if limit:
            query += f" LIMIT {int(limit)}"
        with self._lock:
            return [Entry(**r) for r in self._db.execute(query, (state,) if state else ())]

    def counts(self) -> dict[str, int]:
        with self._lock:
            out = dict.fromkeys(("queued", "running", "done", "failed"), 0)
            out.update({r[0]: r[1] for r in self._db.execute("SELECT state, COUNT(*) FROM slides GROUP BY state")})
            return out

    def _get(self, entry_id: int) -> Entry:
        return Entry(**self._db.execute("SELECT * FROM slides WHERE id = ?", (entry_id,)).fetchone())


def _journal_error(path: Path, e: sqlite3.DatabaseError) -> HexfastError:
    """One line for a journal that cannot be used: a full disk, or a file that is not a journal."""
    text = str(e)
    if isinstance(e, sqlite3.OperationalError) and ("disk is full" in text or "disk I/O error" in text):
        with contextlib.suppress(OSError):  # SQLite says "disk I/O error" when its WAL index finds no room
            if shutil.disk_usage(path.parent).free < FULL_BELOW:
                return HexfastError(f"{path}: cannot write the watch journal: No space left on device")
    if isinstance(e, sqlite3.OperationalError) and "not a database" not in text and "malformed" not in text:
        return HexfastError(f"{path}: cannot open the watch journal: {text}")
    return HexfastError(f"{path}: not a hexfast journal ({text}); move it aside to start a new one, and the "
                        f"watcher will report the output folders it does not know")
