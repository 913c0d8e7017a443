"""Results of Kafka jobs into a Parquet dataset, exactly once through crashes and rebalances.

Each file holds one partition's rows from the group's committed position at the time it is
written up to the commit made right after it, and is named after that committed position
(`<topic>-p<partition>-<position>`), dated by the jobs' Kafka timestamps. No next file is written
until that commit succeeds, so at most one file per partition is beyond the committed position,
and a replay starts at that very position: its first file has the same name whatever verdicts the
replay gives (a job that crashed the engine may succeed the next time, and the reverse).

Files beyond the committed position were never committed: when a member starts on a partition it
deletes them before it writes or commits anything, so a replay that answers those offsets
otherwise (dead letters, other file boundaries) leaves none of their rows behind. And a file is
published (renamed into place) only while the member still holds the partition under the
membership it resumed it with: a member whose session ended, even before its lost callback runs,
publishes nothing over the next owner's files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from workers.core.config import PipelineConfig
from workers.core.contracts import Result
from workers.core.offsets import TopicPartitionKey
from workers.kafka.source import KafkaJobSource
from workers.parquet.dataset import ParquetDatasetWriter, PublishRefused

log = structlog.get_logger(__name__)

_POSITION_DIGITS = 12


class PartitionOwner(Protocol):
    """What the Parquet stage asks the consumer group about this member's partitions."""

    def started(self) -> set[TopicPartitionKey]:
        """Partitions assigned to this member that it has started reading."""
        ...

    def committed(self, key: TopicPartitionKey) -> int:
        """The group's committed position for the partition, read from the broker."""
        ...

    def claim(self, key: TopicPartitionKey) -> str | None:
        """Under which membership this member holds the partition now; None when it does not
        (not assigned, or its membership lost)."""
        ...


@dataclass(frozen=True)
class ConsumerOwner:
    """The worker's consumer as a PartitionOwner."""

    source: KafkaJobSource
    resumed: Callable[[TopicPartitionKey], bool]  # the worker read its committed ledger

    def started(self) -> set[TopicPartitionKey]:
        _, _, assigned = self.source.membership()
        return {key for key in assigned if self.resumed(key)}

    def committed(self, key: TopicPartitionKey) -> int:
        return self.source.committed_ledger(key).position

    def claim(self, key: TopicPartitionKey) -> str | None:
        # The member id: a cooperative rebalance that leaves the partition here changes the
        # generation, not the member; losing the membership resets the id or the generation.
        member, generation, assigned = self.source.membership()
        if not member or generation < 0 or key not in assigned:
            return None
        return member


@dataclass(frozen=True)
class _Waiting:
    result: Result
    added_at: float


def _stem_prefix(key: TopicPartitionKey) -> str:
    topic, partition = key
    return f"{topic}-p{partition:04d}-"


def _stem(key: TopicPartitionKey, position: int) -> str:
    return f"{_stem_prefix(key)}{position:0{_POSITION_DIGITS}d}"


def _position_of(suffix: str) -> int:
    """The position in a stem's suffix; -1 for another name (another topic's, say)."""
    if len(suffix) == _POSITION_DIGITS and suffix.isdigit():
        return int(suffix)
    return -1


