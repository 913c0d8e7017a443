"""Killing a worker as the kernel's OOM killer or `kill -9` would, and checking it leaves no
process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

# The reaper polls every 0.5 s; killing the engine's process tree takes a moment more.
ORPHANS_GONE_WITHIN_S = 20.0
# An engine restart in progress (engine core gone, the next one not started yet) takes ~15 s.
ENGINE_SEEN_WITHIN_S = 60.0


def _tree_with_engine(worker: subprocess.Popen, log: Path | None) -> list[psutil.Process]:
    deadline = time.monotonic() + ENGINE_SEEN_WITHIN_S
    while True:
        tree = psutil.Process(worker.pid).children(recursive=True)
        names = []
        for process in tree:
            try:
                names.append(process.name())
            except psutil.NoSuchProcess:
                continue
        if any(name.startswith("VLLM::") for name in names):
            return tree
        tail = log.read_text()[-3000:] if log is not None else ""
        assert time.monotonic() < deadline, f"no engine process under the worker: {names}\n{tail}"
        time.sleep(0.2)


def kill_9_leaving_no_orphans(worker: subprocess.Popen, log: Path | None = None) -> None:
    """SIGKILL the worker process alone (not its process group), then require every process it
    had started, vLLM's engine included, to exit within seconds."""
    tree = _tree_with_engine(worker, log)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=60)
    _, alive = psutil.wait_procs(tree, timeout=ORPHANS_GONE_WITHIN_S)
    left = []
    for process in alive:
        try:
            left.append(f"{process.pid} {process.name()}")
            process.kill()  # a failing check must not leak gigabytes into the next test
        except psutil.NoSuchProcess:
            continue
    assert left == [], f"orphans {ORPHANS_GONE_WITHIN_S:.0f} s after kill -9: {left}"
