"""Which waiting jobs enter the engine now. Pure logic, no I/O.

The engine loop (`workers.engine.loop`) keeps about `engine_depth` requests in vLLM (its
`max_num_seqs`): whenever requests finish, it asks `take` for that much room. Jobs wait here,
grouped by adapter, and the policy picks:

- `switch_aware` (default): jobs of at most `max_adapters` adapters (the engine's `max_loras`
  slots) are fed at a time, so vLLM never cycles adapters through its slots; the adapters are
  ranked overdue first (a job waited `max_wait_s`: no adapter starves), then those with requests
  in the engine, then those in the engine's host cache, then larger groups. An adapter in the
  engine that is not chosen gets no new jobs: its requests drain and its slot frees.
  Among the chosen adapters' jobs, tenants take turns by weighted fair queueing, so a tenant
  flooding a topic does not starve the others. Overdue jobs go first, in the same fair order
  among themselves (a flood's old backlog does not push a quiet tenant's overdue jobs back).
- `arrival`: plain arrival order (the baseline the benchmarks compare against).

Fair queueing (start-time): each tenant has a virtual time, the service it has received in jobs
divided by its weight; the waiting job of the tenant least served goes next, and the system's
virtual time is the start of the job taken last. A tenant back from idling starts at
max(its own virtual time, the system's): level with those being served, with no credit saved
while it had nothing waiting, and no debt from service it had long ago.

`take(..., slots=n)` bounds the distinct adapters in the engine (those with requests in it plus
those taken) at `n` whatever the policy: the engine loop's shadow runs wait for a free adapter
slot rather than exceed the engine's `max_loras`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, Protocol, TypeVar


class Admissible(Protocol):
    @property
    def adapter_key(self) -> Hashable: ...

    @property
    def arrived_at(self) -> float: ...

    @property
    def tenant(self) -> str | None: ...


T = TypeVar("T", bound=Admissible)


class AdmissionPolicy(StrEnum):
    SWITCH_AWARE = "switch_aware"
    ARRIVAL = "arrival"


def _always_resident(_key: Hashable) -> bool:
    return True


@dataclass
class _Group(Generic[T]):
    """One adapter's waiting jobs, per tenant in arrival order."""

    by_tenant: dict[str | None, deque[T]] = field(default_factory=dict)
    size: int = 0

    def oldest(self) -> float:
        return min(queue[0].arrived_at for queue in self.by_tenant.values())


