"""The CLI as a user runs it: `python -m workers ...` in a process of its own, with none of the
caller's LORA_WORKERS_* settings or broker address leaking in."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def clean_environment(**extra: str) -> dict[str, str]:
    kept = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("LORA_WORKERS_") and key != "KAFKA_BOOTSTRAP_SERVERS"
    }
    return {**kept, **extra}


def run_cli(
    args: Sequence[str], cwd: Path, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        cwd=cwd,
        env=clean_environment(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
