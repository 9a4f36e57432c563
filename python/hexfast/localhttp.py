"""The base of hexfast's two local web servers (`hexfast view`, `hexfast watch --http`).

They serve patient data on a loopback port, so any web page open in the pathologist's browser could
reach them through DNS rebinding (evil.example.com resolved to 127.0.0.1): the browser then sends
`Host: evil.example.com`. A request is answered only when its Host (and an absolute-form target's
authority) names the address the server listens on: 127.0.0.1, localhost or [::1] with the server's
port, or the bound address itself. Anything else gets 421, as Jupyter and other local servers do. An
HTTP/1.0 request without Host is answered: a browser always sends one.

Each connection gets `IDLE_TIMEOUT` seconds per read or write, and at most `MAX_CONNECTIONS` are served
at once: more wait in the listen queue, so a flood of half-open connections holds a bounded number of
threads, each for a bounded time.
"""

from __future__ import annotations

import ipaddress
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
IDLE_TIMEOUT = 20.0
MAX_CONNECTIONS = 32


class LocalServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # connections beyond MAX_CONNECTIONS wait here, not in threads
    max_connections = MAX_CONNECTIONS
    idle_timeout = IDLE_TIMEOUT

    def __init__(self, address: tuple[str, int], handler: type[LocalHandler]):
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._closing = threading.Event()
        super().__init__(address, handler)

    def allowed_host(self, host: str | None) -> bool:
        """Whether a Host header (or an absolute-form target's authority) names this server."""
        if host is None:
            return False
        name, _, port = host.strip().lower().rpartition(":")
        if not name or not port.isdigit() or int(port) != self.server_address[1]:
            return False
        bound = self.server_address[0]
        if name in LOOPBACK_NAMES or name == _bracketed(bound):
            return True
        return _wildcard(bound) and _ip_literal(name)  # a page's own URL never names an IP of ours by chance

    def process_request(self, request, client_address) -> None:
        while not self._slots.acquire(timeout=0.2):
            if self._closing.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown(self) -> None:
        self._closing.set()
        super().shutdown()


class LocalHandler(BaseHTTPRequestHandler):
    """Subclasses implement `get(path, query)`; the Host check has already passed when it runs."""

    server: LocalServer
    timeout = IDLE_TIMEOUT

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout
        super().setup()

    def log_message(self, *args) -> None:  # quiet: the terminal shows the URL, not every request
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        target = urlsplit(self.path)
        host = self.headers.get("Host")
        if target.scheme or target.netloc:  # absolute form: its authority must name us too
            if target.scheme != "http" or not self.server.allowed_host(target.netloc):
                return self.refuse()
        elif host is None and self.request_version == "HTTP/1.0":
            pass
        elif not self.server.allowed_host(host):
            return self.refuse()
        try:
            self.get(target.path or "/", target.query)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # the client went away
            self.close_connection = True

    def get(self, path: str, query: str) -> None:
        raise NotImplementedError

    def refuse(self) -> None:
        self.send(b"misdirected request: this server answers only to the address it listens on\n",
                  "text/plain", status=421)

    def send(self, body: bytes, kind: str, status: int = 200, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.end_headers()
        self.wfile.write(body)


def _bracketed(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _wildcard(address: str) -> bool:
    return address in ("", "0.0.0.0", "::")


def _ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True
