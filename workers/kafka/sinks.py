"""Where answers go: results to the task's result topic, rejects to a dead-letter topic.

Two sinks behind one interface, chosen by `delivery.mode`:
- `AtLeastOnceSink`: writes at once; a message's offset is finished when the broker
  acknowledged its answer, and committed by the consumer afterwards.
- `ExactlyOnceSink` (in `transactions.py`): holds answers until their
  offsets can commit, then writes answers and offsets in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from workers import metrics
from workers.core.config import SizeSettings
from workers.core.contracts import TOPIC_NAME_PATTERN, ErrorInfo, Result, ResultStatus
from workers.core.errors import MAX_REASON_CHARS, JobError, JobRejected
from workers.core.messages import (
    TRACEPARENT,
    Headers,
    SourceMessage,
    record_size,
    traceparent_of,
)
from workers.core.offsets import CommitPoint, Ledger, TopicPartitionKey
from workers.kafka import clients
from workers.kafka.clients import KafkaConnection, describe

log = structlog.get_logger(__name__)

OnDone = Callable[[], None]
DeliveryCallback = Callable[[KafkaError | None, Message], None]
Position = tuple[str, int, int]  # topic, partition, offset of the message being answered

# Dead-letter headers added to the original ones, so a replay tool knows where a record came from.
DLQ_ERROR_CODE = "dlq.error.code"
DLQ_ERROR_MESSAGE = "dlq.error.message"
DLQ_ERROR_EXCEPTION = "dlq.error.exception"  # internal_error: the exception's type
DLQ_SOURCE_TOPIC = "dlq.source.topic"
DLQ_SOURCE_PARTITION = "dlq.source.partition"
DLQ_SOURCE_OFFSET = "dlq.source.offset"
# When the payload is cut to a prefix: the original's size and sha256.
DLQ_ORIGINAL_SIZE = "dlq.original.size"
DLQ_ORIGINAL_SHA256 = "dlq.original.sha256"
DLQ_ORIGINAL_TOPIC = "dlq.original.topic"  # undeliverable: where the answer was meant to go

RETRY_BACKOFF_S = 1.0
# Room for the record batch's own overhead beside key, value and headers.
RECORD_OVERHEAD_BYTES = 4096


@dataclass(frozen=True)
class OutputRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    dead_letter_topic: str  # where a minimal `undeliverable` answer goes if this one cannot
    undeliverable: bool = False  # already that minimal answer: nothing smaller is left
    # The job's `reply_to`: the same record is also written there, by the same producer call
    # (`produce_record`), so in the same transaction.
    reply_to: str | None = None

    @property
    def size(self) -> int:
        return record_size(self.key, self.value, self.headers)


def _header(text: str) -> bytes:
    # Reasons may quote input; a header must still be valid UTF-8 bytes.
    return text[:MAX_REASON_CHARS].encode("utf-8", errors="backslashreplace")


def result_record(
    topic: str,
    dead_letter_topic: str,
    result: Result,
    sizes: SizeSettings,
    traceparent: str | None = None,
    reply_to: str | None = None,
) -> OutputRecord:
    """The result as JSON, with the job's `traceparent`; one too large to write becomes an
    `error` result with the reason, without its output and metadata. With `reply_to`, the
    same record also goes to that topic."""
    value = result.model_dump_json().encode()
    if len(value) + RECORD_OVERHEAD_BYTES > sizes.max_message_bytes:
        log.warning("result_too_large", job_id=result.job_id, bytes=len(value))
        value = too_large(result, len(value), sizes.max_message_bytes).model_dump_json().encode()
    headers: Headers = [("content-type", b"application/json")]
    if traceparent is not None:
        headers.append((TRACEPARENT, traceparent.encode()))
    return OutputRecord(
        topic,
        key=result.job_id.encode(),
        value=value,
        headers=headers,
        dead_letter_topic=dead_letter_topic,
        reply_to=reply_to,
    )


def too_large(result: Result, size: int, limit: int) -> Result:
    reason = f"the result is {size} bytes as JSON, more than max_message_bytes {limit}"
    return result.model_copy(
        update={
            "status": ResultStatus.ERROR,
            "output": None,
            "raw_output": "",
            "metadata": None,
            "error": ErrorInfo(code=JobError.RESULT_TOO_LARGE, message=reason),
        }
    )


def dead_letter_record(
    topic: str,
    source: SourceMessage,
    rejection: JobRejected,
    sizes: SizeSettings,
    reply_to: str | None = None,
) -> OutputRecord:
    """The original message with the reason in headers. A payload too large to write back, or
    dead-lettered for its size, is cut to a prefix, with the original's size and sha256. With
    `reply_to`, the same dead letter also goes to that topic."""
    ours = [
        (DLQ_ERROR_CODE, _header(rejection.code)),
        (DLQ_ERROR_MESSAGE, _header(rejection.message)),
        (DLQ_SOURCE_TOPIC, _header(source.topic)),
        (DLQ_SOURCE_PARTITION, str(source.partition).encode()),
        (DLQ_SOURCE_OFFSET, str(source.offset).encode()),
    ]
    if rejection.exception is not None:
        ours.append((DLQ_ERROR_EXCEPTION, _header(rejection.exception)))
    key, value, headers = source.key, source.value, [*source.headers, *ours]
    room = sizes.max_message_bytes - RECORD_OVERHEAD_BYTES
    if (
        rejection.code is JobError.JOB_TOO_LARGE
        or source.size + record_size(None, None, ours) > room
    ):
        original = value or b""
        prefix = sizes.dead_letter_prefix_bytes
        value = original[:prefix]
        ours += [
            (DLQ_ORIGINAL_SIZE, str(source.size).encode()),
            (DLQ_ORIGINAL_SHA256, hashlib.sha256(original).hexdigest().encode()),
        ]
        headers = [*source.headers, *ours]
        if record_size(key, value, headers) > room:  # the key or headers are the bulk
            key, headers = (key or b"")[:prefix] or None, ours
    return OutputRecord(
        topic, key=key, value=value, headers=headers, dead_letter_topic=topic, reply_to=reply_to
    )


def reply_topic_of(source: SourceMessage, rejection: JobRejected) -> str | None:
    """The `reply_to` of a dead-lettered message, when it is a valid job field: a message that
    is not JSON, too large, or whose `reply_to` is itself invalid has none to honour."""
    if rejection.code in (JobError.JOB_TOO_LARGE, JobError.INVALID_JSON) or not source.value:
        return None
    try:
        document = json.loads(source.value)
    except ValueError:
        return None
    topic = document.get("reply_to") if isinstance(document, dict) else None
    if isinstance(topic, str) and re.fullmatch(TOPIC_NAME_PATTERN, topic):
        return topic
    return None


def undeliverable_record(record: OutputRecord, position: Position, reason: str) -> OutputRecord:
    """The smallest answer there is: no payload, the reason and where the message came from."""
    topic, partition, offset = position
    headers = [
        (DLQ_ERROR_CODE, JobError.UNDELIVERABLE.value.encode()),
        (DLQ_ERROR_MESSAGE, _header(reason)),
        (DLQ_SOURCE_TOPIC, _header(topic)),
        (DLQ_SOURCE_PARTITION, str(partition).encode()),
        (DLQ_SOURCE_OFFSET, str(offset).encode()),
        (DLQ_ORIGINAL_TOPIC, _header(record.topic)),
    ]
    traceparent = traceparent_of(record.headers)
    if traceparent is not None:
        headers.append((TRACEPARENT, traceparent.encode()))
    key = (record.key or b"")[:256] or None
    return OutputRecord(
        record.dead_letter_topic,
        key=key,
        value=None,
        headers=headers,
        dead_letter_topic=record.dead_letter_topic,
        undeliverable=True,
    )


def stand_in_for(record: OutputRecord, position: Position, error: str) -> OutputRecord:
    """The minimal `undeliverable` dead letter that replaces an answer the broker refused for
    good (counted and logged); `DeliveryFailed` if the refused record already was one."""
    if record.undeliverable:
        raise DeliveryFailed(
            f"even the undeliverable answer for {position} to {record.topic} failed: {error}"
        )
    metrics.UNDELIVERABLE.inc()
    log.error("answer_undeliverable", topic=record.topic, source=position, error=error)
    return undeliverable_record(record, position, f"writing to {record.topic}: {error}")


class DeliveryFailed(Exception):
    """An answer cannot be written at all (a fatal producer error, or even its minimal dead
    letter refused); nothing more is committed and the worker stops."""


class CommitSource(Protocol):
    """What a commit needs of the job source (`KafkaJobSource`)."""

    def group_metadata(self) -> object:
        """The consumer's group generation, which fences a stale member's transaction."""

    def committed_ledger(self, key: TopicPartitionKey) -> Ledger:
        """What the group committed for a partition."""

    def commit(self, points: dict[TopicPartitionKey, CommitPoint]) -> bool:
        """Commit outside a transaction (at-least-once)."""


class ResultSink(Protocol):
    def start(self) -> None:
        """Before the first message: be ready to write (transactions: fence a predecessor)."""

    def write(self, position: Position, record: OutputRecord, on_done: OnDone) -> None:
        """`on_done` once the record is as good as written: acknowledged, or held for the
        transaction that commits its offset."""

    def commit(self, points: dict[TopicPartitionKey, CommitPoint], source: CommitSource) -> bool:
        """Commit consumed positions with their ledgers (and, transactionally, the answers
        they cover)."""

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


def produce_record(
    producer: Producer, record: OutputRecord, on_delivery: DeliveryCallback | None = None
) -> None:
    """Produce the record, and its copy to `reply_to` if any: one delivery report for both
    (the first error, or success once both are acknowledged), so callers count one answer."""
    reports: list[DeliveryCallback | None] = [on_delivery]
    if record.reply_to is not None:
        reports = [None, None] if on_delivery is None else _joined(on_delivery, record.reply_to)
    for topic, report in zip([record.topic, record.reply_to], reports, strict=False):
        assert topic is not None  # zip stops at the reports given
        fields: dict[str, Any] = {} if report is None else {"on_delivery": report}
        produce_waiting_for_room(
            producer, topic, key=record.key, value=record.value, headers=record.headers, **fields
        )


# A reply topic that does not exist (auto-creation off) is the job's own fault, like a record
# too large: its answer is replaced by the `undeliverable` dead letter, not retried for ever.
MISSING_TOPIC_ERRORS = frozenset({KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART})


def _joined(on_delivery: DeliveryCallback, reply_to: str) -> list[DeliveryCallback]:
    """Delivery reports for a record and its reply copy that make one: the first error, or
    success once both are acknowledged."""
    left = [2]

    def report(error: KafkaError | None, message: Message) -> None:
        if left[0] <= 0:
            return  # already reported (an earlier error)
        left[0] = 0 if error is not None else left[0] - 1
        if error is not None or left[0] == 0:
            on_delivery(error, message)

    def copy_report(error: KafkaError | None, message: Message) -> None:
        if error is not None and error.code() in MISSING_TOPIC_ERRORS:
            error = KafkaError(KafkaError._INVALID_ARG, f"reply_to {reply_to}: {describe(error)}")
        report(error, message)

    return [report, copy_report]


# Errors that say this record can never be written (its size, its topic), as opposed to the
# broker being away: such an answer is replaced by its minimal `undeliverable` dead letter.
RECORD_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError._INVALID_ARG,
    }
)


def cannot_be_written(error: KafkaError) -> bool:
    return error.code() in RECORD_ERRORS


def producer_config(sizes: SizeSettings) -> dict[str, Any]:
    """What every answer-writing producer shares: the record size limit, batching."""
    return {
        "message.max.bytes": sizes.max_message_bytes,
        "linger.ms": 5,
        "compression.type": "lz4",
    }


class AtLeastOnceSink:
    """Writes each answer at once; its offset is finished when the broker acknowledged it."""

    def __init__(self, kafka: KafkaConnection | str, sizes: SizeSettings) -> None:
        self._producer = clients.producer(
            kafka,
            {
                **producer_config(sizes),
                # Idempotence keeps librdkafka's retries from writing a result twice.
                "enable.idempotence": True,
                "acks": "all",
            },
        )
        self._fatal: str | None = None
        self._to_retry: list[tuple[float, Position, OutputRecord, OnDone]] = []

    def start(self) -> None:
        """Nothing to fence: each answer is written on its own."""

    def write(self, position: Position, record: OutputRecord, on_done: OnDone) -> None:
        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is None:
                on_done()
            elif error.fatal():
                self._fatal = str(error)
            elif cannot_be_written(error):
                self._give_up(position, record, on_done, describe(error))
            else:
                # Not taken after librdkafka's own retries (e.g. the broker was away longer
                # than message.timeout.ms): write it again later, never drop it.
                log.warning("delivery_retry", topic=record.topic, error=str(error))
                retry_at = time.monotonic() + RETRY_BACKOFF_S
                self._to_retry.append((retry_at, position, record, on_done))

        try:
            produce_record(self._producer, record, on_delivery=delivered)
        except KafkaException as exc:  # refused before sending, e.g. larger than allowed
            self._give_up(position, record, on_done, str(exc.args[0]))
        self._producer.poll(0)

    def _give_up(
        self, position: Position, record: OutputRecord, on_done: OnDone, error: str
    ) -> None:
        """Answer with the minimal dead letter instead; if even that fails, stop the worker
        (uncommitted, the message goes to another member) rather than spin."""
        try:
            minimal = stand_in_for(record, position, error)
        except DeliveryFailed as failed:  # raised from poll(), not inside librdkafka's callback
            self._fatal = str(failed)
            return
        self.write(position, minimal, on_done)

    def commit(self, points: dict[TopicPartitionKey, CommitPoint], source: CommitSource) -> bool:
        return source.commit(points)

    def discard(self, partitions: set[TopicPartitionKey]) -> None:
        self._to_retry = [r for r in self._to_retry if (r[1][0], r[1][1]) not in partitions]

    def held(self) -> int:
        return len(self._to_retry)

    def poll(self) -> None:
        """Serve delivery reports and rewrite records whose backoff has passed."""
        self._producer.poll(0)
        if self._fatal is not None:
            raise DeliveryFailed(self._fatal)
        now = time.monotonic()
        due = [r for r in self._to_retry if r[0] <= now]
        if due:
            self._to_retry = [r for r in self._to_retry if r[0] > now]
            for _, position, record, on_done in due:
                self.write(position, record, on_done)

    def flush(self, timeout_s: float) -> None:
        remaining = self._producer.flush(timeout_s)
        if self._fatal is not None:
            raise DeliveryFailed(self._fatal)
        if remaining:
            log.warning("flush_incomplete", records=remaining, timeout_s=timeout_s)

    def close(self) -> None:
        self._producer.flush(10)