class ParquetResults:
    def __init__(self, pipelines: dict[str, PipelineConfig]) -> None:
        self._pipelines = {
            p.input_topic: p for p in pipelines.values() if "parquet" in p.sinks and p.parquet
        }
        self._writers = {
            topic: ParquetDatasetWriter(
                p.parquet.path,
                p.output_schema,
                row_group_size=p.parquet.row_group_size,
                date_from="enqueued_at",
            )
            for topic, p in self._pipelines.items()
            if p.parquet is not None
        }
        self._waiting: dict[TopicPartitionKey, dict[int, _Waiting]] = {}
        # Partitions whose uncommitted files are gone, with the membership they were resumed
        # under: a file is published only while that membership still holds the partition.
        self._claims: dict[TopicPartitionKey, str] = {}
        # The last file's commit failed: no further file until a commit succeeds, else a crash
        # would leave two uncommitted files, and the second would be named as the first.
        self._uncommitted = False

    @staticmethod
    def owner(
        source: KafkaJobSource, resumed: Callable[[TopicPartitionKey], bool]
    ) -> ConsumerOwner:
        """The worker's consumer as the PartitionOwner that `flush` asks."""
        return ConsumerOwner(source, resumed)

    def add(self, topic: str, partition: int, offset: int, result: Result) -> None:
        rows = self._waiting.setdefault((topic, partition), {})
        rows[offset] = _Waiting(result, time.monotonic())

    def flush(
        self,
        owner: PartitionOwner,
        first_unanswered_outside: Callable[[TopicPartitionKey, set[int]], int | None],
        on_written: Callable[[TopicPartitionKey, list[int]], None],
        commit: Callable[[], bool],
        *,
        force: bool = False,
        only: set[TopicPartitionKey] | None = None,
    ) -> None:
        """Resume the partitions this member has just started (before anything is committed for
        them), then write every due file. A file takes waiting rows below the partition's first
        offset that is neither waiting here nor finished, so files never skip an offset. After
        each published file, `on_written` marks its rows done and `commit` commits them; no next
        file is written until a commit has succeeded."""
        if not self._pipelines:
            return
        self._resume(owner)
        if self._uncommitted:
            if not commit():
                return
            self._uncommitted = False
        now = time.monotonic()
        for key, rows in self._waiting.items():
            if (only is not None and key not in only) or key not in self._claims:
                continue
            pipeline = self._pipelines[key[0]]
            assert pipeline.parquet is not None
            config = pipeline.parquet
            while rows:
                limit = first_unanswered_outside(key, set(rows))
                ready = sorted(o for o in rows if limit is None or o < limit)
                if not ready:
                    break
                oldest = min(rows[o].added_at for o in ready)
                due = len(ready) >= config.rows_per_file
                due = due or (now - oldest) * 1000 >= config.max_file_age_ms
                if not (due or force):
                    break
                chunk = ready[: config.rows_per_file]
                if not self._publish(
                    key, pipeline, [rows[o].result for o in chunk], chunk[0], owner
                ):
                    break  # not ours any more: its rows go with the revoke or lost callback
                for offset in chunk:
                    del rows[offset]
                on_written(key, chunk)
                if not commit():
                    self._uncommitted = True
                    return

    def _resume(self, owner: PartitionOwner) -> None:
        """Delete the files of newly started partitions from their committed position on: no
        commit covers them, and the replay answers their offsets anew."""
        for key in owner.started() - self._claims.keys():
            pipeline = self._pipelines.get(key[0])
            claim = owner.claim(key)
            if pipeline is None or claim is None:
                continue
            position = owner.committed(key)
            writer, prefix = self._writers[key[0]], _stem_prefix(key)
            stale = [
                path
                for path in writer.task_files(pipeline.task, prefix)
                if _position_of(path.stem[len(prefix) :]) >= position
            ]
            if stale:
                writer.remove(stale)
                log.info(
                    "parquet_uncommitted_files_removed",
                    partition=key,
                    committed=position,
                    files=[path.name for path in stale],
                )
            self._claims[key] = claim

    def _publish(
        self,
        key: TopicPartitionKey,
        pipeline: PipelineConfig,
        results: list[Result],
        first: int,
        owner: PartitionOwner,
    ) -> bool:
        """Write the file starting at the partition's committed position; False when this
        member no longer holds the partition (nothing is published)."""
        position = owner.committed(key)
        claim = self._claims[key]
        if position > first:  # someone committed past rows only we hold: not ours any more
            log.warning("parquet_file_not_published", partition=key, committed=position)
            return False
        stem = _stem(key, position)
        try:
            self._writers[key[0]].write(results, stem, publish_if=lambda: owner.claim(key) == claim)
        except PublishRefused:
            log.warning("parquet_file_not_published", file=stem, reason="partition not held")
            return False
        log.info("parquet_file_written", file=stem, rows=len(results))
        return True

    def forget(self, keys: set[TopicPartitionKey]) -> None:
        for key in keys:
            self._waiting.pop(key, None)
            self._claims.pop(key, None)
