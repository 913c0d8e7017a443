"""Adapter maintenance, on the engine loop's thread between engine steps (the loop owns the
engine): apply what arrived on the update topic, then unload versions an update replaced once
no job holds them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from workers.adapters.cache import AdapterCache
from workers.adapters.feed import AdapterUpdateFeed
from workers.adapters.registry import AdapterRegistry
from workers.adapters.updates import UpdateRecord
from workers.core.engine_api import EngineDied
from workers.engine.loop import EngineLoop

UPDATES_INTERVAL_S = 0.1


class AdapterMaintenance:
    def __init__(
        self,
        updates: AdapterUpdateFeed,
        registry: AdapterRegistry,
        cache: AdapterCache,
        loop: EngineLoop,
        routing: threading.Lock,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._updates = updates
        self._registry = registry
        self._cache = cache
        self._loop = loop
        # Held while jobs are routed and submitted: no version leaves the engine between a
        # job's routing and its submission.
        self._routing = routing
        self._clock = clock
        self._next_run = 0.0

    def between_steps(self) -> None:
        now = self._clock()
        if now < self._next_run:
            return
        self._next_run = now + UPDATES_INTERVAL_S
        try:
            self._updates.follow(self._apply)
            with self._routing:
                released = self._registry.release_unused(
                    key for key in self._loop.holding() if isinstance(key, int)
                )
            if released:
                self._cache.refresh(unregistered=released)
        except EngineDied as death:
            self._loop.recover(death)

    def _apply(self, record: UpdateRecord) -> None:
        # The registry rejects a bad record itself, keeping what serves.
        self._registry.apply_record_surviving(record, self._loop.recover)

    def close(self) -> None:
        self._updates.close()
