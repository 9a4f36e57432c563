"""The watcher's status over HTTP, for a vendor's software to poll (127.0.0.1 unless told otherwise).

    GET /health   {"ok": true, "state": "scoring" | "idle" | ..., "slide": the one being scored, "uptime_s"}
    GET /status   the whole status (counts, queue, running, last results, quarantined)
    GET /queue    the queued slides, in the order they will be scored
    GET /last     the last results (done and failed)

Requests that name another host than the one it listens on are refused (DNS rebinding: the status
holds slide paths), and connections are bounded in number and idle time (localhttp.py).
"""

from __future__ import annotations

import json
import threading

from ..localhttp import LocalHandler, LocalServer


class StatusServer(LocalServer):
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


class _Handler(LocalHandler):
    server: StatusServer

    def get(self, path: str, query: str) -> None:
        status = self.server.watcher.status()
        routes = {
            "/health": lambda: {"ok": status["state"] not in ("stopped",), "state": status["state"],
                                "slide": status["slide"], "uptime_s": status["uptime_s"], "counts": status["counts"]},
            "/status": lambda: status,
            "/queue": lambda: status["queue"],
            "/last": lambda: status["last"],
        }
        route = routes.get(path.rstrip("/") or "/health")
        body = json.dumps(route() if route else {"error": "not found", "routes": sorted(routes)}).encode()
        self.send(body, "application/json", status=200 if route else 404)
