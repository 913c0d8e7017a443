"""Kafka topic administration and whole-topic reads for the CLI (and tests)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from workers.core.config import PipelineConfig, Settings

READ_IDLE_TIMEOUT_S = 30.0


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
    bootstrap_servers: str, topics: list[TopicSpec], replication_factor: int
) -> dict[str, str]:
    """Create topics that do not exist yet; returns topic -> "created" | "exists"."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
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


def read_to_end(
    bootstrap_servers: str, topics: list[str], *, isolation: str = "read_committed"
) -> Iterator[Message]:
    """Every message currently in `topics`, from the beginning to the high watermark."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"lora-workers-reader-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "isolation.level": isolation,
        },
        logger=None,
    )
    try:
        metadata = consumer.list_topics(timeout=30)
        assignment: list[TopicPartition] = []
        remaining: dict[tuple[str, int], int] = {}
        for topic in topics:
            if topic not in metadata.topics or metadata.topics[topic].error is not None:
                continue
            for partition in metadata.topics[topic].partitions:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=30
                )
                if high > low:
                    assignment.append(TopicPartition(topic, partition, low))
                    remaining[(topic, partition)] = high
        consumer.assign(assignment)
        idle_deadline = time.monotonic() + READ_IDLE_TIMEOUT_S
        while remaining:
            message = consumer.poll(1.0)
            if message is not None:
                if message.error() is not None:
                    raise KafkaException(message.error())
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
