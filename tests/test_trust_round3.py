"""Trust, round 3 (issue 23): no foreign web page reaches a slide, no rerun destroys a good result, no bad
bag or region gives a silent answer. Each numbered section is one case of the issue."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import hexfast
from conftest import hexfast as hexfast_cli
from hexfast.bundle import DEFAULT_BUNDLE, load_bundle
from hexfast.files import LOCK_NAME
from hexfast.outputs import outputs_complete
from hexfast.outputs.writer import SlideWriter, partial_dir
from hexfast.view import ViewerData, ViewerServer
from hexfast.watch.http import StatusServer

# ---------------------------------------------------------------------------- 1, 2. the two local servers


class FakeWatcher:
    def status(self) -> dict:
        return {"state": "idle", "slide": "/scans/patient-042.svs", "uptime_s": 1.0, "counts": {"done": 1},
                "queue": [], "last": []}


def serving(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


def stop(server) -> None:
    server.shutdown()
    server.server_close()


@pytest.fixture(params=["view", "watch"])
def any_server(request, cmu_scored):
    """Each of hexfast's two servers, with a path that answers with patient data."""
    if request.param == "view":
        server = serving(ViewerServer(ViewerData(cmu_scored[0]), "127.0.0.1", 0))
        paths = ["/api/tile?x=1000&y=1000", "/api/info", "/dz/8/0_0.jpg", "/overlay/0.png", "/api/attention", "/"]
    else:
        server = serving(StatusServer(FakeWatcher(), "127.0.0.1", 0))
        paths = ["/status", "/health", "/queue", "/last"]
    yield server, paths
    stop(server)


