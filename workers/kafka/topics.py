"""Kafka topic administration and whole-topic reads for the CLI (and tests)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import NewTopic

from workers.core.config import PipelineConfig, Settings
from workers.kafka.clients import KafkaConnection, admin_client, reader

log = structlog.get_logger(__name__)

READ_IDLE_TIMEOUT_S = 30.0
METADATA_ATTEMPTS = 8  # about 25 s of backoff in all
METADATA_BACKOFF_MAX_S = 5.0

T = TypeVar("T")

# Metadata a broker is still settling (a topic just created, a leader moving, a partition whose
# metadata the client has not cached yet): worth asking again, unlike a topic that is not there.
_TRANSIENT_METADATA = {
    KafkaError._UNKNOWN_PARTITION,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
}


def transient_metadata_error(error: KafkaError) -> bool:
    return error.retriable() or error.code() in _TRANSIENT_METADATA


def with_metadata_retries(
    call: Callable[[], T],
    *,
    attempts: int = METADATA_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`call`, asked again with backoff (0.25 s doubling, at most 5 s) while it fails with a
    transient metadata error, at most `attempts` times; other errors and the last one raise."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if attempt == attempts or not transient_metadata_error(error):
                raise
            log.info("kafka_metadata_retry", error=str(error), attempt=attempt)
            sleep(min(0.25 * 2 ** (attempt - 1), METADATA_BACKOFF_MAX_S))
    raise AssertionError("unreachable")


def watermarks(consumer: Consumer, partition: TopicPartition) -> tuple[int, int]:
    """The partition's (low, high) offsets from the broker, through transient metadata errors."""
    return with_metadata_retries(lambda: consumer.get_watermark_offsets(partition, timeout=30))


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def pipeline_topics(
    settings: Settings, pipelines: dict[str, PipelineConfig], partitions: int
) -> list[TopicSpec]:
    """Input, result and dead-letter topics of every pipeline, the unknown-task DLQ, and the
    adapter topics: compacted where the latest state per adapter name (updates) and per version
    (statuses) is what matters; shadow evaluations are a plain log."""
    names = {settings.unknown_task_dlq}
    for pipeline in pipelines.values():
        names |= {pipeline.input_topic, pipeline.result_topic, pipeline.dlq_topic}
    specs = [TopicSpec(name, partitions) for name in sorted(n for n in names if n)]
    compacted = {"cleanup.policy": "compact"}
    specs.append(TopicSpec(settings.adapters.updates_topic, 1, compacted))
    specs.append(TopicSpec(settings.adapters.status_topic, partitions, compacted))
    specs.append(TopicSpec(settings.adapters.evaluations_topic, partitions))
    return specs


def create_topics(
    kafka: KafkaConnection | str, topics: list[TopicSpec], replication_factor: int
) -> dict[str, str]:
    """Create topics that do not exist yet; returns topic -> "created" | "exists"."""
    admin = admin_client(kafka)
    futures = admin.create_topics(
        [
            NewTopic(
                t.name,
                num_partitions=t.partitions,
                replication_factor=replication_factor,
                config=t.config,
            )
            for t in topics
        ],
        operation_timeout=30,
    )
    outcome: dict[str, str] = {}
    for topic, future in futures.items():
        try:
            future.result()
            outcome[topic] = "created"
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            outcome[topic] = "exists"
    return outcome


def refused_topic(topic: str, error: KafkaError) -> KafkaException:
    """A topic the principal may not describe or read, named (the broker's error does not)."""
    return KafkaException(KafkaError(error.code(), f"{topic}: {error.str()}"))


def _partitions(consumer: Consumer, topics: list[str]) -> list[tuple[str, list[int]]]:
    """Partition ids of each of `topics` that exists; raises on a transient topic error (a
    leader not elected yet) so that the caller asks again rather than reading nothing, and on
    a topic the principal may not describe, rather than reading it as empty."""
    metadata = consumer.list_topics(timeout=30)
    found: list[tuple[str, list[int]]] = []
    for topic in topics:
        described = metadata.topics.get(topic)
        if described is None:
            # A listing leaves out what the principal may not describe: asked by name, the
            # broker says whether the topic is absent or refused.
            described = consumer.list_topics(topic, timeout=30).topics.get(topic)
            if described is None:
                continue
        if described.error is not None:
            if described.error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                raise refused_topic(topic, described.error)
            gone = described.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
            if not gone and transient_metadata_error(described.error):
                raise KafkaException(described.error)
            continue
        found.append((topic, sorted(described.partitions)))
    return found


def read_to_end(
    kafka: KafkaConnection | str,
    topics: list[str],
    *,
    isolation: str = "read_committed",
    reader_factory: Callable[..., Any] = reader,
) -> Iterator[Message]:
    """Every message currently in `topics`, from the beginning to the high watermark."""
    consumer = reader_factory(kafka, isolation=isolation)
    try:
        assignment: list[TopicPartition] = []
        remaining: dict[tuple[str, int], int] = {}
        for topic, partitions in with_metadata_retries(lambda: _partitions(consumer, topics)):
            for partition in partitions:
                low, high = watermarks(consumer, TopicPartition(topic, partition))
                if high > low:
                    assignment.append(TopicPartition(topic, partition, low))
                    remaining[(topic, partition)] = high
        consumer.assign(assignment)
        idle_deadline = time.monotonic() + READ_IDLE_TIMEOUT_S
        while remaining:
            message = consumer.poll(1.0)
            if message is not None:
                if message.error() is not None:
                    if not transient_metadata_error(message.error()):
                        raise KafkaException(message.error())
                    continue  # the consumer recovers by itself; the idle deadline bounds it
                idle_deadline = time.monotonic() + READ_IDLE_TIMEOUT_S
                yield message
            # Positions, not message offsets: transaction markers occupy offsets too.
            done_reading = [
                (tp.topic, tp.partition)
                for tp in consumer.position([TopicPartition(t, p) for t, p in remaining])
                if tp.offset >= remaining[(tp.topic, tp.partition)]
            ]
            for key in done_reading:
                del remaining[key]
            if remaining and time.monotonic() > idle_deadline:
                raise TimeoutError(f"reading {sorted(remaining)} stalled")
    finally:
        consumer.close()
