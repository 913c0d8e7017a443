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
