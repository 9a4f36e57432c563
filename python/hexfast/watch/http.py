"""The watcher's status over HTTP, for a vendor's software to poll (127.0.0.1 unless told otherwise).

    GET /health   {"ok": true, "state": "scoring" | "idle" | ..., "slide": the one being scored, "uptime_s"}
    GET /status   the whole status (counts, queue, running, last results, quarantined)
    GET /queue    the queued slides, in the order they will be scored
    GET /last     the last results (done and failed)
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StatusServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, watcher, host: str = "127.0.0.1", port: int = 0):
        self.watcher = watcher
        super().__init__((host, port), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, name="hexfast-watch-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> StatusServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(5)


class _Handler(BaseHTTPRequestHandler):
    server: StatusServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        status = self.server.watcher.status()
        routes = {
            "/health": lambda: {"ok": status["state"] not in ("stopped",), "state": status["state"],
                                "slide": status["slide"], "uptime_s": status["uptime_s"], "counts": status["counts"]},
            "/status": lambda: status,
            "/queue": lambda: status["queue"],
            "/last": lambda: status["last"],
        }
        route = routes.get(self.path.split("?")[0].rstrip("/") or "/health")
        body = json.dumps(route() if route else {"error": "not found", "routes": sorted(routes)}).encode()
        self.send_response(200 if route else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
