"""Where jobs come from: a confluent-kafka consumer group over the pipelines' input topics.

Auto-commit is off: the worker commits a position only after every message before it has been
answered (see `offsets.py`), either in the results' transaction or, at-least-once, after the
broker acknowledged them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaException, Message, TopicPartition

from workers.core.messages import SourceMessage
from workers.core.offsets import CommitPoint, Ledger
from workers.kafka.clients import KafkaConnection, consumer, denied_for_good

log = structlog.get_logger(__name__)

WAITING_WARNING_S = 10.0
COMMITTED_ATTEMPTS = 3
COMMITTED_TIMEOUT_S = 10.0

PartitionsCallback = Callable[[list[tuple[str, int]]], None]


@dataclass(frozen=True)
class RebalanceHandlers:
    """Called from inside `consume()`, on the worker's own thread."""

    revoked: PartitionsCallback  # still ours: commit what is done, then let go
    lost: PartitionsCallback  # already someone else's: commit nothing


class KafkaJobSource:
    def __init__(
        self,
        kafka: KafkaConnection | str,
        group_id: str,
        topics: list[str],
        extra_config: dict[str, str] | None,
        handlers: RebalanceHandlers,
        instance_id: str | None = None,
        consumer_factory: Callable[[KafkaConnection | str, dict[str, Any]], Any] = consumer,
    ) -> None:
        config = {
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            # Incremental rebalancing: a worker keeps its other partitions (and the expensive
            # batches in flight for them) while one partition moves; eager rebalancing would
            # revoke everything on every join or leave.
            "partition.assignment.strategy": "cooperative-sticky",
            # Jobs published in an aborted transaction are never served.
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
            **(extra_config or {}),  # per-source overrides (tests)
        }
        if instance_id is not None:
            # Static membership: a restart within session.timeout.ms keeps the assignment.
            config["group.instance.id"] = instance_id
        self._handlers = handlers
        # Pausing covers partitions assigned later too, which must be assigned paused.
        self._paused = False
        self._joined = False  # an assignment arrived (possibly empty) and none was lost since
        self._cooperative = "cooperative" in str(config["partition.assignment.strategy"])
        self._waiting_since: float | None = None  # for fetch_pending's warning
        self._waiting_reported = False
        self._consumer = consumer_factory(kafka, config)
        self._consumer.subscribe(
            topics, on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost
        )

    @staticmethod
    def _keys(partitions: list[TopicPartition]) -> list[tuple[str, int]]:
        return [(tp.topic, tp.partition) for tp in partitions]

    def _assigned(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Tracking starts at the first message, from the committed offset. While paused, new
        # partitions are assigned here (rather than by the client after this callback) so that
        # they can be paused before their first fetch.
        log.info("partitions_assigned", partitions=self._keys(partitions), paused=self._paused)
        self._joined = True
        if self._paused and partitions:
            assign = (
                self._consumer.incremental_assign if self._cooperative else self._consumer.assign
            )
            assign(partitions)
            self._consumer.pause(partitions)

    def _revoked(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions_revoked", partitions=self._keys(partitions))
        self._handlers.revoked(self._keys(partitions))

    def _lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("partitions_lost", partitions=self._keys(partitions))
        self._joined = False
        self._handlers.lost(self._keys(partitions))

    def joined(self) -> bool:
        """A member of the group: assigned partitions, or none because there are more members
        than partitions."""
        return self._joined

    def group_metadata(self) -> object:
        """The consumer's group generation, which fences a transaction from a stale member."""
        return self._consumer.consumer_group_metadata()

    def membership(self) -> tuple[str, int, set[tuple[str, int]]]:
        """(member id, generation, assigned partitions) as librdkafka knows them now. Its own
        thread resets the member id to "" (session timed out, unknown member, poll interval
        exceeded) or the generation to -1 (illegal generation) as soon as it learns the
        assignment is lost, before the lost callback runs on this thread."""
        metadata = self._consumer.consumer_group_metadata()
        # librdkafka's serialized form: b"CGMDv2:", the generation (a native int32), the ids.
        if not metadata.startswith(b"CGMDv2:"):
            raise RuntimeError(f"unknown consumer group metadata format {metadata[:8]!r}")
        generation = int.from_bytes(metadata[7:11], sys.byteorder, signed=True)
        assigned = set(self._keys(self._consumer.assignment()))
        return self._consumer.memberid() or "", generation, assigned

    def consume(self, max_messages: int, timeout_s: float) -> list[SourceMessage]:
        messages = self._consumer.consume(num_messages=max_messages, timeout=timeout_s)
        decoded: list[SourceMessage] = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.fatal() or denied_for_good(error):
                    raise KafkaException(error)  # e.g. the group denied: one line, not a flood
                # Transient broker errors are retried by librdkafka; note them and move on.
                log.warning("consume_error", error=str(error))
                continue
            decoded.append(_detached(message))
        return decoded

    def fetch_pending(self) -> bool:
        """True while an assigned partition has not started fetching.

        A new owner cannot fetch until the group's committed offset for the partition is stable;
        a killed worker's open transaction holds it back up to `transaction.timeout.ms`. The
        cached high watermark stays unknown until the partition's first fetch response.
        """
        waiting = [tp for tp in self._consumer.assignment() if not self._fetching(tp)]
        if not waiting:
            self._waiting_since, self._waiting_reported = None, False
            return False
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = now
        elif now - self._waiting_since >= WAITING_WARNING_S and not self._waiting_reported:
            self._waiting_reported = True
            log.warning(
                "partitions_waiting_for_offsets",
                partitions=self._keys(waiting),
                waited_s=round(now - self._waiting_since),
                likely_cause="a killed worker's open transaction, until transaction.timeout.ms",
            )
        return True

    def _fetching(self, partition: TopicPartition) -> bool:
        try:
            _, high = self._consumer.get_watermark_offsets(partition, cached=True)
        except KafkaException:
            return False
        return high != OFFSET_INVALID

    def lag(self) -> dict[tuple[str, int], int]:
        """Per assigned partition, messages after this consumer's position (cached watermarks;
        0 until the partition's first fetch)."""
        assignment = self._consumer.assignment()
        if not assignment:
            return {}
        lag: dict[tuple[str, int], int] = {}
        for tp in self._consumer.position(assignment):
            try:
                _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                high = OFFSET_INVALID
            known = high != OFFSET_INVALID and tp.offset >= 0
            lag[(tp.topic, tp.partition)] = max(0, high - tp.offset) if known else 0
        return lag

    def committed_ledger(self, key: tuple[str, int]) -> Ledger:
        """What the group committed for a partition: its position and the ledger of messages
        finished beyond it. Asked once a partition fetches, so the committed offset is stable."""
        last: KafkaException | None = None
        for _ in range(COMMITTED_ATTEMPTS):
            try:
                (tp,) = self._consumer.committed(
                    [TopicPartition(*key)], timeout=COMMITTED_TIMEOUT_S
                )
            except KafkaException as exc:
                last = exc
                continue
            return Ledger.decode(tp.offset, tp.metadata)
        # Serving without it could answer a message twice: end the worker, another serves.
        raise KafkaException(last.args[0] if last else "committed offsets unavailable")

    def commit(self, points: dict[tuple[str, int], CommitPoint]) -> bool:
        """Commit outside a transaction (at-least-once); False when it did not happen."""
        try:
            self._consumer.commit(offsets=to_topic_partitions(points), asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0]
            if error.fatal():
                raise
            # After a rebalance we may no longer own a partition, and a broker outage fails the
            # commit; either way the work is redone or the commit retried later, never lost.
            log.warning("commit_failed", error=str(error), retriable=error.retriable())
            return False
        return True

    def pause_all(self) -> None:
        """Stop fetching every partition, those assigned from now on included."""
        self._paused = True
        self._consumer.pause(self._consumer.assignment())

    def resume_all(self) -> None:
        self._paused = False
        self._consumer.resume(self._consumer.assignment())

    def close(self) -> None:
        self._consumer.close()


def to_topic_partitions(points: dict[tuple[str, int], CommitPoint]) -> list[TopicPartition]:
    """Positions to commit, each with its ledger in the offset's metadata."""
    return [
        TopicPartition(t, p, point.position, metadata=point.ledger.metadata)
        for (t, p), point in points.items()
    ]


def _detached(message: Message) -> SourceMessage:
    _, timestamp = message.timestamp()
    return SourceMessage(
        topic=message.topic(),
        partition=message.partition(),
        offset=message.offset(),
        key=message.key(),
        value=message.value(),
        headers=list(message.headers() or []),
        timestamp_ms=timestamp,
    )
