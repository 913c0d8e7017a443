"""Engine processes never outlive their worker, however it dies.

vLLM runs its engine in child processes (`VLLM::EngineCore` and its workers, about 3.4 GB each
for the zoo model) and nothing in vLLM 0.32 watches the parent: a worker killed with SIGKILL, or
one that leaves through `os._exit`, leaves them running as orphans. So each engine start spawns
a small reaper in a session of its own: it polls the worker, and when the worker is gone it
kills the engine's process tree, then exits. It also exits once the engine's processes are all
gone (an engine restart starts a new reaper for the new processes).

Run as `python -m workers.engine.reaper WORKER_PID PID...`.
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

POLL_S = 0.5


def watch_engine(worker_pid: int, engine_pids: list[int]) -> subprocess.Popen[bytes] | None:
    """Start a reaper for these engine processes of `worker_pid`; None if there are none."""
    if not engine_pids:
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "workers.engine.reaper", str(worker_pid), *map(str, engine_pids)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        # Its own session: signals aimed at the worker's process group do not reach it.
        start_new_session=True,
    )


def _processes(pids: list[int]) -> list[psutil.Process]:
    found: list[psutil.Process] = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return found


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


def _alive(process: psutil.Process) -> bool:
    # is_running() compares the start time too: a reused pid is not the process we watch.
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reap(worker_pid: int, engine_pids: list[int]) -> int:
    workers = _processes([worker_pid])
    engines = _processes(engine_pids)
    while True:
        engines = [p for p in engines if _alive(p)]
        if not engines:
            return 0  # the worker closed its engine, or restarted it with a new reaper
        if not any(_alive(w) for w in workers):
            _kill_trees(engines)
            print(f"reaper: worker {worker_pid} is gone; killed its engine", file=sys.stderr)
            return 0
        time.sleep(POLL_S)


if __name__ == "__main__":
    try:
        sys.exit(reap(int(sys.argv[1]), [int(pid) for pid in sys.argv[2:]]))
    except (IndexError, ValueError):
        sys.exit("usage: python -m workers.engine.reaper WORKER_PID PID...")
