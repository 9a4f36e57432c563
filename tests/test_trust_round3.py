"""Trust, round 3 (issue 23): no foreign web page reaches a slide, no rerun destroys a good result, no bad
bag or region gives a silent answer. Each numbered section is one case of the issue."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

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
