import os
import socket
import subprocess
import sys

import pytest


def lora_workers(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--max-jobs", "0"],
        ["run", "--idle-exit", "soon"],
        ["frobnicate"],
        ["publish", "jobs.jsonl"],  # --topic missing
        ["run", "--metrics-port", "99999"],
        ["run", "--metrics-port", "http"],
        ["--log-level", "LOUD", "results"],
        ["bulk", "--input", "a.jsonl", "--output", "out", "--run-id", "../escape"],
        ["bulk", "--input", "a.jsonl", "--output", "out", "--rows-per-file", "-5"],
    ],
)
def test_bad_arguments_exit_non_zero_with_one_line(args: list[str]) -> None:
    completed = lora_workers(*args)
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("lora-workers")


def test_missing_bootstrap_servers_is_one_readable_line() -> None:
    completed = lora_workers("topics", "create", env={"PATH": "/usr/bin:/bin"})
    assert completed.returncode == 2
    assert completed.stderr.strip() == (
        "lora-workers: error: no Kafka bootstrap servers: "
        "pass --bootstrap-servers or set KAFKA_BOOTSTRAP_SERVERS"
    )


def test_unreadable_publish_file(tmp_path) -> None:
    completed = lora_workers(
        "--bootstrap-servers", "127.0.0.1:1", "publish", "--topic", "t", str(tmp_path / "nope")
    )
    assert completed.returncode == 2
    assert "cannot read" in completed.stderr and len(completed.stderr.strip().splitlines()) == 1


def test_a_metrics_port_in_use_is_one_line_before_the_engine_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
        completed = lora_workers("run", "--metrics-port", str(port), env=env)
    assert completed.returncode == 1
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use" in lines[0], completed.stderr


def test_a_bulk_output_that_is_a_file_is_one_line(tmp_path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"job_id": "a", "task": "classify", "input": "x"}\n')
    output = tmp_path / "taken"
    output.write_text("not a directory")
    completed = lora_workers("bulk", "--input", str(jobs), "--output", str(output))
    assert completed.returncode == 2
    assert (
        completed.stderr.strip()
        == f"lora-workers: error: output {output} exists and is not a directory"
    )