def raw_get(server, target: str, host: str | None, version: str = "HTTP/1.1") -> tuple[int, bytes]:
    """One request as a browser or curl sends it, with the Host header given (None: no Host)."""
    port = server.server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        head = f"GET {target} {version}\r\n" + (f"Host: {host}\r\n" if host is not None else "")
        s.sendall((head + "Connection: close\r\n\r\n").encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_dns_rebinding_hosts_are_refused(any_server):
    server, paths = any_server
    port = server.server_address[1]
    for path in paths:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
            assert raw_get(server, path, host)[0] == 200, (path, host)
        for host in ("evil.example.com", f"evil.example.com:{port}", f"127.0.0.1.evil.example.com:{port}",
                     f"127.0.0.1:{port + 1}", "127.0.0.1", f"localhost.:{port}", "", f"10.0.0.8:{port}"):
            status, body = raw_get(server, path, host)
            assert status == 421 and b"slide" not in body and b"patient" not in body, (path, host, body[:200])
        assert raw_get(server, path, None)[0] == 421  # HTTP/1.1 requires Host
        assert raw_get(server, path, None, "HTTP/1.0")[0] == 200  # a vendor's bare HTTP/1.0 poller


def test_absolute_form_targets_must_name_the_server_too(any_server):
    server, paths = any_server
    port = server.server_address[1]
    path = paths[0]
    assert raw_get(server, f"http://127.0.0.1:{port}{path}", f"127.0.0.1:{port}")[0] == 200
    for target in (f"http://evil.example.com{path}", f"http://evil.example.com:{port}{path}",
                   f"https://127.0.0.1:{port}{path}", f"ftp://127.0.0.1:{port}{path}"):
        assert raw_get(server, target, f"127.0.0.1:{port}")[0] == 421, target


def test_a_wildcard_bind_answers_ip_literals_only(cmu_scored):
    server = serving(StatusServer(FakeWatcher(), "0.0.0.0", 0))
    try:
        port = server.server_address[1]
        assert raw_get(server, "/health", f"192.168.7.9:{port}")[0] == 200
        assert raw_get(server, "/health", f"scanner-pc.example.org:{port}")[0] == 421
    finally:
        stop(server)


def threads_now() -> int:
    return threading.active_count()


@pytest.mark.parametrize("kind", ["view", "watch"])
def test_idle_connections_hold_a_bounded_number_of_threads_for_a_bounded_time(kind, cmu_scored):
    base = (ViewerServer, (ViewerData(cmu_scored[0]),)) if kind == "view" else (StatusServer, (FakeWatcher(),))

    class Small(base[0]):
        max_connections = 4
        idle_timeout = 0.3

    server = serving(Small(*base[1], "127.0.0.1", 0))
    before = threads_now()
    sockets = [socket.create_connection(("127.0.0.1", server.server_address[1])) for _ in range(60)]
    try:
        time.sleep(0.2)
        peak = threads_now() - before
        assert peak <= 4, peak  # the connections beyond the cap wait in the listen queue
        closed = 0
        deadline = time.monotonic() + 60
        for s in sockets:  # each is closed by the server after its idle timeout
            s.settimeout(max(0.1, deadline - time.monotonic()))
            assert s.recv(10) == b""
            closed += 1
            assert threads_now() - before <= 4
        assert closed == 60
        url = f"http://127.0.0.1:{server.server_address[1]}/" + ("api/info" if kind == "view" else "health")
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200
    finally:
        for s in sockets:
            s.close()
        stop(server)
    deadline = time.monotonic() + 5
    while threads_now() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threads_now() <= before


def test_200_concurrent_viewer_requests_all_answer(cmu_scored):
    server = serving(ViewerServer(ViewerData(cmu_scored[0]), "127.0.0.1", 0))
    url = server.url.rstrip("/")

    def fetch(i: int) -> int:
        path = ["/api/info", f"/api/tile?x={i * 10}&y={i * 7}", "/dz/9/0_0.jpg", "/overlay/1.png"][i % 4]
        with urllib.request.urlopen(url + path, timeout=60) as r:
            r.read()
            return r.status

    try:
        with ThreadPoolExecutor(200) as pool:
            assert list(pool.map(fetch, range(200))) == [200] * 200
    finally:
        stop(server)


def test_shutdown_is_prompt_while_connections_wait_for_a_slot(cmu_scored):
    class Small(StatusServer):
        max_connections = 1
        idle_timeout = 30

    server = serving(Small(FakeWatcher(), "127.0.0.1", 0))
    sockets = [socket.create_connection(("127.0.0.1", server.server_address[1])) for _ in range(3)]
    try:
        time.sleep(0.3)
        start = time.monotonic()
        stop(server)
        assert time.monotonic() - start < 5
    finally:
        for s in sockets:
            s.close()


# ---------------------------------------------------------------------------- 10. watch's /health while scoring


class PrefetchingScorer:
    """Scorer.score_queue's contract as the real one keeps it: the next slide is taken (and prepared) while
    the current one finishes. Records the watcher's state while it scores the second slide."""

    def __init__(self):
        from types import SimpleNamespace

        self.bundle = SimpleNamespace(path=Path("demo"), demo=True)
        self.states: list[str] = []
        self.watcher = None

    def describe(self) -> str:
        return "fake"

    def cancel(self) -> None:
        pass

    def score_queue(self, take, out):
        from types import SimpleNamespace

        first = take(True)
        deadline = time.monotonic() + 60
        while (second := take(False)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        result = SimpleNamespace(coords=[0], tiles_per_s=1.0, wall_seconds=1.0, out_dir=out, mica=None)
        yield first[0], result
        self.states.append(self.watcher.status()["state"])  # the second slide is being scored now
        yield second[0], result
        self.states.append(self.watcher.status()["state"])
        take(True)


def test_health_says_scoring_while_the_prefetched_slide_runs(tmp_path):
    from hexfast.watch import Watcher
    from test_watch import small_he

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    small_he(inbox / "a.tif")
    small_he(inbox / "b.tif", seed=1)
    scorer = PrefetchingScorer()
    watcher = scorer.watcher = Watcher(inbox, tmp_path / "out", scorer, settle=0, poll=0.05)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while len(scorer.states) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    watcher.stop()
    thread.join(30)
    assert scorer.states == ["scoring", "idle"]


# ---------------------------------------------------------------------------- 3. a rerun changes the set as one


def digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture
def scored_before(cmu_scored, tmp_path) -> tuple[Path, Path, dict[str, str]]:
    """OUT/<stem>/ holding a complete set (the default run), plus a file a user put beside it:
    (OUT, slide, the folder's digests)."""
    done, slide = cmu_scored
    out = tmp_path / "out"
    shutil.copytree(done, out / done.name)
    (out / done.name / "my-notes.txt").write_text("tumour margin reviewed")
    return out, slide, digests(out / done.name)


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_rerun_leaves_the_previous_set_exactly_as_it_was(scored_before, signum, code):
    out, slide, before = scored_before
    stem = slide.stem
    proc = subprocess.Popen(
        [sys.executable, "-m", "hexfast", "score", str(slide), "-o", str(out), "--stride", "16", "--batch-size", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        stage = partial_dir(out, stem)
        deadline = time.monotonic() + 120
        while not any(p.name.endswith(".tmp") for p in stage.glob("*")) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)  # the new h5 is being written
        time.sleep(2.0)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    assert digests(out / stem) == before
    assert outputs_complete(out, stem) and leftovers(out) == []
    ViewerData(out / stem).close()  # hexfast view opens it


def test_a_rerun_that_fills_the_disk_leaves_the_previous_set_and_frees_its_space(scored_before, tmp_path):
    out, slide, before = scored_before
    stem = slide.stem
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    size_kb = sum(p.stat().st_size for p in (out / stem).iterdir()) // 1024 + 2048
    command = " ".join(["exec", sys.executable, "-m", "hexfast", "score", str(slide), "-o", str(disk), "--stride", "16"])
    script = (f"mount -t tmpfs -o size={size_kb}k tmpfs {disk} && cp -a {out / stem} {disk}/ && "
              f"({command}); rc=$?; cd {disk}/{stem} && sha256sum * >&2; echo used=$(du -sk {disk} | cut -f1) >&2; "
              f"ls -A {disk} >&2; exit $rc")
    r = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    if "mount:" in r.stderr and r.returncode != 2:
        message = f"this machine does not allow a private tmpfs mount ({r.stderr.strip()})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("hexfast: error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in r.stderr, r.stderr
    after = dict(reversed(line.split()) for line in r.stderr.splitlines() if len(line.split()) == 2
                 and len(line.split()[0]) == 64)
    assert after == before
    assert r.stderr.strip().splitlines()[-1] == stem  # OUT holds the slide's folder and nothing else
    used = int(next(line for line in r.stderr.splitlines() if line.startswith("used="))[5:])
    assert used <= size_kb - 2048 + 64  # the partial set's space is given back


def test_a_rerun_that_succeeds_replaces_the_set_and_keeps_the_users_files(scored_before):
    out, slide, before = scored_before
    stem = slide.stem
    r = hexfast_cli("score", slide, "-o", out, "--stride", "28")
    assert r.returncode == 0, r.stderr
    after = digests(out / stem)
    assert set(after) == set(before) and after["my-notes.txt"] == before["my-notes.txt"]
    assert all(after[name] != before[name] for name in after if name not in ("my-notes.txt", "overview.png"))
    assert outputs_complete(out, stem) and leftovers(out) == []
    assert json.loads((out / stem / "report.json").read_text())["settings"]["stride"] == 28


def test_a_kill_between_the_two_renames_is_undone_by_the_next_writer(scored_before):
    out, slide, before = scored_before
    stem = slide.stem
    (out / stem).rename(out / f".{stem}.old")  # the swap's first rename happened, the second did not
    stage = partial_dir(out, stem)
    stage.mkdir()
    (stage / f"{stem}.h5").write_bytes(b"half")  # a run killed outright left its partial set
    with hexfast.open_slide(slide) as s:
        grid = hexfast.tile_slide(s)
        writer = SlideWriter(out, s, grid, load_bundle(DEFAULT_BUNDLE), "test")
        assert digests(out / stem) == before  # put back before anything else happened
        assert f"{stem}.h5" not in {p.name for p in stage.iterdir()}  # the dead run's file is gone
        writer.abort()
    assert digests(out / stem) == before and leftovers(out) == []


# ---------------------------------------------------------------------------- 4. the watch journal's loss is visible


def watch_once(inbox: Path, out: Path, until) -> list[dict]:
    """A watcher run until `until(out)` holds; its events."""
    from test_watch import Running, events, wait_for

    run = Running(inbox, out, settle=0.2)
    try:
        wait_for(lambda: until(out), timeout=180)
    finally:
        run.stop()
    return events(out)


def test_an_emptied_journal_reports_the_folders_it_lost_and_rescores_none(tmp_path):
    from hexfast.watch import read_status
    from hexfast.watch.journal import JOURNAL
    from test_watch import small_he

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    small_he(inbox / "a.tif")
    small_he(inbox / "b.tif", seed=1)
    watch_once(inbox, out, lambda o: read_status(o)["counts"]["done"] == 2)
    before = {name: digests(out / name) for name in ("a", "b")}
    (out / JOURNAL).write_bytes(b"")  # emptied to 0 bytes
    (out / "watch-events.jsonl").unlink()
    small_he(inbox / "c.tif", seed=2)
    seen = watch_once(inbox, out, lambda o: read_status(o)["counts"]["done"] == 3)
    lost = [e for e in seen if e["event"] == "unknown_outputs"]
    assert len(lost) == 1 and lost[0]["folders"] == ["a", "b"] and lost[0]["journal_was_empty"] is True
    skipped = sorted(e["name"] for e in seen if e["event"] == "skipped")
    assert skipped == ["a", "b"] and [e["name"] for e in seen if e["event"] == "started"] == ["c"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["a", "b", "c"]  # no a-2, b-2
    assert {name: digests(out / name) for name in ("a", "b")} == before
    status = read_status(out)
    assert status["counts"] == {"queued": 0, "running": 0, "done": 3, "failed": 0}


@pytest.mark.parametrize("damage", ["garbage", "half", "other-database"])
def test_a_damaged_journal_is_one_line_naming_it(tmp_path, damage):
    import sqlite3

    from hexfast.watch.journal import JOURNAL, Journal
    from test_trust import error_line

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    out.mkdir()
    journal = out / JOURNAL
    if damage == "garbage":
        journal.write_bytes(b"\x00garbage" * 512)
    elif damage == "half":
        j = Journal(out)
        for i in range(2000):
            j.add(f"/scans/slide-{i:05d}.svs", 10, 20, f"slide-{i:05d}")
        j.close()
        data = journal.read_bytes()
        journal.write_bytes(data[: len(data) // 2])
    else:
        with sqlite3.connect(journal) as db:
            db.execute("CREATE TABLE patients (id INTEGER)")
        db.close()
    kept = journal.read_bytes()
    for args in (["watch", inbox, "-o", out], ["watch", "--status", out]):
        r = hexfast_cli(*args)
        line = error_line(r, str(journal), "not a hexfast journal")
        assert "DatabaseError" not in line and "internal error" not in line
    assert journal.read_bytes() == kept  # refused, never changed
    assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("free_pages", [0, 2, 6])
def test_a_full_disk_at_start_is_one_line_and_leaves_no_lock(tmp_path, free_pages):
    """No room for the lock (0), room for the lock but not the journal (2, 6)."""
    from test_trust import error_line

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a small tmpfs")
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    out.mkdir()
    command = " ".join(["exec", sys.executable, "-m", "hexfast", "watch", str(inbox), "-o", str(out)])
    script = (f"mount -t tmpfs -o size=256k tmpfs {out} && (dd if=/dev/zero of={out}/filler bs=4k count={64 - free_pages} 2>/dev/null; "
              f"{command}); rc=$?; ls -A {out} >&2; exit $rc")
    r = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    if "mount:" in r.stderr:
        message = f"this machine does not allow a private tmpfs mount ({r.stderr.strip()})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    listing = r.stderr.strip().splitlines()[-1]
    r.stderr = "\n".join(r.stderr.strip().splitlines()[:-1])
    error_line(r, str(out), "No space left on device")
    assert listing == "filler"  # no empty .hexfast.lock, no journal


# ---------------------------------------------------------------------------- 5. --mica-bag: no bad bag gives an answer


def demo_mica_width() -> int:
    return int(load_bundle(DEFAULT_BUNDLE).model("mica")["inputs"]["h_path"]["shape"][1])


def write_bag(directory: Path, stem: str, features, coords, patch_size=None, rows: int | None = None) -> Path:
    import h5py

    directory.mkdir(exist_ok=True)
    with h5py.File(directory / f"{stem}.h5", "w") as f:
        if rows is not None:  # declared, never written (HDF5 reads the fill value: zeros)
            f.create_dataset("features", shape=(rows, features), dtype="f4", chunks=(1024, features))
            f.create_dataset("coords", shape=(rows, 2), dtype="i8", chunks=(1024, 2))
        else:
            f["features"] = features
            f["coords"] = coords
        if patch_size is not None:
            f["coords"].attrs["patch_size"] = patch_size
    return directory / f"{stem}.h5"


def good_bag(n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    coords = np.array([[256 * (i % 8), 256 * (i // 8)] for i in range(n)], np.int64)
    return rng.normal(size=(n, width)).astype(np.float32), coords


def bag_cases(width: int):
    features, coords = good_bag(40, width)
    nan, inf = features.copy(), features.copy()
    nan[7, 3] = np.nan
    inf[12, 0] = -np.inf
    duplicate = coords.copy()
    duplicate[9] = duplicate[4]
    return {
        "nan": (dict(features=nan, coords=coords), "NaN or Inf (the first at row 7)"),
        "inf": (dict(features=inf, coords=coords), "NaN or Inf (the first at row 12)"),
        "int8": (dict(features=features.astype(np.int8), coords=coords), "stored as int8"),
        "complex": (dict(features=features.astype(np.complex64), coords=coords), "stored as complex64"),
        "strings": (dict(features=np.array([[b"0.1"] * width] * 40), coords=coords), "stored as bytes"),
        "string-coords": (dict(features=features, coords=np.array([[b"0", b"0"]] * 40)), "coords are stored as bytes"),
        "patch-size": (dict(features=features, coords=coords, patch_size="abc"), "patch_size'] is 'abc'"),
        "ten-million-rows": (dict(features=width, coords=None, rows=10_000_000), "declares 10,000,000 patches"),
        "duplicates": (dict(features=features, coords=duplicate), "duplicate patch coords (the first: row 4"),
        "fractional": (dict(features=features, coords=coords + 0.5), "fractions of a pixel"),
    }


@pytest.mark.parametrize("case", ["nan", "inf", "int8", "complex", "strings", "string-coords", "patch-size",
                                  "ten-million-rows", "duplicates", "fractional"])
def test_a_bad_bag_is_refused_naming_the_file_before_scoring(case, tmp_path, cmu_small):
    from hexfast.score.mica_bag import BagError, open_bag

    width = demo_mica_width()
    kwargs, fragment = bag_cases(width)[case]
    path = write_bag(tmp_path / "bags", cmu_small.stem, **kwargs)
    assert path.stat().st_size < 1 << 20 or case != "ten-million-rows"
    with hexfast.open_slide(cmu_small) as slide, pytest.raises(BagError) as caught:
        open_bag(path, slide, width)
    assert str(caught.value).startswith(f"{path}: ") and fragment in str(caught.value), str(caught.value)


def test_a_good_bag_still_opens(tmp_path, cmu_small):
    from hexfast.score.mica_bag import open_bag

    width = demo_mica_width()
    features, coords = good_bag(40, width)
    for kind in (np.float16, np.float32, np.float64):
        path = write_bag(tmp_path / kind.__name__, cmu_small.stem, features.astype(kind), coords.astype(np.float64),
                         patch_size=np.int64(256))
        with hexfast.open_slide(cmu_small) as slide:
            bag = open_bag(path, slide, width)
        assert len(bag) == 40 and bag.info["patch_size"] == 256
        np.testing.assert_array_equal(np.concatenate(list(bag.chunks(16))), features.astype(kind).astype(np.float32))


@pytest.mark.parametrize("case", ["nan", "strings"])
def test_the_cli_refuses_a_bad_bag_in_one_line_before_the_hex_pass(case, tmp_path, cmu_small):
    from test_trust import error_line

    kwargs, fragment = bag_cases(demo_mica_width())[case]
    path = write_bag(tmp_path / "bags", cmu_small.stem, **kwargs)
    r = hexfast_cli("score", cmu_small, "--mica-bag", tmp_path / "bags", "-o", tmp_path / "out", "--backend", "ort-cpu")
    error_line(r, str(path), fragment)
    assert "tiles/s" not in r.stderr  # refused while preparing, before any tile was scored
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------------------- 6. fluorescence decided from the file


def multichannel_tiff(path: Path, channels: int, dtype, planar: bool = True) -> Path:
    """As a fluorescence scanner writes one: tiled, one plane per channel, 0.25 µm/px, mostly dark."""
    import tifffile

    rng = np.random.default_rng(1)
    top = np.iinfo(dtype).max
    shape = (channels, 1024, 1024) if planar else (1024, 1024, channels)
    planar = planar and channels > 1
    data = (rng.random(shape) * 0.05 * top).astype(dtype).squeeze()
    tifffile.imwrite(path, data, tile=(256, 256), photometric="minisblack",
                     planarconfig="separate" if planar else "contig", resolution=(4e4, 4e4),
                     resolutionunit="CENTIMETER", metadata=None)
    return path


@pytest.mark.parametrize("channels, dtype, planar, said", [
    (5, np.uint16, True, "5 channels of 16-bit samples (grayscale)"),
    (1, np.uint16, True, "1 channel of 16-bit samples (grayscale)"),
    (1, np.uint8, True, "1 channel of 8-bit samples (grayscale)"),
    (3, np.uint16, False, "3 channels of 16-bit samples (grayscale)"),
])
def test_a_fluorescence_tiff_is_refused_from_its_samples(tmp_path, channels, dtype, planar, said):
    from test_trust import error_line

    slide = multichannel_tiff(tmp_path / "fluo.tif", channels, dtype, planar)
    import openslide

    assert openslide.OpenSlide.detect_format(str(slide)) == "generic-tiff"  # OpenSlide would render it
    r = hexfast_cli("score", slide, "-o", tmp_path / "out", "--backend", "ort-cpu")
    error_line(r, str(slide), said, "not an 8-bit colour (RGB) brightfield H&E scan")
    with pytest.raises(hexfast.SlideError, match="fluorescence"):
        hexfast.open_slide(slide)


def test_colour_slides_still_open(cmu_small, fixture_slide):
    for path in (cmu_small, fixture_slide("boxes.tiff"), fixture_slide("small.svs")):
        with hexfast.open_slide(path, mpp=0.5) as slide:
            assert slide.dimensions[0] > 0


# ---------------------------------------------------------------------------- 7. --roi / --region edge cases


def square(x0, y0, side, z=None):
    ring = [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side], [x0, y0]]
    return [p + [z] for p in ring] if z is not None else ring


def polygon_file(path: Path, ring_text: str) -> Path:
    path.write_text('{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [' + ring_text + ']}}')
    return path


@pytest.mark.parametrize("text", ["nan,0,100,100", "0,0,inf,100", "0,-inf,100,100", "0,0,100,NaN", "1e999,0,10,10"])
def test_a_region_of_non_finite_numbers_is_one_line(text, tmp_path, cmu_small):
    from test_trust import error_line

    for args in (["--region", text], [f"--region={text}"]):
        r = hexfast_cli("score", cmu_small, *args, "-o", tmp_path / "out")
        error_line(r, f"--region '{text}'", "finite")


@pytest.mark.parametrize("case", ["deep", "digits", "strings", "booleans", "infinite", "not-a-list", "huge-int"])
def test_a_bad_roi_is_one_line_naming_the_file(case, tmp_path, cmu_small):
    from test_trust import error_line

    roi = tmp_path / "roi.geojson"
    if case == "deep":
        roi.write_text("[" * 100_000 + "]" * 100_000)
    elif case == "digits":
        polygon_file(roi, '[[0, 0], [1' + "0" * 5000 + ', 0], [10, 10], [0, 0]]')
    elif case == "strings":
        polygon_file(roi, json.dumps([[[str(x), str(y)] for x, y in square(0, 0, 500)]])[1:-1])
    elif case == "booleans":
        polygon_file(roi, '[[true, false], [1, 0], [1, 1], [0, 0]]')
    elif case == "infinite":
        polygon_file(roi, '[[0, 0], [1' + "0" * 400 + '.0, 0], [10, 10], [0, 0]]')
    elif case == "not-a-list":
        polygon_file(roi, '"abc"')
    else:
        polygon_file(roi, '[[0, 0], [1' + "0" * 400 + ', 0], [10, 10], [0, 0]]')
    r = hexfast_cli("score", cmu_small, "--roi", roi, "-o", tmp_path / "out")
    line = error_line(r, str(roi))
    assert "internal error" not in line and len(line) < 400, line


def test_positions_with_a_z_are_read_as_x_y(tmp_path, cmu_small):
    from hexfast.slide.region import read_roi

    plain, with_z = tmp_path / "xy.geojson", tmp_path / "xyz.geojson"
    plain.write_text(json.dumps({"type": "Polygon", "coordinates": [square(200, 300, 1500)]}))
    with_z.write_text(json.dumps({"type": "Polygon", "coordinates": [square(200, 300, 1500, z=7.5)]}))
    a, b = read_roi(plain), read_roi(with_z)
    np.testing.assert_array_equal(a.polygons[0][0], b.polygons[0][0])
    with hexfast.open_slide(cmu_small) as slide:
        grid = hexfast.tile_slide(slide, min_tissue=0.0)
    inside = a.contains_squares(grid.coords, grid.tile_size)
    assert inside.sum() == b.contains_squares(grid.coords, grid.tile_size).sum() > 40


# ---------------------------------------------------------------------------- 8. a manifest edited by hand


def edit_manifest(bundle: Path, edit) -> Path:
    from test_trust import relist

    relist(bundle, edit)
    return bundle / "manifest.json"


@pytest.mark.parametrize("case, fragment", [
    ("h_path-width", "models.mica.inputs.h_path.shape [\"tiles\", \"x\"] needs a positive whole number at position 1"),
    ("shape-int", "models.hex.outputs.markers.shape must be a list"),
    ("outputs-string", "models.hex.outputs must be an object"),
    ("spec-list", "models.mica.inputs.h_codex must be an object"),
    ("zero-dim", "models.codex_encoder.outputs.features.shape must be a list of sizes"),
    ("dtype-number", "models.hex.inputs.tiles.dtype must be a type name"),
])
def test_a_hand_edited_manifest_is_one_line_naming_it(case, fragment, tmp_path, cmu_small):
    from test_trust import error_line

    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)

    def edit(m):
        models = m["models"]
        if case == "h_path-width":
            models["mica"]["inputs"]["h_path"]["shape"] = ["tiles", "x"]
        elif case == "shape-int":
            models["hex"]["outputs"]["markers"]["shape"] = 40
        elif case == "outputs-string":
            models["hex"]["outputs"] = "markers"
        elif case == "spec-list":
            models["mica"]["inputs"]["h_codex"] = [40, 384]
        elif case == "zero-dim":
            models["codex_encoder"]["outputs"]["features"]["shape"] = [40, 0]
        else:
            models["hex"]["inputs"]["tiles"]["dtype"] = 8

    manifest = edit_manifest(bundle, edit)
    for args in (["score", cmu_small, "--model", bundle, "-o", tmp_path / "out"], ["build-engines", bundle]):
        r = hexfast_cli(*args)
        line = error_line(r, str(manifest), fragment)
        assert "internal error" not in line


def test_the_torch_refusal_names_the_bundle_and_the_file(tmp_path, cmu_small):
    from test_trust import error_line, without_programs

    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    without_programs(bundle)
    r = hexfast_cli("score", cmu_small, "--model", bundle, "--backend", "torch", "-o", tmp_path / "out")
    error_line(r, f"{bundle / 'manifest.json'} lists none for hex.onnx", "never loaded")


# ---------------------------------------------------------------------------- 9. a closed pipe is a normal end


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_info_into_a_closed_pipe_exits_0_quietly(json_flag, cmu_small, fixture_slide):
    read, write = os.pipe()
    os.close(read)  # `| head -1` that has already exited: every write meets EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "hexfast", "info", *json_flag, cmu_small,
                               fixture_slide("small.svs"), cmu_small], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 0 and proc.stderr == "", (proc.returncode, proc.stderr)


def test_info_piped_to_head_exits_0(cmu_small, fixture_slide):
    slides = " ".join(f"'{p}'" for p in [cmu_small, fixture_slide("small.svs")] * 200)
    r = subprocess.run(["bash", "-c", f"set -o pipefail; '{sys.executable}' -m hexfast info {slides} | head -1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stderr == "" and r.stdout.count("\n") == 1, (r.returncode, r.stderr)


# ---------------------------------------------------------------------------- also seen


@pytest.mark.parametrize("cut", [10_000, 800_000, 1_400_000, 1_900_000])
def test_a_truncated_svs_says_it_is_truncated(cut, tmp_path, cmu_small):
    from hexfast.watch.watcher import _open_problem

    slide = tmp_path / "cut.svs"
    slide.write_bytes(cmu_small.read_bytes()[:cut])
    problem = _open_problem(slide)  # what the watcher quarantines it with
    assert problem.startswith("is truncated:") and f"{cut:,}-byte file" in problem, problem
    r = hexfast_cli("score", slide, "-o", tmp_path / "out")
    assert r.returncode == 2 and "is truncated" in r.stderr and "Traceback" not in r.stderr


def test_an_image_cut_inside_its_data_says_so(tmp_path):
    import tifffile

    slide = tmp_path / "cut.tif"
    rgb = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), np.uint8)
    tifffile.imwrite(slide, rgb, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER", metadata=None)
    with tifffile.TiffFile(slide) as tif:
        page = tif.pages.first
        assert page.offset < min(page.dataoffsets)  # the directory before the data: a cut leaves it whole
    slide.write_bytes(slide.read_bytes()[:-100_000])
    with pytest.raises(hexfast.SlideError, match="is truncated: its image data runs to byte"):
        hexfast.open_slide(slide)


def test_a_refused_run_leaves_no_empty_output_folder(tmp_path, cmu_small):
    r = hexfast_cli("score", tmp_path / "nonexistent.svs", cwd=tmp_path)
    assert r.returncode == 2 and not (tmp_path / "hexfast-out").exists()
    r = hexfast_cli("score", cmu_small, "--region", "nan,0,1,1", "-o", tmp_path / "o2")
    assert r.returncode == 2 and not (tmp_path / "o2").exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    r = hexfast_cli("score", tmp_path / "nonexistent.svs", "-o", existing)
    assert r.returncode == 2 and existing.is_dir()  # a folder the user made stays


class Payload:
    """What a booby-trapped checkpoint pickles beside its tensors (its reduce would run a command)."""


def test_a_pickle_checkpoint_is_refused_without_suggesting_to_trust_it(tmp_path):
    torch = pytest.importorskip("torch")
    from hexfast_export.checkpoints import CheckpointError, read_state_dict

    evil = tmp_path / "hex_heads.pth"
    torch.save({"model": Payload(), "head.weight": torch.zeros(2)}, evil)
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(evil)
    text = str(caught.value)
    assert text.startswith(f"{evil}: holds Python objects") and "Payload" in text and "refuses it" in text
    assert "weights_only" not in text and "trust the source" not in text and "\n" not in text
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(junk)
    assert "not a torch checkpoint" in str(caught.value) and "weights_only" not in str(caught.value)
