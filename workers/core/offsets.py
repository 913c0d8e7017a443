"""Which offsets are safe to commit when jobs finish out of order. Pure logic, no I/O.

Batching by adapter reorders work, so a partition's offset may be committed only up to the
first message that is not finished yet (answered or dead-lettered and acknowledged by the
broker). Committing past it would lose that message if the worker died.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TopicPartitionKey = tuple[str, int]


@dataclass
class _PartitionProgress:
    # Offsets seen but not yet finished, and the highest offset seen; the committable position
    # is the smallest unfinished offset, or one past the highest seen when all are finished.
    unfinished: set[int] = field(default_factory=set)
    highest_seen: int = -1
    committed: int = -1

    def next_position(self) -> int:
        if self.unfinished:
            return min(self.unfinished)
        return self.highest_seen + 1


@dataclass
class OffsetTracker:
    _partitions: dict[TopicPartitionKey, _PartitionProgress] = field(default_factory=dict)

    def track(self, topic: str, partition: int, offset: int) -> None:
        progress = self._partitions.setdefault((topic, partition), _PartitionProgress())
        if offset <= progress.highest_seen:
            # Offsets only grow within a partition; a smaller one means a rewind we did not ask for.
            raise ValueError(f"{topic}[{partition}] offset {offset} after {progress.highest_seen}")
        progress.unfinished.add(offset)
        progress.highest_seen = offset

    def finish(self, topic: str, partition: int, offset: int) -> None:
        progress = self._partitions.get((topic, partition))
        if progress is not None:
            progress.unfinished.discard(offset)

    def first_unfinished_outside(self, key: TopicPartitionKey, excluded: set[int]) -> int | None:
        """The smallest unfinished offset of a partition that is not in `excluded` (None: every
        unfinished offset is excluded)."""
        progress = self._partitions.get(key)
        if progress is None:
            return None
        return min(progress.unfinished - excluded, default=None)

    def unfinished_count(self) -> int:
        return sum(len(p.unfinished) for p in self._partitions.values())

    def committable(self) -> dict[TopicPartitionKey, int]:
        """Positions (next offset to read) that moved since the last `mark_committed`."""
        positions: dict[TopicPartitionKey, int] = {}
        for key, progress in self._partitions.items():
            position = progress.next_position()
            if position > progress.committed and position > 0:
                positions[key] = position
        return positions

    def mark_committed(self, positions: dict[TopicPartitionKey, int]) -> None:
        for key, position in positions.items():
            progress = self._partitions.get(key)
            if progress is not None:
                progress.committed = max(progress.committed, position)

    def forget(self, keys: list[TopicPartitionKey]) -> None:
        """Drop partitions this worker no longer owns (after a rebalance)."""
        for key in keys:
            self._partitions.pop(key, None)
