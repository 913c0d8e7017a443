"""A second engine, started in the background and kept idle, taken in place of a restart.

A restart after an engine death spends nearly all its time starting processes: on the CPU
backend with the zoo model, vLLM's engine-core and worker processes each import vLLM and torch
afresh (about 12 s together), while loading the weights and the KV cache takes under half a
second. Meanwhile every job waits. With a standby ready, an engine death costs registering the
adapters on it, and the next standby starts in the background.

The price is a second engine's memory. `auto` (`engine.standby`) keeps one on the CPU backend
only, and only when the host has the memory free for it once the first engine runs: on a GPU
two engines rarely fit, and the second would need `gpu_memory_utilization` split between them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import structlog

from workers import metrics

if TYPE_CHECKING:
    from vllm import LLM

log = structlog.get_logger(__name__)

# Free memory a standby needs under `auto`, as a multiple of the running engine's processes.
AUTO_HEADROOM = 1.5
# How often a standby waiting for a quiet engine looks again.
QUIET_POLL_S = 0.5


def shut_down(llm: LLM) -> None:
    """Stop an engine's processes at once: nothing of ours is in flight by then."""
    engine_core = getattr(llm.llm_engine, "engine_core", None)
    if engine_core is not None and hasattr(engine_core, "shutdown"):
        # A graceful teardown of the CPU executor takes about 4.6 s here and ends in a kill
        # anyway; vLLM's run_batch kills at once too.
        engine_core.shutdown(timeout=0)


def is_dead(llm: LLM) -> bool:
    resources = getattr(llm.llm_engine.engine_core, "resources", None)
    return bool(getattr(resources, "engine_dead", False))


def engine_footprint_bytes(exclude: set[int]) -> int:
    """Resident memory of this process's children (the engine's processes), but `exclude`."""
    total = 0
    for child in psutil.Process().children(recursive=True):
        if child.pid in exclude:
            continue
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def free_memory_bytes(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The host's available memory, or less if this process's cgroup (a container's memory
    limit) leaves less."""
    available = psutil.virtual_memory().available
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        used = int((cgroup / "memory.current").read_text())
    except (OSError, ValueError):
        return available
    if not limit.isdigit():  # "max": no limit
        return available
    return min(available, max(int(limit) - used, 0))


def room_for_another(footprint: int) -> tuple[bool, int]:
    """Whether free memory holds another engine of `footprint` bytes, with headroom; and that
    free memory."""
    available = free_memory_bytes()
    return available >= AUTO_HEADROOM * footprint, available


class Standby:
    """One engine started by `start` on a thread of its own, handed over by `take`."""

    def __init__(self, start: Callable[[], LLM], quiet: Callable[[], bool] = lambda: True) -> None:
        self._start = start
        self._quiet = quiet
        self._lock = threading.Lock()
        self._ready: LLM | None = None
        self._thread: threading.Thread | None = None
        self._needed = threading.Event()
        self._closed = False

    def prepare(self, within_s: float = 0.0) -> None:
        """Start a standby in the background unless one is ready or starting: once `quiet()`
        (the serving engine idle: on the CPU backend a start takes a core from it for 13 s or
        more), `within_s` seconds from now at the latest, or at once when taken."""
        with self._lock:
            starting = self._thread is not None and self._thread.is_alive()
            if self._closed or starting or self._ready is not None:
                return
            self._needed.clear()
            self._thread = threading.Thread(
                target=self._run,
                args=(time.monotonic() + within_s,),
                name="engine-standby",
                daemon=True,
            )
            self._thread.start()

    def _run(self, deadline: float) -> None:
        while time.monotonic() < deadline and not self._needed.is_set():
            if self._closed or self._quiet():
                break
            self._needed.wait(QUIET_POLL_S)
        if self._closed:
            return
        started = time.monotonic()
        try:
            llm = self._start()
        except Exception as exc:  # the worker serves on; the next restart starts cold
            log.warning("engine_standby_failed", error=f"{type(exc).__name__}: {exc}")
            return
        with self._lock:
            if not self._closed:
                self._ready = llm
                llm = None
                metrics.ENGINE_STANDBY.set(1)
        if llm is not None:
            shut_down(llm)
            return
        log.info("engine_standby_ready", start_s=round(time.monotonic() - started, 1))

    def take(self) -> LLM | None:
        """The standby, waiting for one still starting (it is nearer than a cold start); None
        if there is none, or it died meanwhile."""
        thread = self._thread
        if thread is not None:
            self._needed.set()
            thread.join()
        with self._lock:
            llm, self._ready = self._ready, None
            metrics.ENGINE_STANDBY.set(0)
        if llm is not None and is_dead(llm):
            log.warning("engine_standby_dead")
            shut_down(llm)
            return None
        return llm

    @property
    def starting(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def close(self) -> None:
        """Stop the standby. One still starting stops itself once started, or with the worker:
        the reaper (`workers.engine.reaper`) kills its processes when the worker is gone."""
        with self._lock:
            self._closed = True
            llm, self._ready = self._ready, None
            metrics.ENGINE_STANDBY.set(0)
        self._needed.set()
        if llm is not None:
            shut_down(llm)
