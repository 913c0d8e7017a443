"""A small HTTP endpoint in front of lora-workers: POST a job, get its answer back.

    python examples/http_endpoint.py --config lora-workers.yaml --port 8080
    curl -s localhost:8080/jobs -d '{"job_id": "j-1", "task": "classify", "input": "..."}'

200 with the result; 422 with the reason code when the job was dead-lettered; 400 for a job
that is not valid or of no pipeline's task; 504 when no answer came within --timeout. One
`Client` (one producer, one consumer) serves every request; stdlib only besides lora-workers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pydantic import ValidationError

from workers.client import Client, JobFailed
from workers.core.contracts import validation_details

MAX_BODY_BYTES = 1_000_000


def make_server(client: Client, host: str, port: int, timeout_s: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != "/jobs":
                self._send(HTTPStatus.NOT_FOUND, {"error": "POST /jobs"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
                return
            try:
                job = json.loads(self.rfile.read(length))
                handle = client.submit(job)
                result = handle.result(timeout_s)
            except (ValueError, TypeError) as exc:  # not JSON, or not a job
                detail = validation_details(exc) if isinstance(exc, ValidationError) else str(exc)
                self._send(HTTPStatus.BAD_REQUEST, {"error": detail})
            except JobFailed as failed:
                body = {"job_id": failed.job_id, "code": failed.code, "message": failed.message}
                self._send(HTTPStatus.UNPROCESSABLE_ENTITY, body)
            except TimeoutError:
                self._send(HTTPStatus.GATEWAY_TIMEOUT, {"error": f"no answer in {timeout_s} s"})
            else:
                self._send(HTTPStatus.OK, result.model_dump(mode="json"))

        def _send(self, status: HTTPStatus, body: object) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the worker's log tells the story."""

    return ThreadingHTTPServer((host, port), Handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="lora-workers.yaml (default: as the CLI)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to await an answer")
    parser.add_argument("--reply-to", help="a reply topic of this service's own (must exist)")
    args = parser.parse_args()
    with Client(args.config, reply_to=args.reply_to) as client:
        server = make_server(client, args.host, args.port, args.timeout)
        print(f"listening on http://{args.host}:{server.server_port}/jobs", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()


if __name__ == "__main__":
    main()
