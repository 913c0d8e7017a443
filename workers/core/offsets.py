"""Which offsets are safe to commit when jobs are answered out of order. Pure logic, no I/O.

Admission by adapter and tenant reorders work, so a partition's offset may be committed only up
to the first message not answered yet (an answer is a result or a dead letter, written or held
by the sink for the commit). Committing past it would lose that message if the worker died.

Messages answered beyond that position need not wait for it: each commit also carries a
`Ledger` of them (in the offset commit's metadata, in the same transaction as their answers),
and whoever consumes the partition from that position skips the messages it covers, so an
answer is committed (visible) with the next commit after it is written, and still exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

TopicPartitionKey = tuple[str, int]

# Kafka's offset.metadata.max.bytes is 4096 by default; a ledger is kept well below it.
MAX_LEDGER_CHARS = 3000
_LEDGER = re.compile(r"lw1 (\d+) ((?:\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)?)")


@dataclass(frozen=True)
class Ledger:
    """Offsets answered beyond a committed position: every offset in (position, highest] that
    is not in `unanswered`."""

    position: int
    highest: int = -1
    unanswered: frozenset[int] = frozenset()

    def covers(self, offset: int) -> bool:
        return self.position <= offset <= self.highest and offset not in self.unanswered

    def covered_count(self) -> int:
        span = self.highest - self.position + 1
        if span <= 0:
            return 0
        return span - sum(1 for o in self.unanswered if self.position <= o <= self.highest)

    @cached_property
    def metadata(self) -> str:
        """The offset commit's metadata, relative to the position:
        `lw1 <highest> <unanswered ranges>`; "" when it covers nothing. Computed once."""
        if self.covered_count() == 0:
            return ""
        ranges: list[str] = []
        for start, end in _runs(sorted(o - self.position for o in self.unanswered)):
            ranges.append(str(start) if start == end else f"{start}-{end}")
        return f"lw1 {self.highest - self.position} {','.join(ranges)}"

    @classmethod
    def decode(cls, position: int, metadata: str | None) -> Ledger:
        """The ledger committed with `position`; an empty one for anything else (another
        tool's metadata, none at all)."""
        match = _LEDGER.fullmatch(metadata or "")
        if match is None or position < 0:  # below 0: no committed offset at all
            return cls(max(position, 0))
        unanswered: set[int] = set()
        for part in filter(None, match.group(2).split(",")):
            start, _, end = part.partition("-")
            unanswered.update(range(position + int(start), position + int(end or start) + 1))
        return cls(position, position + int(match.group(1)), frozenset(unanswered))


def _runs(values: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for value in values:
        if runs and runs[-1][1] == value - 1:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    return runs


@dataclass(frozen=True)
class CommitPoint:
    position: int  # the next offset to read
    ledger: Ledger  # what is answered beyond it


@dataclass
class _PartitionProgress:
    # Offsets seen but not yet answered, and the highest offset seen; the committable position
    # is the smallest unanswered offset, or one past the highest seen when all are answered.
    unanswered: set[int] = field(default_factory=set)
    highest_seen: int = -1
    committed: int = -1
    committed_ledger: str = ""
    # What the previous owner committed as answered beyond its position, for the offsets this
    # worker has not read yet.
    inherited: Ledger | None = None

    def next_position(self) -> int:
        if self.unanswered:
            return min(self.unanswered)
        return self.highest_seen + 1


@dataclass
class OffsetTracker:
    _partitions: dict[TopicPartitionKey, _PartitionProgress] = field(default_factory=dict)

    def track(self, topic: str, partition: int, offset: int) -> None:
        progress = self._partitions.setdefault((topic, partition), _PartitionProgress())
        if offset <= progress.highest_seen:
            # Offsets only grow within a partition; a smaller one means a rewind we did not ask for.
            raise ValueError(f"{topic}[{partition}] offset {offset} after {progress.highest_seen}")
        progress.unanswered.add(offset)
        progress.highest_seen = offset

    def mark_answered(self, topic: str, partition: int, offset: int) -> None:
        progress = self._partitions.get((topic, partition))
        if progress is not None:
            progress.unanswered.discard(offset)

    def first_unanswered_outside(self, key: TopicPartitionKey, excluded: set[int]) -> int | None:
        """The smallest unanswered offset of a partition that is not in `excluded` (None: every
        unanswered offset is excluded)."""
        progress = self._partitions.get(key)
        if progress is None:
            return None
        return min(progress.unanswered - excluded, default=None)

    def unanswered_count(self) -> int:
        return sum(len(p.unanswered) for p in self._partitions.values())

    def resume(self, key: TopicPartitionKey, ledger: Ledger) -> None:
        """The committed ledger of a partition this worker starts reading."""
        progress = self._partitions.setdefault(key, _PartitionProgress())
        progress.inherited = ledger if ledger.highest >= ledger.position else None

    def resumed(self, key: TopicPartitionKey) -> bool:
        return key in self._partitions

    def already_answered(self, topic: str, partition: int, offset: int) -> bool:
        progress = self._partitions.get((topic, partition))
        return bool(progress and progress.inherited and progress.inherited.covers(offset))

    def committable(self) -> dict[TopicPartitionKey, CommitPoint]:
        """Commit points that moved since the last `mark_committed`: a new position, or more
        answered beyond it."""
        points: dict[TopicPartitionKey, CommitPoint] = {}
        for key, progress in self._partitions.items():
            point = self._point(progress)
            if point is None:
                continue
            moved = point.position > progress.committed and point.position > 0
            if moved or point.ledger.metadata != progress.committed_ledger:
                points[key] = point
        return points

    def _point(self, progress: _PartitionProgress) -> CommitPoint | None:
        position = progress.next_position()
        inherited = progress.inherited
        if inherited is not None and position > inherited.highest:
            progress.inherited = inherited = None
        highest = progress.highest_seen
        unanswered = set(progress.unanswered)
        if inherited is not None:
            # Offsets not read yet: answered if the previous owner said so.
            highest = max(highest, inherited.highest)
            unanswered |= {o for o in inherited.unanswered if o > progress.highest_seen}
        ledger = Ledger(position, highest, frozenset(unanswered))
        if len(ledger.metadata) > MAX_LEDGER_CHARS:
            if inherited is not None:
                return None  # keep the committed ledger until it can be said in full
            ledger = _truncated(ledger)
        return CommitPoint(position, ledger)

    def mark_committed(self, points: dict[TopicPartitionKey, CommitPoint]) -> None:
        for key, point in points.items():
            progress = self._partitions.get(key)
            if progress is not None:
                progress.committed = max(progress.committed, point.position)
                progress.committed_ledger = point.ledger.metadata

    def forget(self, keys: list[TopicPartitionKey]) -> None:
        """Drop partitions this worker no longer owns (after a rebalance)."""
        for key in keys:
            self._partitions.pop(key, None)


def _truncated(ledger: Ledger) -> Ledger:
    """The same ledger claiming less: up to just before the first unanswered offset that no
    longer fits (answers beyond it wait for a later commit)."""
    unanswered = sorted(ledger.unanswered)
    keep = len(unanswered)
    while keep > 0:
        highest = unanswered[keep] - 1 if keep < len(unanswered) else ledger.highest
        candidate = Ledger(ledger.position, highest, frozenset(unanswered[:keep]))
        if len(candidate.metadata) <= MAX_LEDGER_CHARS:
            return candidate
        keep = keep * 3 // 4
    return Ledger(ledger.position)
