"""Calls that may never return (generate() on a wedged engine, a librdkafka call that ignores
its timeout) run on daemon threads: the caller waits on the Future with its own deadline, and
the process can still exit while such a call hangs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


def on_daemon_thread(call: Callable[[], T], name: str) -> Future[T]:
    """Start `call` on a daemon thread; its result or exception arrives in the Future."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(call())
        except BaseException as exc:  # handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
