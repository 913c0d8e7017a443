"""What the engine's adapter cache holds, so admission can prefer resident adapters and every
cold load happens (and is timed) before its first job enters the engine, not hidden in a step.

vLLM keeps up to `max_cpu_loras` adapters in its host cache (LRU, pinned ones exempt) and up to
`max_loras` of them in the active slots of a step. `list_loras()` reports the cache; comparing
it before and after a load counts evictions.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from workers import metrics
from workers.adapters.checks import adapter_digest
from workers.core.engine_api import AdapterHandle, AdapterLoadError, Engine, GenerationRequest
from workers.core.errors import AdapterError, AdapterRejected

log = structlog.get_logger(__name__)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0


class AdapterCache:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._resident: set[int] = engine.resident_adapters()
        self._names: dict[int, str] = {}  # LoRA id -> adapter name, for per-adapter metrics
        self.stats = CacheStats()

    def is_resident(self, lora_id: object) -> bool:
        # The base model (key None) needs no adapter from disk.
        return lora_id is None or lora_id in self._resident

    def ensure_loaded(self, adapters: Iterable[AdapterHandle | None]) -> dict[int, str]:
        """Count a hit or a miss per distinct adapter of an admission round; load the misses now,
        checking their files against the checksum they were accepted with. Returns the adapters
        that could not be loaded again (LoRA id: reason); the engine keeps serving the others."""
        unavailable: dict[int, str] = {}
        loaded = False
        for adapter in {a.lora_id: a for a in adapters if a is not None}.values():
            self._names[adapter.lora_id] = adapter.name
            if adapter.lora_id in self._resident:
                self.stats.hits += 1
                metrics.ADAPTER_CACHE.labels(adapter.name, "hit").inc()
                continue
            self.stats.misses += 1
            metrics.ADAPTER_CACHE.labels(adapter.name, "miss").inc()
            started = time.monotonic()
            try:
                self._reload(adapter)
            except (AdapterRejected, AdapterLoadError, OSError) as exc:
                log.error("adapter_reload_failed", adapter=adapter.engine_name, error=str(exc))
                unavailable[adapter.lora_id] = f"reloading {adapter.engine_name}: {exc}"
                continue
            elapsed = time.monotonic() - started
            loaded = True
            self.stats.loads += 1
            self.stats.load_seconds += elapsed
            metrics.ADAPTER_LOAD_SECONDS.labels(adapter.name).observe(elapsed)
            log.debug("adapter_cold_load", adapter=adapter.engine_name, load_ms=elapsed * 1000)
        if loaded or unavailable:
            # Only a load evicts (we load every adapter before its jobs enter the engine), and
            # asking the engine costs a round trip to its process, which waits for its step.
            self.refresh()
        return unavailable

    def _reload(self, adapter: AdapterHandle) -> None:
        if adapter.sha256 is not None:
            actual = adapter_digest(Path(adapter.path))
            if actual != adapter.sha256:
                raise AdapterRejected(
                    AdapterError.CHECKSUM_MISMATCH,
                    f"files changed since it was accepted: sha256 {actual}",
                )
        self._engine.register_adapter(adapter)

    def refresh(self, unregistered: Iterable[int] = ()) -> None:
        """Re-read the engine's cache; adapters that vanished without being unregistered were
        evicted."""
        now = self._engine.resident_adapters()
        evicted = self._resident - now - set(unregistered)
        self.stats.evictions += len(evicted)
        for lora_id in evicted:
            metrics.ADAPTER_CACHE.labels(self._names.get(lora_id, "unknown"), "eviction").inc()
        self._resident = now
        metrics.ADAPTERS_RESIDENT.set(len(now))

    def prewarm(self, adapters: list[AdapterHandle], prompt_token_ids: list[int]) -> None:
        """Load adapters and run one token through each, so first jobs find them warm."""
        if not adapters:
            return
        self.ensure_loaded(adapters)
        self._engine.generate(
            [GenerationRequest(prompt_token_ids, a, 1, 0.0, None) for a in adapters]
        )
        self.refresh()
        log.info("adapters_prewarmed", adapters=[a.engine_name for a in adapters])
