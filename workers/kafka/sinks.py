"""Where answers go: results to the task's result topic, rejects to a dead-letter topic.

Two sinks behind one interface, chosen by `delivery.mode`:
- `AtLeastOnceSink`: writes at once; a message's offset is finished when the broker
  acknowledged its answer, and committed by the consumer afterwards.
- `ExactlyOnceSink` (in `transactions.py`): holds answers until their
  offsets can commit, then writes answers and offsets in one transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from confluent_kafka import KafkaError, Message, Producer

from workers.core.contracts import Result
from workers.core.messages import SourceMessage
from workers.core.offsets import TopicPartitionKey
from workers.kafka.source import KafkaJobSource

log = structlog.get_logger(__name__)

OnDone = Callable[[], None]
Position = tuple[str, int, int]  # topic, partition, offset of the message being answered

# Dead-letter headers added to the original ones, so a replay tool knows where a record came from.
DLQ_ERROR_CODE = "dlq.error.code"
DLQ_ERROR_MESSAGE = "dlq.error.message"
DLQ_SOURCE_TOPIC = "dlq.source.topic"
DLQ_SOURCE_PARTITION = "dlq.source.partition"
DLQ_SOURCE_OFFSET = "dlq.source.offset"

RETRY_BACKOFF_S = 1.0


@dataclass(frozen=True)
class OutputRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


def result_record(topic: str, result: Result) -> OutputRecord:
    return OutputRecord(
        topic,
        key=result.job_id.encode(),
        value=result.model_dump_json().encode(),
        headers=[("content-type", b"application/json")],
    )


def dead_letter_record(topic: str, source: SourceMessage, code: str, message: str) -> OutputRecord:
    headers = [
        *source.headers,
        (DLQ_ERROR_CODE, code.encode()),
        (DLQ_ERROR_MESSAGE, message.encode()),
        (DLQ_SOURCE_TOPIC, source.topic.encode()),
        (DLQ_SOURCE_PARTITION, str(source.partition).encode()),
        (DLQ_SOURCE_OFFSET, str(source.offset).encode()),
    ]
    return OutputRecord(topic, key=source.key, value=source.value, headers=headers)


class DeliveryFailed(Exception):
    """The broker refused a record for good (a fatal producer error); nothing is committed."""


class ResultSink(Protocol):
    def write(self, position: Position, record: OutputRecord, on_done: OnDone) -> None:
        """`on_done` once the record is as good as written: acknowledged, or held for the
        transaction that commits its offset."""

    def commit(self, positions: dict[TopicPartitionKey, int], source: KafkaJobSource) -> bool:
        """Commit consumed positions (and, transactionally, the answers below them)."""

    def discard(self, partitions: set[TopicPartitionKey]) -> None:
        """Forget answers held for partitions this worker lost."""

    def held(self) -> int: ...

    def poll(self) -> None: ...

    def flush(self, timeout_s: float) -> None: ...

    def close(self) -> None: ...


def produce_waiting_for_room(producer: Producer, topic: str, **fields: Any) -> None:
    while True:
        try:
            producer.produce(topic, **fields)
            return
        except BufferError:
            # Local queue full: serve delivery reports until there is room again.
            producer.poll(0.1)


def produce_record(producer: Producer, record: OutputRecord, **fields: Any) -> None:
    produce_waiting_for_room(
        producer, record.topic, key=record.key, value=record.value, headers=record.headers, **fields
    )


class AtLeastOnceSink:
    """Writes each answer at once; its offset is finished when the broker acknowledged it."""

    def __init__(self, bootstrap_servers: str, extra_config: dict[str, str]) -> None:
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap_servers,
                # Idempotence keeps librdkafka's retries from writing a result twice.
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "compression.type": "lz4",
                **extra_config,
            },
            logger=None,
        )
        self._fatal: KafkaError | None = None
        self._to_retry: list[tuple[float, Position, OutputRecord, OnDone]] = []

    def write(self, position: Position, record: OutputRecord, on_done: OnDone) -> None:
        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is None:
                on_done()
            elif error.fatal():
                self._fatal = error
            else:
                # Still not taken after librdkafka's own retries (e.g. the broker was away
                # longer than message.timeout.ms): write it again later, never drop it.
                log.warning("delivery_retry", topic=record.topic, error=str(error))
                self._to_retry.append(
                    (time.monotonic() + RETRY_BACKOFF_S, position, record, on_done)
                )

        produce_record(self._producer, record, on_delivery=delivered)
        self._producer.poll(0)

    def commit(self, positions: dict[TopicPartitionKey, int], source: KafkaJobSource) -> bool:
        return source.commit(positions)

    def discard(self, partitions: set[TopicPartitionKey]) -> None:
        self._to_retry = [r for r in self._to_retry if (r[1][0], r[1][1]) not in partitions]

    def held(self) -> int:
        return len(self._to_retry)

    def poll(self) -> None:
        """Serve delivery reports and rewrite records whose backoff has passed."""
        self._producer.poll(0)
        if self._fatal is not None:
            raise DeliveryFailed(str(self._fatal))
        now = time.monotonic()
        due = [r for r in self._to_retry if r[0] <= now]
        if due:
            self._to_retry = [r for r in self._to_retry if r[0] > now]
            for _, position, record, on_done in due:
                self.write(position, record, on_done)

    def flush(self, timeout_s: float) -> None:
        remaining = self._producer.flush(timeout_s)
        if self._fatal is not None:
            raise DeliveryFailed(str(self._fatal))
        if remaining:
            log.warning("flush_incomplete", records=remaining, timeout_s=timeout_s)

    def close(self) -> None:
        self._producer.flush(10)
