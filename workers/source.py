"""Where jobs come from: a confluent-kafka consumer group over the pipelines' input topics.

Auto-commit is off: the worker commits a position only after every message before it has been
answered and the broker acknowledged the answer (see `offsets.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

log = structlog.get_logger(__name__)

Headers = list[tuple[str, bytes | None]]


@dataclass(frozen=True)
class SourceMessage:
    """A consumed message, detached from librdkafka so later stages are plain Python."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int

    @classmethod
    def from_kafka(cls, message: Message) -> SourceMessage:
        _, timestamp = message.timestamp()
        return cls(
            topic=message.topic(),
            partition=message.partition(),
            offset=message.offset(),
            key=message.key(),
            value=message.value(),
            headers=list(message.headers() or []),
            timestamp_ms=timestamp,
        )


PartitionsCallback = Callable[[list[tuple[str, int]]], None]


class KafkaJobSource:
    def __init__(
        self,
        bootstrap_servers: str,
        group_id: str,
        topics: list[str],
        extra_config: dict[str, str],
        on_revoke: PartitionsCallback,
    ) -> None:
        config = {
            "bootstrap.servers": bootstrap_servers,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            # Incremental rebalancing: a worker keeps its other partitions (and their in-flight
            # batches) while one partition moves.
            "partition.assignment.strategy": "cooperative-sticky",
            "enable.partition.eof": False,
            **extra_config,
        }
        self._on_revoke = on_revoke
        self._consumer = Consumer(config, logger=None)
        self._consumer.subscribe(topics, on_revoke=self._revoked, on_lost=self._revoked)

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        log.info("partitions_revoked", partitions=keys)
        self._on_revoke(keys)

    def consume(self, max_messages: int, timeout_s: float) -> list[SourceMessage]:
        messages = self._consumer.consume(num_messages=max_messages, timeout=timeout_s)
        decoded: list[SourceMessage] = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                # Transient broker errors are retried by librdkafka; note them and move on.
                log.warning("consume_error", error=str(error))
                continue
            decoded.append(SourceMessage.from_kafka(message))
        return decoded

    def commit(self, positions: dict[tuple[str, int], int]) -> None:
        offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0]
            # After a rebalance we may no longer own a partition; the new owner redoes the work.
            if error.code() in (KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION):
                log.warning("commit_skipped_rebalance", error=str(error))
                return
            raise

    def pause_all(self) -> None:
        self._consumer.pause(self._consumer.assignment())

    def resume_all(self) -> None:
        self._consumer.resume(self._consumer.assignment())

    def close(self) -> None:
        self._consumer.close()
