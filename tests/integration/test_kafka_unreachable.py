"""Every command that talks to Kafka, pointed at a cluster it cannot use, ends within 20 s with
one line on stderr naming the bootstrap servers and the cause, and nothing from librdkafka."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.cli_process import clean_environment

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 20.0


def commands(tmp_path: Path) -> dict[str, list[str]]:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"job_id": "a", "task": "classify", "input": "x"}\n')
    adapter = ROOT / "models" / "adapters" / "classifier"
    return {
        "publish": ["publish", "--topic", "jobs.classify", str(jobs)],
        "results": ["results"],
        "topics create": ["topics", "create"],
        "adapters list": ["adapters", "list"],
        "adapters publish": [
            "adapters",
            "publish",
            adapter.name,
            "--version",
            "v9",
            "--path",
            str(adapter),
        ],
        "run": ["run", "--idle-exit", "5"],
    }


@pytest.fixture
def not_kafka() -> Iterator[str]:
    """A resolvable host with something listening that does not speak Kafka."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            accepted.append(connection)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield f"localhost:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


def run_all(
    bootstrap: str, tmp_path: Path
) -> dict[str, tuple[subprocess.CompletedProcess[str], float]]:
    """Every command at once (they mostly wait), each timed."""
    started: dict[str, tuple[subprocess.Popen[str], float]] = {}
    for name, args in commands(tmp_path).items():
        process = subprocess.Popen(
            [sys.executable, "-m", "workers", "--bootstrap-servers", bootstrap, *args],
            cwd=ROOT,
            env=clean_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started[name] = (process, time.monotonic())
    finished = {}
    for name, (process, at) in started.items():
        stdout, stderr = process.communicate(timeout=120)
        elapsed = time.monotonic() - at
        finished[name] = (
            subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr),
            elapsed,
        )
    return finished


def assert_one_line_each(
    finished: dict[str, tuple[subprocess.CompletedProcess[str], float]], bootstrap: str, cause: str
) -> None:
    for name, (completed, elapsed) in finished.items():
        lines = completed.stderr.strip().splitlines()
        assert completed.returncode != 0, (name, completed.stderr)
        assert not re.search(r"%\d\|", completed.stderr), (name, completed.stderr)
        assert len(lines) == 1, (name, completed.stderr)
        assert lines[0].startswith(f"lora-workers: error: cannot use Kafka at {bootstrap}: {cause}")
        # Measured from the start, on a shared machine: the probe itself gives up after 10 s.
        assert elapsed < DEADLINE_S, (name, elapsed)


def test_an_unreachable_broker_is_one_line_from_every_command(tmp_path: Path) -> None:
    assert_one_line_each(run_all("127.0.0.1:1", tmp_path), "127.0.0.1:1", "connection refused")


def test_a_host_that_is_not_a_broker_is_one_line_from_every_command(
    tmp_path: Path, not_kafka: str
) -> None:
    assert_one_line_each(run_all(not_kafka, tmp_path), not_kafka, "connection failed")
