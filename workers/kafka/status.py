"""Adapter status notices on `adapters.status`: best effort, never part of a transaction."""

from __future__ import annotations

import structlog
from confluent_kafka import KafkaError, Message, Producer

from workers.core.contracts import AdapterStatus

log = structlog.get_logger(__name__)


class AdapterStatusWriter:
    def __init__(self, bootstrap_servers: str, topic: str, extra_config: dict[str, str]) -> None:
        self._topic = topic
        self._producer = Producer(
            {"bootstrap.servers": bootstrap_servers, "acks": "all", **extra_config}, logger=None
        )

    def write(self, status: AdapterStatus) -> None:
        """A lost status message is logged, never fatal to the worker."""

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                log.warning("status_delivery_failed", topic=self._topic, error=str(error))

        self._producer.produce(
            self._topic,
            key=status.name.encode(),
            value=status.model_dump_json().encode(),
            on_delivery=delivered,
        )
        self._producer.poll(0)

    def close(self) -> None:
        self._producer.flush(10)
