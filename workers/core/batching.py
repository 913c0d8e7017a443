"""Micro-batching by adapter, bounded by size and linger time. Pure logic, no I/O.

Jobs wait in one group per adapter. A micro-batch is due when `max_batch_size` jobs wait or the
oldest has lingered `linger_s`. It then runs as one `generate` call.

Which jobs make the batch is the policy:
- `switch_aware` (default): at most `max_adapters` groups per batch (the engine's adapter
  slots, so vLLM never cycles adapters inside a call), chosen overdue groups first (no job waits
  longer than `max_wait_s`), then adapters already resident in the engine, then larger groups.
  Fewer cold loads and fuller per-adapter batches; FINDINGS.md shows vLLM already groups within
  one call, so the win has to come from there.
- `arrival`: plain arrival order, `max_batch_size` at a time (the baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, Protocol, TypeVar


class Batchable(Protocol):
    @property
    def adapter_key(self) -> Hashable: ...

    @property
    def arrived_at(self) -> float: ...


T = TypeVar("T", bound=Batchable)


class BatchPolicy(StrEnum):
    SWITCH_AWARE = "switch_aware"
    ARRIVAL = "arrival"


def _always_resident(_key: Hashable) -> bool:
    return True


@dataclass
class AdapterBatcher(Generic[T]):
    max_batch_size: int
    linger_s: float
    policy: BatchPolicy = BatchPolicy.SWITCH_AWARE
    max_adapters: int | None = None  # per batch; None = no limit
    max_wait_s: float = 30.0  # starvation bound for switch-aware selection
    is_resident: Callable[[Hashable], bool] = _always_resident
    _groups: dict[Hashable, list[T]] = field(default_factory=dict)
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
        if self.policy is BatchPolicy.ARRIVAL:
            batch = self._take_in_arrival_order()
        else:
            batch = self._take_groups(self._switch_aware_order(now))
        self._size -= len(batch)
        return batch

    def _switch_aware_order(self, now: float) -> list[Hashable]:
        def rank(key: Hashable) -> tuple[bool, bool, int, float]:
            group = self._groups[key]
            overdue = now - group[0].arrived_at >= self.max_wait_s
            # Overdue first (oldest first among them), then resident, then larger groups.
            return (
                not overdue,
                not self.is_resident(key),
                0 if overdue else -len(group),
                group[0].arrived_at,
            )

        return sorted(self._groups, key=rank)

    def _take_groups(self, order: list[Hashable]) -> list[T]:
        batch: list[T] = []
        for adapters, key in enumerate(order):
            room = self.max_batch_size - len(batch)
            if room == 0 or (self.max_adapters is not None and adapters >= self.max_adapters):
                break
            group = self._groups[key]
            batch.extend(group[:room])
            del group[:room]
            if not group:
                del self._groups[key]
        return batch

    def _take_in_arrival_order(self) -> list[T]:
        waiting = sorted(
            (item for group in self._groups.values() for item in group),
            key=lambda item: item.arrived_at,
        )
        batch = waiting[: self.max_batch_size]
        taken = {id(item) for item in batch}
        for key in list(self._groups):
            kept = [item for item in self._groups[key] if id(item) not in taken]
            if kept:
                self._groups[key] = kept
            else:
                del self._groups[key]
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
