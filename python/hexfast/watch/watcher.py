"""hexfast beside the scanner: score slides as they land in a folder, for months, without a restart.

    watcher = Watcher("/scans/inbox", "/scans/hexfast", Scorer("models/hex"), settle=30)
    watcher.run()            # until watcher.stop() (another thread), SIGTERM or Ctrl-C
    watcher.status()         # counts, the slide being scored, the queue, the last results

Two threads: an inbox scanner (every `poll` seconds: what settled, see inbox.py, is opened once and
journaled as queued, or as failed when it does not open) and the scoring loop (Scorer.score_queue:
engines loaded once, slides in arrival order, the next one opened, tiled and streaming while one is
scored). Everything that happens goes to the journal (journal.py: what restarts trust) and, as one
JSON line per event, to OUT/watch-events.jsonl (queued, started, done, failed, requeued, stopped).

A stop (stop(), SIGTERM, SIGINT) aborts the slide being scored (its outputs are written under
temporary names, so nothing half-written is left), puts it back in the queue and returns; a kill -9
leaves it `running` in the journal, which the next start puts back in the queue the same way. One
watcher per output folder: OUT/.hexfast.lock says who holds it.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import HexfastError
from ..files import DirectoryLock, lock_holder, prepare_output_dir, writing_file
from ..outputs import outputs_complete
from ..score import Cancelled, Scorer
from ..slide import open_slide, slide_name
from .inbox import scan
from .journal import JOURNAL, Entry, Journal

log = logging.getLogger("hexfast.watch")

EVENTS = "watch-events.jsonl"
SETTLING = ".hexfast-watch.settling.json"  # the slides seen but not yet taken, for --status
EVENTS_MAX_BYTES = 64 << 20  # then rotated once to watch-events.jsonl.1


class EventLog:
    """JSON lines, one per event, each written whole and flushed."""

    def __init__(self, path: Path, also: Callable[[dict], None] | None = None):
        self.path = path
        self._also = also
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields) -> dict:
        record = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), "event": event, **fields}
        line = json.dumps(record, default=str) + "\n"
        with self._lock:
            try:
                if self.path.exists() and self.path.stat().st_size > EVENTS_MAX_BYTES:
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line)
            except OSError as e:  # a full disk must not stop the scoring; the journal still has it
                log.warning("%s: cannot append an event: %s", self.path, e)
        if self._also is not None:
            self._also(record)
        return record


class Watcher:
    def __init__(self, inbox: str | os.PathLike, out: str | os.PathLike, scorer: Scorer | None = None, *,
                 settle: float = 30.0, poll: float = 2.0, retry_failed: bool = False, once: bool = False,
                 on_event: Callable[[dict], None] | None = None, **scorer_options):
        """scorer: the Scorer to use (the watcher closes only one it made from `scorer_options`); settle:
        seconds a slide's files must keep their size and mtime; poll: seconds between looks at the inbox;
        once: score what is in the inbox and return (a slide last modified over `settle` seconds ago is
        taken at once, a newer one when it settles; one whose files are missing is left); on_event: called
        with each event record (the JSON line's dict), from the thread it happened in."""
        self.inbox = Path(inbox)
        if not self.inbox.is_dir():
            raise HexfastError(f"{self.inbox}: not a directory to watch")
        target = Path(out).resolve()
        if target == self.inbox.resolve() or self.inbox.resolve() in target.parents:
            raise HexfastError(f"{out}: the output folder must not be inside the inbox {self.inbox}")
        self.out = prepare_output_dir(Path(out))
        self.settle, self.poll = float(settle), float(poll)
        self.once = once
        self._scans = 0  # inbox scans finished (--once ends after one that leaves nothing to wait for)
        self._waiting = 0  # complete slides still settling after the last scan
        self._settling_now: list[dict] = []  # what the last scan saw landing (status, --status)
        self._lock = DirectoryLock(self.out).acquire()
        try:  # output folders already here are never written again: new slides get other names
            folders = {p.name for p in self.out.iterdir() if p.is_dir() and not p.name.startswith(".")}
            self.journal = Journal(self.out, retry_failed=retry_failed, taken_names=folders)
            self.unknown = sorted(folders - self.journal.names())
            self._scored_before = _scored_slides(self.out, self.unknown)
        except BaseException:
            self._lock.release()
            raise
        self.event = EventLog(self.out / EVENTS, on_event)
        self._owns_scorer = scorer is None
        self.scorer = scorer
        self._scorer_options = scorer_options
        self._stop = threading.Event()
        self._arrived = threading.Condition()
        self._settling: dict[Path, tuple[tuple, float]] = {}
        self._taken: collections.deque[Entry] = collections.deque()  # handed to the scorer, in order
        self.current: Entry | None = None
        self.started = time.time()
        self.state = "starting"
        self.final_counts: dict[str, int] | None = None

    # ------------------------------------------------------------- control

    def run(self) -> None:
        """Watches and scores until stop() (or SIGTERM/SIGINT in the main thread: KeyboardInterrupt,
        after the same clean-up). Returns after a clean stop."""
        if self.scorer is None:
            self.scorer = Scorer(**self._scorer_options)
        for entry in self.journal.requeued:
            self.event("requeued", slide=entry.source, name=entry.name, reason="interrupted: redone from scratch")
        for entry in self.journal.retried:
            self.event("requeued", slide=entry.source, name=entry.name, reason="--retry-failed")
        if self.unknown:  # the journal was lost, emptied or replaced: say so, and never score those slides again
            log.warning("%s: %d output folder(s) unknown to %s%s: %s; a slide whose outputs one holds is not "
                        "scored again", self.out, len(self.unknown), self.journal.path,
                        " (it was empty)" if self.journal.was_empty else "", ", ".join(self.unknown[:10]))
            self.event("unknown_outputs", folders=self.unknown, journal=str(self.journal.path),
                       journal_was_empty=self.journal.was_empty)
        self.event("watching", inbox=str(self.inbox), out=str(self.out), settle_s=self.settle,
                   model=str(self.scorer.bundle.path), engine=self.scorer.describe(), demo=self.scorer.bundle.demo)
        scanner = threading.Thread(target=self._scan_loop, name="hexfast-inbox", daemon=True)
        scanner.start()
        self.state = "idle"
        try:
            for path, result in self.scorer.score_queue(self._take, self.out):
                entry = self._taken.popleft()
                self.current = self._taken[0] if self._taken else None
                if isinstance(result, BaseException):
                    reason = str(result).removeprefix(f"{path}: ")
                    self.journal.fail(entry.id, reason)
                    self.event("failed", slide=entry.source, name=entry.name, reason=reason,
                               quarantined=True)
                else:
                    done = self.journal.finish(entry.id, tiles=len(result.coords), tiles_per_s=result.tiles_per_s,
                                               seconds=result.wall_seconds)
                    self.event("done", slide=entry.source, name=entry.name, tiles=done.tiles,
                               tiles_per_s=round(done.tiles_per_s, 1), seconds=round(done.seconds, 2),
                               out=str(result.out_dir), risk=(result.mica or {}).get("risk"))
                self.state = "scoring" if self._taken else "idle"  # the next slide may already be under way
        except (Cancelled, KeyboardInterrupt) as stop:
            self._requeue_taken("stopped" if isinstance(stop, Cancelled) else type(stop).__name__)
            if not isinstance(stop, Cancelled):
                raise
        finally:
            self._stop.set()
            with self._arrived:
                self._arrived.notify_all()
            scanner.join(max(5.0, 2 * self.poll))
            self.state = "stopped"
            self.final_counts = self.journal.counts()
            self.event("stopped", **self.final_counts)
            self.close()

    def stop(self) -> None:
        """From any thread: abort the slide being scored (nothing half-written), requeue it, return from run()."""
        self._stop.set()
        if self.scorer is not None:
            self.scorer.cancel()
        with self._arrived:
            self._arrived.notify_all()

    def close(self) -> None:
        if self._owns_scorer and self.scorer is not None:
            self.scorer.close()
            self.scorer = None
        self.journal.close()
        self._lock.release()

    def status(self) -> dict:
        return status_of(self.journal) | {"state": self.state, "slide": self.current.source if self.current else None,
                                          "uptime_s": round(time.time() - self.started, 1),
                                          "pid": os.getpid(), "settling": list(self._settling_now)}

    # ------------------------------------------------------------- the two threads

    def _take(self, wait: bool):
        """Scorer.score_queue's source: the oldest queued slide, marked running."""
        while True:
            if self._stop.is_set():
                return None
            scans, waiting = self._scans, self._waiting  # before the look: a scan adds before it counts
            entry = self.journal.next_queued()
            if entry is not None:
                self._taken.append(entry)
                self.current = self._taken[0]
                self.state = "scoring"
                self.event("started", slide=entry.source, name=entry.name, attempt=entry.attempts)
                return entry.path, entry.name
            if not wait:
                return None
            if self.once and scans and not waiting:
                return None  # --once: the inbox is done
            with self._arrived:
                self._arrived.wait(self.poll)

    def _scan_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._scan_once()
            except Exception as e:  # noqa: BLE001 - an unreadable inbox for a while must not end the watch
                log.warning("%s: cannot scan the inbox: %s", self.inbox, e)
            self._scans += 1
            with self._arrived:
                self._arrived.notify_all()
            self._stop.wait(self.poll)

    def _scan_once(self) -> None:
        now = time.monotonic()
        present = set()
        waiting: list[dict] = []
        for c in scan(self.inbox):
            present.add(c.path)
            source = str(c.path.resolve())
            if self.journal.known(source, c.size, c.mtime_ns):
                continue
            signature, since = self._settling.get(c.path, (None, now))
            if signature is None and self.once and time.time() - c.mtime_ns / 1e9 >= self.settle:
                signature, since = c.signature, now - self.settle  # --once: untouched for the settle time
                self._settling[c.path] = (signature, since)
            if signature != c.signature or not c.complete or now - since < self.settle:
                if signature != c.signature:
                    self._settling[c.path] = (c.signature, now)
                    since = now
                waiting.append({"slide": source, "bytes": c.size, "complete": c.complete,
                                "unchanged_s": round(now - since, 1), "why": c.why or None})
                continue
            if source in self._scored_before:
                self._adopt(c, source)
                continue
            problem = _open_problem(c.path)
            entry = self.journal.add(source, c.size, c.mtime_ns, slide_name(c.path),
                                     state="failed" if problem else "queued", reason=problem)
            self._settling.pop(c.path, None)
            if entry is None:
                continue
            if problem:
                self.event("failed", slide=source, name=entry.name, reason=problem, quarantined=True)
            else:
                self.event("queued", slide=source, name=entry.name, bytes=c.size)
                with self._arrived:
                    self._arrived.notify_all()
        for gone in set(self._settling) - present:  # removed before it settled
            del self._settling[gone]
        self._waiting = sum(w["complete"] for w in waiting)
        self._settling_now = waiting
        self._publish_settling(waiting)

    def _publish_settling(self, waiting: list[dict]) -> None:
        """OUT/.hexfast-watch.settling.json: what --status shows as settling (replaced whole, never half-written)."""
        path = self.out / SETTLING
        text = json.dumps({"settle_s": self.settle, "scanned": dt.datetime.now(dt.timezone.utc).isoformat(
            timespec="seconds"), "settling": waiting}, indent=1)
        try:
            with writing_file(path) as tmp:
                tmp.write_text(text + "\n", encoding="utf-8")
        except OSError as e:  # a full disk must not stop the watch
            log.warning("%s: cannot write: %s", path, e)

    def _adopt(self, c, source: str) -> None:
        """A slide scored before the journal lost it: journaled as done with its folder, not scored again."""
        name, tiles = self._scored_before.pop(source)
        reason = f"already scored into {name}/, a folder the journal did not know; not scored again"
        entry = self.journal.add(source, c.size, c.mtime_ns, name, state="done", reason=reason, name=name, tiles=tiles)
        self._settling.pop(c.path, None)
        if entry is not None:
            self.event("skipped", slide=source, name=name, reason=reason)

    def _requeue_taken(self, why: str) -> None:
        while self._taken:
            entry = self._taken.popleft()
            self.journal.requeue(entry.id)
            self.event("requeued", slide=entry.source, name=entry.name, reason=f"{why}: redone at the next start")
        self.current = None


def _scored_slides(out: Path, names: list[str]) -> dict[str, tuple[str, int]]:
    """{slide path: (folder, tiles)} for the folders among `names` holding a complete set whose report
    names the slide it was made from."""
    found = {}
    for name in names:
        if outputs_complete(out, name):
            with contextlib.suppress(Exception):
                report = json.loads((out / name / "report.json").read_text(encoding="utf-8"))
                found[str(report["slide"]["path"])] = (name, int(report["tile_count"]))
    return found


def _open_problem(path: Path) -> str | None:
    """None when OpenSlide opens the settled slide, else why not (it is then quarantined)."""
    try:
        open_slide(path).close()
    except HexfastError as e:
        return str(e).removeprefix(f"{path}: ")
    except Exception as e:  # noqa: BLE001 - anything a broken file raises
        return f"{type(e).__name__}: {e}"
    return None


def status_of(journal: Journal, last: int = 10) -> dict:
    """What `hexfast watch --status` and the HTTP endpoint say: counts, the queue, the last results,
    the quarantined slides with their reasons."""

    def brief(e: Entry) -> dict:
        out = {"slide": e.source, "name": e.name, "state": e.state}
        if e.state == "done":
            out |= {"tiles": e.tiles, "tiles_per_s": e.tiles_per_s and round(e.tiles_per_s, 1),
                    "seconds": e.seconds and round(e.seconds, 2)}
        if e.reason:
            out["reason"] = e.reason
        if e.finished_at:
            out["finished"] = dt.datetime.fromtimestamp(e.finished_at, dt.timezone.utc).isoformat(timespec="seconds")
        return out

    return {"counts": journal.counts(), "queue": [brief(e) for e in journal.entries("queued")],
            "running": [brief(e) for e in journal.entries("running")],
            "last": [brief(e) for e in journal.entries(limit=last, newest_first=True) if e.state in ("done", "failed")],
            "quarantined": [brief(e) for e in journal.entries("failed")], "journal": str(journal.path)}


def read_status(out: str | os.PathLike) -> dict:
    """The status of the watcher writing to `out` (or of the last one), from its journal, read-only:
    whether one is running (it holds OUT's lock: its pid, host and start time) and, when it is, the
    slides it sees settling in the inbox."""
    out = Path(out)
    if not (out / JOURNAL).is_file():
        raise HexfastError(f"{out}: no watch journal here ({JOURNAL}); is this the -o of a hexfast watch?")
    holder = lock_holder(out)
    watcher = {"running": holder is not None}
    if holder is not None:
        watcher |= holder
    journal = Journal(out, read_only=True)
    try:
        status = {"watcher": watcher} | status_of(journal)
    finally:
        journal.close()
    settling = []
    if holder is not None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            settling = json.loads((out / SETTLING).read_text(encoding="utf-8"))["settling"]
    status["settling"] = settling
    return status
