"""`hexfast watch`: a simulated scanner writes slides into an inbox; the watcher takes only finished ones, in
order, survives kill -9 and SIGTERM without duplicates or half-written outputs, quarantines a corrupt slide,
and never lets two slides of one name overwrite each other. Bounded in time: small slides, short settle."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import shared_file, write_tiff
from hexfast.outputs import outputs_complete
from hexfast.watch import Watcher, read_status
from hexfast.watch.inbox import ignored, scan

SETTLE, POLL = 1.0, 0.2
WATCH_FILES = {".hexfast-watch.settling.json", ".hexfast-watch.sqlite", ".hexfast-watch.sqlite-wal",
               ".hexfast-watch.sqlite-shm", ".hexfast.lock"}


def half_written(out: Path) -> list[Path]:
    """hexfast's temporary names (hidden .NAME.PID.N.tmp, and any .tmp), the watcher's own files aside."""
    return [p for p in out.rglob("*") if (p.name.startswith(".") or p.name.endswith(".tmp"))
            and p.name not in WATCH_FILES]


def events(out: Path) -> list[dict]:
    path = out / "watch-events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(condition, timeout=120.0, step=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("timed out")


def small_he(path: Path, seed: int = 0) -> Path:
    """A 896 x 896 crop of CMU-1-Small-Region as a tiled TIFF at its MPP: real H&E, ~50 tissue tiles, ~1 s to score."""
    import openslide

    with openslide.OpenSlide(str(shared_file("slides/CMU-1-Small-Region.svs"))) as osr:
        x, y = 600 + 37 * seed, 1000 + 23 * seed
        rgb = np.asarray(osr.read_region((x, y), 0, (896, 896)).convert("RGB"))
    return write_tiff(path, rgb, mpp=0.499)


@pytest.fixture
def dirs(tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    return inbox, out


class Running:
    """A Watcher on a thread (the API vendors embed), stopped and joined at the end."""

    def __init__(self, inbox, out, **kw):
        self.watcher = Watcher(inbox, out, settle=kw.pop("settle", SETTLE), poll=POLL, **kw)
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.watcher.run()
        except BaseException as e:  # noqa: BLE001 - surfaced by stop()
            self.error = e

    def stop(self):
        self.watcher.stop()
        self.thread.join(60)
        assert not self.thread.is_alive() and self.error is None, self.error


def cli(inbox, out, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "hexfast", "watch", str(inbox), "-o", str(out), "--settle",
                             str(SETTLE), "--poll", str(POLL), *map(str, extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_what_counts_as_a_finished_slide(tmp_path):
    inbox = tmp_path / "in"
    inbox.mkdir()
    for name in (".scan.svs.Xk3d9a", "._scan.svs", "scan.svs.part", "scan.tmp", "~$scan.svs", "scan.svs~",
                 "notes.txt"):
        (inbox / name).write_bytes(b"x")
        assert name == "notes.txt" or ignored(name), name
    (inbox / "a.svs").write_bytes(b"x" * 10)
    series = inbox / "series"  # a DICOM WSI series: one slide
    series.mkdir()
    for i in range(3):
        (series / f"level{i}.dcm").write_bytes(b"d" * (i + 1))
    (inbox / "m.mrxs").write_bytes(b"m")  # MIRAX: not whole until Slidedat.ini's data files are all there
    (inbox / "m").mkdir()
    (inbox / "m" / "Slidedat.ini").write_text("[DATAFILE]\nFILE_COUNT=2\nFILE_0=Data0000.dat\nFILE_1=Data0001.dat\n")
    (inbox / "m" / "Data0000.dat").write_bytes(b"0")
    (inbox / "deep" / "er").mkdir(parents=True)
    (inbox / "deep" / "er" / "b.ndpi").write_bytes(b"n")
    found = {c.path.relative_to(inbox).as_posix(): c for c in scan(inbox)}
    assert set(found) == {"a.svs", "series", "m.mrxs", "deep/er/b.ndpi"}
    assert found["series"].size == 6 and found["a.svs"].complete
    assert not found["m.mrxs"].complete and "1 of its data files" in found["m.mrxs"].why
    (inbox / "m" / "Data0001.dat").write_bytes(b"1")
    mirax = {c.path.name: c for c in scan(inbox)}["m.mrxs"]
    assert mirax.complete and mirax.size == 1 + len((inbox / "m" / "Slidedat.ini").read_bytes()) + 2
    before = found["a.svs"].signature
    (inbox / "a.svs").write_bytes(b"x" * 11)
    assert {c.path.name: c for c in scan(inbox)}["a.svs"].signature != before
    # robocopy dates the file it is writing 1980-01-01 (local time) until the copy ends
    for stamp in ("1980-01-01T00:00:00-12:00", "1980-01-01T00:00:00+14:00", "1980-01-01T23:59:59+00:00"):
        t = dt.datetime.fromisoformat(stamp).timestamp()
        os.utime(inbox / "a.svs", (t, t))
        a = {c.path.name: c for c in scan(inbox)}["a.svs"]
        assert not a.complete and "robocopy" in a.why, stamp
    for stamp in ("1980-01-03T00:00:00+00:00", "2026-12-01T10:00:00+00:00"):  # robocopy done: the source's time
        t = dt.datetime.fromisoformat(stamp).timestamp()
        os.utime(inbox / "a.svs", (t, t))
        assert {c.path.name: c for c in scan(inbox)}["a.svs"].complete, stamp


def test_a_slide_written_slowly_is_taken_only_when_finished(dirs, tmp_path):
    inbox, out = dirs
    source = small_he(tmp_path / "source.tif").read_bytes()
    run = Running(inbox, out)
    try:
        target = inbox / "scan1.tif"
        last_write = 0.0
        with open(target, "wb") as f:  # the scanner: 8 chunks, a pause after each (shorter than the settle time)
            for i in range(8):
                f.write(source[i * len(source) // 8:(i + 1) * len(source) // 8])
                f.flush()
                os.fsync(f.fileno())
                last_write = time.time()
                time.sleep(0.4)
        # rsync's way: a hidden temporary name, renamed when whole
        hidden = inbox / ".scan2.tif.aB3x9Q"
        hidden.write_bytes(source)
        time.sleep(SETTLE * 2)
        assert not any(e.get("slide", "").endswith("scan2.tif.aB3x9Q") for e in events(out))
        os.replace(hidden, inbox / "scan2.tif")
        done = wait_for(lambda: [e for e in events(out) if e["event"] == "done"] if
                        len([e for e in events(out) if e["event"] == "done"]) == 2 else None)
    finally:
        run.stop()
    queued = {Path(e["slide"]).name: e for e in events(out) if e["event"] == "queued"}
    from datetime import datetime

    taken = datetime.fromisoformat(queued["scan1.tif"]["time"]).timestamp()
    assert taken >= last_write + SETTLE - 0.05  # never before the file had been still for the settle time
    assert [Path(e["slide"]).name for e in done] == ["scan1.tif", "scan2.tif"]  # arrival order
    for name in ("scan1", "scan2"):
        assert outputs_complete(out, name)
        with h5py.File(out / name / f"{name}.h5") as f:
            assert len(f["coords"]) == done[0]["tiles"] > 0
    assert half_written(out) == []


def test_kill_9_mid_slide_then_restart(dirs, tmp_path):
    """The slide being scored when the watcher is killed is redone from scratch at the next start: one done,
    no second output folder, no temporary file left."""
    inbox, out = dirs
    small_he(inbox / "slide.tif")
    proc = cli(inbox, out, "--batch-size", "2", "--threads", "1")
    try:
        wait_for(lambda: any(e["event"] == "started" for e in events(out)))
        time.sleep(0.6)  # inside the HEX pass
        assert not any(e["event"] == "done" for e in events(out))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert read_status(out)["counts"]["running"] == 1  # what the journal says after a kill -9
    proc = cli(inbox, out)
    try:
        wait_for(lambda: any(e["event"] == "done" for e in events(out)))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    kinds = [(e["event"], e.get("name")) for e in events(out) if e["event"] != "watching"]
    assert ("requeued", "slide") in kinds and kinds.count(("done", "slide")) == 1
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["slide"]
    assert outputs_complete(out, "slide") and half_written(out) == []
    status = read_status(out)
    assert status["counts"] == {"queued": 0, "running": 0, "done": 1, "failed": 0}


def test_sigterm_stops_cleanly_mid_slide(dirs):
    inbox, out = dirs
    small_he(inbox / "slide.tif")
    proc = cli(inbox, out, "--batch-size", "2", "--threads", "1")
    wait_for(lambda: any(e["event"] == "started" for e in events(out)))
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    stderr = proc.stderr.read()
    assert code == 0, stderr
    assert "stopped cleanly" in stderr and "Traceback" not in stderr
    assert not (out / "slide" / "report.json").exists() and half_written(out) == []
    assert read_status(out)["counts"]["queued"] == 1  # requeued: redone at the next start
    assert events(out)[-1]["event"] == "stopped"


def test_a_corrupt_slide_is_quarantined_and_the_next_one_scored(dirs, tmp_path):
    inbox, out = dirs
    shutil.copy(shared_file("slides/openslide-fixtures/unreadable.svs"), inbox / "a_corrupt.svs")
    shutil.copy(shared_file("slides/openslide-fixtures/unopenable.tiff"), inbox / "b_unopenable.tiff")
    small_he(inbox / "c_good.tif")
    run = Running(inbox, out)
    try:
        wait_for(lambda: read_status(out)["counts"]["done"] == 1 and read_status(out)["counts"]["failed"] == 2)
    finally:
        run.stop()
    quarantined = {Path(q["slide"]).name: q["reason"] for q in read_status(out)["quarantined"]}
    assert set(quarantined) == {"a_corrupt.svs", "b_unopenable.tiff"} and all(quarantined.values())
    assert outputs_complete(out, "c_good")
    # a restart does not retry them in a loop; --retry-failed does, once
    run = Running(inbox, out)
    time.sleep(SETTLE + 4 * POLL)
    run.stop()
    started = [e for e in events(out) if e["event"] == "started" and Path(e["slide"]).name == "a_corrupt.svs"]
    assert len(started) == 1, [(e["event"], e.get("name"), e["time"]) for e in events(out)]
    run = Running(inbox, out, retry_failed=True)
    try:
        wait_for(lambda: sum(e["event"] == "started" and Path(e["slide"]).name == "a_corrupt.svs" for e in events(out)) == 2)
        wait_for(lambda: read_status(out)["counts"]["failed"] == 2)
    finally:
        run.stop()


def test_same_name_at_different_times_never_overwrites(dirs, tmp_path):
    inbox, out = dirs
    (inbox / "x").mkdir()
    (inbox / "y").mkdir()
    run = Running(inbox, out)
    try:
        small_he(inbox / "x" / "slide.tif", seed=0)
        wait_for(lambda: read_status(out)["counts"]["done"] == 1)
        small_he(inbox / "y" / "slide.tif", seed=1)  # another slide, the same stem
        wait_for(lambda: read_status(out)["counts"]["done"] == 2)
        os.remove(inbox / "x" / "slide.tif")  # the lab clears the inbox; a new scan comes under the old path
        time.sleep(POLL * 3)
        small_he(inbox / "x" / "slide.tif", seed=2)
        wait_for(lambda: read_status(out)["counts"]["done"] == 3)
        status = run.watcher.status()
        assert status["state"] in ("idle", "scoring") and status["counts"]["done"] == 3
    finally:
        run.stop()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["slide", "slide-2", "slide-3"]
    firsts = []
    for name in ("slide", "slide-2", "slide-3"):
        assert outputs_complete(out, name)
        with h5py.File(out / name / f"{name}.h5") as f:
            firsts.append(f["codex_prediction"][0].tobytes())
    assert len(set(firsts)) == 3  # three slides' results, none overwritten


def test_status_over_http(dirs):
    from hexfast.watch.http import StatusServer

    inbox, out = dirs
    small_he(inbox / "s.tif")
    run = Running(inbox, out)
    server = StatusServer(run.watcher, "127.0.0.1", 0).start()
    try:
        wait_for(lambda: read_status(out)["counts"]["done"] == 1)

        def get(path):
            with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=10) as r:
                return json.loads(r.read())

        health = get("/health")
        assert health["ok"] is True and health["counts"]["done"] == 1 and health["state"] in ("idle", "scoring")
        assert get("/queue") == [] and get("/last")[0]["name"] == "s" and get("/status")["counts"]["done"] == 1
        with pytest.raises(urllib.error.HTTPError):
            get("/nothing")
    finally:
        server.stop()
        run.stop()


def test_one_watcher_per_output_folder(dirs):
    from hexfast.errors import HexfastError

    inbox, out = dirs
    run = Running(inbox, out)
    try:
        with pytest.raises(HexfastError, match="is being written by"):
            Watcher(inbox, out)
    finally:
        run.stop()
    with pytest.raises(HexfastError, match="must not be inside the inbox"):
        Watcher(inbox, inbox / "out")
