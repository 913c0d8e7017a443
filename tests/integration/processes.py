"""Killing a worker as the kernel's OOM killer or `kill -9` would, and checking it leaves no
process behind."""

from __future__ import annotations

import os
import signal
import subprocess

import psutil

# The reaper polls every 0.5 s; killing the engine's process tree takes a moment more.
ORPHANS_GONE_WITHIN_S = 20.0


def kill_9_leaving_no_orphans(worker: subprocess.Popen) -> None:
    """SIGKILL the worker process alone (not its process group), then require every process it
    had started, vLLM's engine included, to exit within seconds."""
    tree = psutil.Process(worker.pid).children(recursive=True)
    assert any(p.name().startswith("VLLM::") for p in tree), [p.name() for p in tree]
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
