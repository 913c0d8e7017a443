"""The adapters a worker serves: loaded from the catalog, registered with the engine up front.

Every adapter is registered with the engine before any job may use it, because an unknown or bad
adapter inside `generate()` kills the vLLM engine, while `add_lora()` rejects it cleanly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import structlog

from workers.config import AdapterCatalog
from workers.engine import AdapterHandle, AdapterLoadError, Engine

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RejectedAdapter:
    name: str
    version: str
    reason: str


@dataclass
class AdapterRegistry:
    """Adapter name -> the version that serves it, for adapters the engine accepted."""

    serving: dict[str, AdapterHandle] = field(default_factory=dict)
    rejected: dict[str, RejectedAdapter] = field(default_factory=dict)
    # LoRA ids are never reused, so a later version can never be served stale weights.
    _next_lora_id: itertools.count = field(default_factory=lambda: itertools.count(1))

    def get(self, name: str) -> AdapterHandle | None:
        return self.serving.get(name)

    def register(self, engine: Engine, name: str, version: str, path: str) -> AdapterHandle | None:
        handle = AdapterHandle(name, version, path, next(self._next_lora_id))
        try:
            engine.register_adapter(handle)
        except AdapterLoadError as exc:
            self.rejected[name] = RejectedAdapter(name, version, str(exc))
            log.error("adapter_rejected", adapter=name, version=version, reason=str(exc))
            return None
        self.serving[name] = handle
        self.rejected.pop(name, None)
        log.info("adapter_registered", adapter=name, version=version, lora_id=handle.lora_id)
        return handle

    @classmethod
    def from_catalog(cls, catalog: AdapterCatalog, engine: Engine) -> AdapterRegistry:
        registry = cls()
        for entry in catalog.adapters:
            registry.register(engine, entry.name, entry.version, str(entry.path))
        return registry
