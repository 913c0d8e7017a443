"""Micro-batching by adapter, bounded by size and linger time. Pure logic, no I/O.

Jobs wait in one group per adapter. A micro-batch is due when `max_batch_size` jobs wait or the
oldest has lingered `linger_s`; it is then filled oldest group first and handed to the engine
as one `generate` call with the jobs of each adapter side by side. One call with several
adapters beats one call per adapter on vLLM (its scheduler already admits up to `max_loras`
adapters per step, and larger batches keep it busy); grouping keeps each call's adapter set small.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class Batchable(Protocol):
    @property
    def adapter_key(self) -> Hashable: ...

    @property
    def arrived_at(self) -> float: ...


T = TypeVar("T", bound=Batchable)


@dataclass
class AdapterBatcher(Generic[T]):
    max_batch_size: int
    linger_s: float
    # Insertion order of the groups is the order their oldest job arrived.
    _groups: OrderedDict[Hashable, list[T]] = field(default_factory=OrderedDict)
    _size: int = 0

    def __len__(self) -> int:
        return self._size

    def add(self, item: T) -> None:
        self._groups.setdefault(item.adapter_key, []).append(item)
        self._size += 1

    def pending_keys(self) -> set[Hashable]:
        return set(self._groups)

    def oldest_arrival(self) -> float | None:
        return min((group[0].arrived_at for group in self._groups.values()), default=None)

    def seconds_until_due(self, now: float) -> float | None:
        """None when nothing waits; 0 when a batch is due now."""
        oldest = self.oldest_arrival()
        if oldest is None:
            return None
        if self._size >= self.max_batch_size:
            return 0.0
        return max(0.0, oldest + self.linger_s - now)

    def next_batch(self, now: float, *, flush: bool = False) -> list[T]:
        """The next due micro-batch (empty when none is due); `flush` ignores the linger time."""
        due = self.seconds_until_due(now)
        if due is None or (due > 0 and not flush):
            return []
        batch: list[T] = []
        for key in sorted(self._groups, key=lambda k: self._groups[k][0].arrived_at):
            room = self.max_batch_size - len(batch)
            if room == 0:
                break
            group = self._groups[key]
            batch.extend(group[:room])
            del group[:room]
            if not group:
                del self._groups[key]
        self._size -= len(batch)
        return batch

    def discard(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove and return the waiting items matching `predicate` (e.g. revoked partitions)."""
        removed: list[T] = []
        for key in list(self._groups):
            kept = [item for item in self._groups[key] if not predicate(item)]
            removed.extend(item for item in self._groups[key] if predicate(item))
            if kept:
                self._groups[key] = kept
            else:
                del self._groups[key]
        self._size -= len(removed)
        return removed
