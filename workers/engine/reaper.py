"""Engine processes never outlive their worker, however it dies.

vLLM runs its engine in child processes (`VLLM::EngineCore` and its workers, about 3 GB each for
the zoo model) and nothing in vLLM 0.32 watches the parent: a worker killed with SIGKILL, or one
that leaves through `os._exit`, leaves them running as orphans. So the engine, before it starts,
spawns a small reaper in a session of its own. While the worker lives, the reaper notes every
process the worker starts (engine restarts and standbys included); once the worker is gone, it
kills those process trees, and every process marked as the worker's, and exits. The mark is an
environment variable every process started after `watch_worker` inherits: a process started
between two of the reaper's looks (a standby's engine starting as the worker is killed) is
found by it. The engine stops the reaper on a normal close.

Run as `python -m workers.engine.reaper WORKER_PID`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

POLL_S = 0.5
# Set in the worker, inherited by the engine processes it starts: whose they are.
OWNER_VARIABLE = "_LW_ENGINE_OWNER_PID"  # not LORA_WORKERS_*: settings refuse unknown ones


def watch_worker(worker_pid: int) -> subprocess.Popen[bytes]:
    """Start a reaper for everything `worker_pid` starts from now on."""
    os.environ[OWNER_VARIABLE] = str(worker_pid)  # a process marker, not a setting
    return subprocess.Popen(
        [sys.executable, "-m", "workers.engine.reaper", str(worker_pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        # Its own session: signals aimed at the worker's process group do not reach it.
        start_new_session=True,
    )


def _alive(process: psutil.Process) -> bool:
    # is_running() compares the start time too: a reused pid is not the process we watch.
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_trees(roots: list[psutil.Process]) -> None:
    victims: list[psutil.Process] = []
    for root in roots:
        try:
            victims.extend([root, *root.children(recursive=True)])
        except psutil.NoSuchProcess:
            continue
    for victim in victims:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(victims, timeout=10)


def _marked(worker_pid: int) -> list[psutil.Process]:
    """Living processes whose environment names `worker_pid` as their owner."""
    owner = str(worker_pid)
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(OWNER_VARIABLE) == owner and _alive(process):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def reap(worker_pid: int) -> int:
    try:
        worker = psutil.Process(worker_pid)
    except psutil.NoSuchProcess:
        return 0
    me = os.getpid()
    started: dict[int, psutil.Process] = {}
    while _alive(worker):
        # Noted while the worker lives: once it is gone they are reparented, no longer its own.
        try:
            for child in worker.children(recursive=True):
                if child.pid != me:
                    started.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        started = {pid: p for pid, p in started.items() if _alive(p)}
        time.sleep(POLL_S)
    orphans = [p for p in started.values() if _alive(p)]
    orphans += [p for p in _marked(worker_pid) if p.pid != me and p.pid not in started]
    if orphans:
        _kill_trees(orphans)
        print(
            f"reaper: worker {worker_pid} is gone; killed {len(orphans)} processes", file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(reap(int(sys.argv[1])))
    except (IndexError, ValueError):
        sys.exit("usage: python -m workers.engine.reaper WORKER_PID")
