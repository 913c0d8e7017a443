"""The job source on a real broker: a paused worker stays paused for partitions it is assigned
later (backpressure and shutdown rely on it)."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Producer

from workers.kafka.source import KafkaJobSource, RebalanceHandlers
from workers.kafka.topics import TopicSpec, create_topics


def _source(bootstrap: str, group: str, topic: str, strategy: str) -> KafkaJobSource:
    return KafkaJobSource(
        bootstrap,
        group,
        [topic],
        {"partition.assignment.strategy": strategy, "session.timeout.ms": "6000"},
        RebalanceHandlers(revoked=lambda _p: None, lost=lambda _p: None),
    )


def _consume_for(source: KafkaJobSource, seconds: float) -> list[int]:
    partitions: list[int] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        partitions += [m.partition for m in source.consume(100, 0.2)]
    return partitions


def test_partitions_assigned_while_paused_stay_paused(kafka_bootstrap: str) -> None:
    for strategy in ("cooperative-sticky", "range"):
        topic = f"jobs.paused-{uuid.uuid4().hex[:8]}"
        create_topics(kafka_bootstrap, [TopicSpec(topic, 2)], 1)
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        for partition in (0, 1):
            for n in range(5):
                producer.produce(topic, value=f"{partition}-{n}".encode(), partition=partition)
        producer.flush(30)
        group = f"paused-{uuid.uuid4().hex[:8]}"
        first = _source(kafka_bootstrap, group, topic, strategy)
        second = _source(kafka_bootstrap, group, topic, strategy)
        try:
            # Both join; each owns one partition. The first pauses, then the second leaves,
            # and its partition moves to the paused first member.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (first.lag() and second.lag()):
                first.consume(100, 0.2)
                second.consume(100, 0.2)
            assert first.lag() and second.lag(), strategy
            first.pause_all()
            second.close()
            moved_to_first = _consume_for(first, 12)
            assert moved_to_first == [], (strategy, moved_to_first)
            assert len(first.lag()) == 2, strategy  # it was assigned both
            first.resume_all()
            assert len(_consume_for(first, 10)) >= 5, strategy
        finally:
            first.close()


def test_a_member_without_partitions_has_joined(kafka_bootstrap: str) -> None:
    """More members than partitions: the spare one is a healthy member (`/readyz` is 200)."""
    topic = f"jobs.spare-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, [TopicSpec(topic, 1)], 1)
    group = f"spare-{uuid.uuid4().hex[:8]}"
    members = [_source(kafka_bootstrap, group, topic, "cooperative-sticky") for _ in range(2)]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(m.joined() for m in members):
            for member in members:
                member.consume(10, 0.2)
        assert all(m.joined() for m in members)
        assert sorted(len(m.lag()) for m in members) == [0, 1]
    finally:
        for member in members:
            member.close()
