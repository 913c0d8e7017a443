"""The adapter-update topic: read whole at start-up, then followed; and the status topic.

Every worker reads `adapters.updates` with its own consumer (assigned partitions, no group), so
each one learns every adapter's latest state, however many workers run.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from workers.adapters.updates import UpdateRecord, decode_update
from workers.kafka.clients import KafkaConnection, consumer
from workers.kafka.topics import refused_topic, watermarks, with_metadata_retries

log = structlog.get_logger(__name__)


class AdapterUpdateFeed:
    def __init__(
        self,
        kafka: KafkaConnection | str,
        topic: str,
        consumer_factory: Callable[[KafkaConnection | str, dict[str, Any]], Any] = consumer,
    ) -> None:
        self._topic = topic
        self._consumer = consumer_factory(
            kafka,
            {
                # A throwaway group id: offsets are never committed, the topic is replayed.
                "group.id": f"lora-workers-adapters-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
            },
        )
        metadata = with_metadata_retries(lambda: self._consumer.list_topics(topic, timeout=30))
        described = metadata.topics.get(topic)
        error = described.error if described is not None else None
        if error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            raise refused_topic(topic, error)  # not served as if it were empty
        partitions = described.partitions if described is not None and error is None else {}
        if not partitions:
            log.warning("adapter_updates_topic_missing", topic=topic)
        self._partitions = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions]
        self._consumer.assign(self._partitions)

    def catch_up(self, apply: Callable[[UpdateRecord], None], timeout_s: float) -> int:
        """Apply every record up to the current end of the topic; returns how many."""
        ends = {}
        for tp in self._partitions:
            _, high = watermarks(self._consumer, tp)
            ends[tp.partition] = high
        deadline = time.monotonic() + timeout_s
        applied = 0
        while any(self._position(p) < end for p, end in ends.items()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {self._topic} to its end in {timeout_s}s")
            applied += self.follow(apply, timeout_s=0.5)
        return applied

    def follow(self, apply: Callable[[UpdateRecord], None], timeout_s: float = 0.0) -> int:
        """Apply whatever arrived since the last call."""
        if not self._partitions:
            return 0
        messages = self._consumer.consume(num_messages=100, timeout=timeout_s)
        for message in messages:
            if message.error() is not None:
                if message.error().fatal():
                    raise KafkaException(message.error())
                log.warning("adapter_updates_error", error=str(message.error()))
                continue
            apply(decode_update(message.key(), message.value()))
        return len(messages)

    def _position(self, partition: int) -> int:
        (tp,) = self._consumer.position([TopicPartition(self._topic, partition)])
        return tp.offset if tp.offset >= 0 else 0

    def close(self) -> None:
        self._consumer.close()
