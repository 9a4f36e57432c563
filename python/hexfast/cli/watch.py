"""`hexfast watch INBOX -o OUT`: score slides as the scanner finishes them; `hexfast watch --status OUT`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import HexfastError
from . import console
from .score import engine_options, scorer_options
from .types import non_negative_int, positive_float

EPILOG = """\
A slide is scored once its files have kept their size and mtime for --settle seconds and it opens;
temporary and hidden names (rsync's .NAME.XXXXXX, *.tmp, *.part, ...) are ignored, MIRAX and DICOM
series are taken whole. OUT/.hexfast-watch.sqlite is the journal (restart-safe: done slides are not
scored again, an interrupted one is redone, failed ones stay quarantined unless --retry-failed);
OUT/watch-events.jsonl the event log. SIGTERM / Ctrl-C stop cleanly (exit 0).
"""


def add_watch_command(sub, common: argparse.ArgumentParser, mpp: argparse.ArgumentParser) -> None:
    watch = sub.add_parser("watch", parents=[common, mpp, engine_options()],
                           help="score slides as a scanner drops them into a folder (unattended)",
                           description="Watch INBOX and score each finished slide into OUT, in arrival order, with "
                                       "the engines loaded once.", epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    watch.add_argument("inbox", type=Path, nargs="?", metavar="INBOX", help="the scanner's output folder")
    watch.add_argument("-o", "--out", type=Path, help="output folder (one watcher per folder)")
    watch.add_argument("--settle", type=positive_float, default=30.0, metavar="S",
                       help="seconds a slide's files must keep their size and mtime before it is taken (default 30)")
    watch.add_argument("--poll", type=positive_float, default=2.0, metavar="S",
                       help="seconds between looks at the inbox (default 2)")
    watch.add_argument("--retry-failed", action="store_true", help="queue the quarantined slides again, once")
    watch.add_argument("--once", action="store_true",
                       help="score what is in INBOX, then exit (a slide untouched for --settle seconds is taken at "
                            "once, a newer one when it settles): a nightly batch, or a first run")
    watch.add_argument("--dry-run", action="store_true",
                       help="say what would be scored, what was scored before and what is still landing, then exit; "
                            "loads no model and writes nothing")
    watch.add_argument("--http", type=non_negative_int, metavar="PORT",
                       help="serve the status on 127.0.0.1:PORT (/health, /status, /queue, /last)")
    watch.add_argument("--status", type=Path, metavar="OUT", help="print the status of the watcher of OUT and exit")
    watch.set_defaults(run=cmd_watch)


def cmd_watch(args) -> int:
    from ..watch import Watcher, read_status

    if args.status is not None:
        print(json.dumps(read_status(args.status), indent=1))
        return 0
    if args.inbox is None or args.out is None:
        raise HexfastError("hexfast watch needs INBOX and -o OUT (or --status OUT)")
    if args.dry_run:
        return _dry_run(args.inbox, args.out, args.settle)
    from ..score import Scorer

    scorer = Scorer(args.model, args.backend, device=args.device, cuda_graphs=args.cuda_graphs, mpp=args.mpp,
                    **scorer_options(args))
    try:
        if scorer.bundle.demo:
            console.warn_demo()

        def show(record: dict) -> None:
            kind = record["event"]
            if kind in ("queued", "started", "done", "failed", "requeued"):
                detail = {"done": lambda r: f"{r['tiles']} tiles, {r['tiles_per_s']} tiles/s -> {r['out']}",
                          "failed": lambda r: f"QUARANTINED: {r['reason']}",
                          "requeued": lambda r: r["reason"]}.get(kind, lambda r: "")(record)
                console.line(f"{kind}: {Path(record['slide']).name}" + (f": {detail}" if detail else ""))

        watcher = Watcher(args.inbox, args.out, scorer, settle=args.settle, poll=args.poll,
                          retry_failed=args.retry_failed, once=args.once, on_event=show)
        http = None
        if args.http is not None:
            from ..watch.http import StatusServer

            http = StatusServer(watcher, "127.0.0.1", args.http).start()
        console.note(f"watching {args.inbox} -> {args.out} ({scorer.describe()})"
                     + (f"; status at {http.url}" if http else "")
                     + ("; --once: exits when the inbox is done" if args.once else "; Ctrl-C or SIGTERM to stop"))
        try:
            watcher.run()
        except KeyboardInterrupt:  # SIGTERM/SIGINT: the slide in progress was aborted and requeued
            pass
        finally:
            if http is not None:
                http.stop()
        counts = watcher.final_counts or {}
        console.note("stopped cleanly: " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    finally:
        scorer.close()
    return 0


def _dry_run(inbox: Path, out: Path, settle: float) -> int:
    """One line per slide in INBOX: what a watcher started now would do with it. Reads the journal, if any,
    read-only; loads no model; creates nothing."""
    import time

    from ..watch.inbox import scan
    from ..watch.journal import JOURNAL, Journal

    if not inbox.is_dir():
        raise HexfastError(f"{inbox}: not a directory to watch")
    by_source = {}
    if (out / JOURNAL).is_file():
        journal = Journal(out, read_only=True)
        try:
            by_source = {e.source: e for e in journal.entries()}
        finally:
            journal.close()
    counts: dict[str, int] = {}
    for c in scan(inbox):
        entry = by_source.get(str(c.path.resolve()))
        age = time.time() - c.mtime_ns / 1e9
        if entry is not None and entry.state == "done":
            kind, detail = "done before", f" -> {out / entry.name}"
        elif entry is not None and entry.state == "failed":
            kind, detail = "quarantined", f": {entry.reason} (--retry-failed queues it again)"
        elif entry is not None:
            kind, detail = f"{entry.state} in the journal", ": scored next"
        elif not c.complete:
            kind, detail = "incomplete", f": {c.why}"
        elif age < settle:
            kind, detail = "still landing", f": modified {age:.0f} s ago; taken once unchanged for {settle:g} s"
        else:
            kind, detail = "would score", f" ({c.size / 1e6:.1f} MB)"
        counts[kind] = counts.get(kind, 0) + 1
        console.out(f"{c.path}: {kind}{detail}")
    console.note("dry run: " + (", ".join(f"{n} {k}" for k, n in counts.items()) or f"no slides in {inbox}")
                 + "; nothing was scored or written")
    return 0