@dataclass
class Admission(Generic[T]):
    policy: AdmissionPolicy = AdmissionPolicy.SWITCH_AWARE
    max_adapters: int | None = None  # adapters fed at once; None = no limit
    max_wait_s: float = 10.0  # starvation bound
    tenant_weights: Mapping[str, float] = field(default_factory=dict)  # default weight 1
    is_resident: Callable[[Hashable], bool] = _always_resident
    _groups: dict[Hashable, _Group[T]] = field(default_factory=dict)
    _waiting_per_tenant: dict[str | None, int] = field(default_factory=dict)
    # Service received per tenant, in admitted jobs divided by weight (virtual time).
    _virtual: dict[str | None, float] = field(default_factory=dict)
    _clock: float = 0.0  # the system's virtual time: the start of the job taken last
    _size: int = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[T]:
        for group in self._groups.values():
            for queue in group.by_tenant.values():
                yield from queue

    def waiting_per_adapter(self) -> dict[Hashable, int]:
        return {key: group.size for key, group in self._groups.items()}

    def oldest_arrival(self, besides: Hashable | None = None) -> float | None:
        """When the longest-waiting job of any adapter but `besides` arrived."""
        times = [group.oldest() for key, group in self._groups.items() if key != besides]
        return min(times, default=None)

    def peek(self, key: Hashable, count: int) -> list[T]:
        """Up to `count` of `key`'s waiting jobs, left waiting."""
        group = self._groups.get(key)
        if group is None:
            return []
        return [item for queue in group.by_tenant.values() for item in queue][:count]

    def waiting_of(self, tenant: str | None) -> int:
        """How many of `tenant`'s jobs wait."""
        return self._waiting_per_tenant.get(tenant, 0)

    def add(self, item: T) -> None:
        tenant = item.tenant
        if not self._waiting_per_tenant.get(tenant):
            # Back from idling: no credit saved while it had nothing waiting.
            self._virtual[tenant] = max(self._virtual.get(tenant, 0.0), self._clock)
        self._waiting_per_tenant[tenant] = self._waiting_per_tenant.get(tenant, 0) + 1
        group = self._groups.setdefault(item.adapter_key, _Group())
        group.by_tenant.setdefault(tenant, deque()).append(item)
        group.size += 1
        self._size += 1

    def take(
        self,
        now: float,
        room: int,
        in_engine: Mapping[Hashable, int],
        *,
        slots: int | None = None,
        admits: Callable[[Hashable], bool] | None = None,
    ) -> list[T]:
        """Up to `room` jobs to add to the engine now. `in_engine` counts the engine's
        unfinished requests per adapter key; with `slots`, the engine ends up with at most that
        many distinct adapters (an adapter already in it takes no new slot); with `admits`,
        only jobs of the adapter keys it accepts are taken (a merged engine's one)."""
        if room <= 0 or not self._size:
            return []
        groups = [key for key in self._groups if admits is None or admits(key)]
        keys = (
            groups
            if self.policy is AdmissionPolicy.ARRIVAL
            else self._chosen_adapters(now, in_engine, groups)
        )
        if slots is not None:
            keys = _within_slots(keys, in_engine, slots)
        if self.policy is AdmissionPolicy.ARRIVAL:
            return self._take_oldest(room, keys)
        taken: list[T] = []
        for arrived_before in (now - self.max_wait_s, None):  # the overdue first
            while len(taken) < room:
                item = self._take_fairly(keys, arrived_before)
                if item is None:
                    break
                taken.append(item)
        return taken

    def discard(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove and return the waiting jobs matching `predicate` (e.g. revoked partitions)."""
        removed = [item for item in self if predicate(item)]
        for item in removed:
            self._remove(item)
        return removed

    def _chosen_adapters(
        self, now: float, in_engine: Mapping[Hashable, int], groups: list[Hashable]
    ) -> list[Hashable]:
        def rank(key: Hashable) -> tuple[bool, bool, bool, int, float]:
            group = self._groups[key]
            oldest = group.oldest()
            overdue = now - oldest >= self.max_wait_s
            return (
                not overdue,
                not in_engine.get(key),
                not self.is_resident(key),
                0 if overdue else -group.size,
                oldest,
            )

        ranked = sorted(groups, key=rank)
        return ranked if self.max_adapters is None else ranked[: self.max_adapters]

    def _take_oldest(self, room: int, keys: list[Hashable]) -> list[T]:
        heads = [queue for key in keys for queue in self._groups[key].by_tenant.values()]
        taken: list[T] = []
        while len(taken) < room and heads:
            queue = min(heads, key=lambda q: q[0].arrived_at)
            item = queue[0]
            self._remove(item)
            taken.append(item)
            heads = [q for q in heads if q]
        return taken

    def _take_fairly(self, keys: list[Hashable], arrived_before: float | None) -> T | None:
        """The oldest waiting job, among the chosen adapters (and those that arrived before
        `arrived_before`, if given), of the tenant served least."""
        best: T | None = None
        best_rank: tuple[float, float] | None = None
        for key in keys:
            group = self._groups.get(key)
            if group is None:
                continue
            for tenant, queue in group.by_tenant.items():
                if arrived_before is not None and queue[0].arrived_at >= arrived_before:
                    continue  # a tenant's queue is in arrival order: none of it is overdue
                rank = (self._virtual.get(tenant, 0.0), queue[0].arrived_at)
                if best_rank is None or rank < best_rank:
                    best, best_rank = queue[0], rank
        if best is None or best_rank is None:
            return None
        start = best_rank[0]
        self._clock = max(self._clock, start)
        weight = self.tenant_weights.get(best.tenant or "", 1.0)
        self._virtual[best.tenant] = start + 1.0 / weight
        self._remove(best)
        return best

    def _remove(self, item: T) -> None:
        group = self._groups[item.adapter_key]
        queue = group.by_tenant[item.tenant]
        if queue[0] is item:
            queue.popleft()
        else:
            queue.remove(item)
        if not queue:
            del group.by_tenant[item.tenant]
        group.size -= 1
        if not group.size:
            del self._groups[item.adapter_key]
        self._waiting_per_tenant[item.tenant] -= 1
        self._size -= 1


def _within_slots(
    keys: list[Hashable], in_engine: Mapping[Hashable, int], slots: int
) -> list[Hashable]:
    """The keys that fit in `slots` distinct adapters beside those in the engine, in order."""
    present = {key for key, count in in_engine.items() if count > 0}
    free = slots - len(present)
    kept: list[Hashable] = []
    for key in keys:
        if key in present:
            kept.append(key)
        elif free > 0:
            kept.append(key)
            free -= 1
    return kept
