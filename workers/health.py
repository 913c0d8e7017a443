"""The worker's HTTP endpoint (`run --metrics-port`): Prometheus metrics on `/metrics`,
liveness on `/healthz`, readiness on `/readyz`.

`/readyz` answers 200 only once the engine is up with the adapters' state read from the update
topic, and the consumer has joined its group (an assignment, even an empty one: a spare replica
with no partition to serve is ready, not broken); until then 503 with what is missing. An
orchestrator routes nothing to, and a compose healthcheck waits for, a worker that is not ready.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from workers import metrics


@dataclass
class Readiness:
    engine: bool = False  # engine started, adapters registered and the update topic read
    joined: bool = False  # the consumer is a member of its group, with or without partitions

    def missing(self) -> list[str]:
        gaps = []
        if not self.engine:
            gaps.append("engine and adapters starting")
        if not self.joined:
            gaps.append("not yet a member of the consumer group")
        return gaps

    def update(self, *, engine: bool | None = None, joined: bool | None = None) -> None:
        if engine is not None:
            self.engine = engine
        if joined is not None:
            self.joined = joined
        metrics.READY.set(0 if self.missing() else 1)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a line
        pass


StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def _text(start_response: StartResponse, status: str, body: str) -> Iterable[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [body.encode()]


def serve(port: int, readiness: Readiness) -> WSGIServer:
    """Serve on all interfaces from a daemon thread; raises OSError if the port is taken."""
    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return _text(start_response, "200 OK", "ok\n")
        if path == "/readyz":
            missing = readiness.missing()
            if missing:
                return _text(start_response, "503 Service Unavailable", "; ".join(missing) + "\n")
            return _text(start_response, "200 OK", "ready\n")
        return metrics_app(environ, start_response)

    server = make_server("", port, app, _ThreadingServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
