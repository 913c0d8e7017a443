"""Where answers go: results to the task's result topic, rejects to a dead-letter topic.

Every write reports back through `on_delivered` only once the broker acknowledged it; the worker
marks the source offset finished then, and not before (at-least-once).
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from confluent_kafka import KafkaError, Message, Producer

from workers.contracts import AdapterStatus, Result
from workers.source import SourceMessage

log = structlog.get_logger(__name__)

OnDelivered = Callable[[], None]

# Dead-letter headers added to the original ones, so a replay tool knows where a record came from.
DLQ_ERROR_CODE = "dlq.error.code"
DLQ_ERROR_MESSAGE = "dlq.error.message"
DLQ_SOURCE_TOPIC = "dlq.source.topic"
DLQ_SOURCE_PARTITION = "dlq.source.partition"
DLQ_SOURCE_OFFSET = "dlq.source.offset"


class DeliveryFailed(Exception):
    """The broker did not take a record after librdkafka's own retries; nothing is committed."""


class KafkaSink:
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
        self._failure: KafkaError | None = None

    def write_result(self, topic: str, result: Result, on_delivered: OnDelivered) -> None:
        self._produce(
            topic,
            key=result.job_id.encode(),
            value=result.model_dump_json().encode(),
            headers=[("content-type", b"application/json")],
            on_delivered=on_delivered,
        )

    def write_dead_letter(
        self, topic: str, source: SourceMessage, code: str, message: str, on_delivered: OnDelivered
    ) -> None:
        headers = [
            *source.headers,
            (DLQ_ERROR_CODE, code.encode()),
            (DLQ_ERROR_MESSAGE, message.encode()),
            (DLQ_SOURCE_TOPIC, source.topic.encode()),
            (DLQ_SOURCE_PARTITION, str(source.partition).encode()),
            (DLQ_SOURCE_OFFSET, str(source.offset).encode()),
        ]
        self._produce(
            topic, key=source.key, value=source.value, headers=headers, on_delivered=on_delivered
        )

    def write_status(self, topic: str, status: AdapterStatus) -> None:
        """Best effort: a lost status message is logged, never fatal to the worker."""

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                log.warning("status_delivery_failed", topic=topic, error=str(error))

        self._producer.produce(
            topic,
            key=status.name.encode(),
            value=status.model_dump_json().encode(),
            on_delivery=delivered,
        )
        self._producer.poll(0)

    def _produce(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | None]],
        on_delivered: OnDelivered,
    ) -> None:
        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                log.error("delivery_failed", topic=topic, error=str(error))
                self._failure = error
                return
            on_delivered()

        while True:
            try:
                self._producer.produce(
                    topic, key=key, value=value, headers=headers, on_delivery=delivered
                )
                break
            except BufferError:
                # Local queue full: serve delivery reports until there is room again.
                self._producer.poll(0.1)
        self.poll(0)

    def poll(self, timeout_s: float) -> None:
        """Serve delivery reports; raises `DeliveryFailed` if any write was lost."""
        self._producer.poll(timeout_s)
        if self._failure is not None:
            raise DeliveryFailed(str(self._failure))

    def flush(self, timeout_s: float) -> None:
        remaining = self._producer.flush(timeout_s)
        if self._failure is not None:
            raise DeliveryFailed(str(self._failure))
        if remaining:
            raise DeliveryFailed(f"{remaining} records not acknowledged within {timeout_s}s")
