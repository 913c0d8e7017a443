"""The adapter cache reloads an evicted version only with the files it was accepted with
(plain data: a recording engine, adapter copies in a temp directory)."""

from __future__ import annotations

from pathlib import Path

from tests.unit.adapter_fixtures import copy_adapter
from workers.adapters.cache import AdapterCache
from workers.adapters.checks import adapter_digest
from workers.core.engine_api import AdapterHandle


class EvictingEngine:
    """Holds nothing resident, as if every adapter had been evicted."""

    def __init__(self) -> None:
        self.loads: list[str] = []

    def resident_adapters(self) -> set[int]:
        return set()

    def register_adapter(self, adapter: AdapterHandle) -> None:
        self.loads.append(adapter.engine_name)


def test_a_reload_checks_the_files_against_their_checksum(tmp_path: Path) -> None:
    good = copy_adapter(tmp_path, "classifier", "good")
    changed = copy_adapter(tmp_path, "customer-tone", "changed")
    accepted = adapter_digest(changed)
    (changed / "adapter_config.json").write_text('{"r": 8, "tampered": true}')
    engine = EvictingEngine()
    cache = AdapterCache(engine)  # type: ignore[arg-type]
    handles = [
        AdapterHandle("good", "1", str(good), 1, adapter_digest(good)),
        AdapterHandle("changed", "1", str(changed), 2, accepted),
        AdapterHandle("gone", "1", str(tmp_path / "missing"), 3, accepted),
    ]
    unavailable = cache.ensure_loaded(handles)
    assert engine.loads == [handles[0].engine_name]
    assert sorted(unavailable) == [2, 3]
    assert "checksum_mismatch" in unavailable[2]
    assert cache.stats.misses == 3 and cache.stats.loads == 1
