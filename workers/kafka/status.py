"""Notices about adapters, best effort and never part of a transaction: statuses on
`adapters.status` (and reading them back), shadow evaluations on `adapters.evaluations`."""

from __future__ import annotations

from collections.abc import Callable

import structlog
from confluent_kafka import KafkaError, KafkaException, Message
from pydantic import BaseModel, ValidationError

from workers.core.contracts import AdapterState, AdapterStatus, AdapterUpdate
from workers.kafka.clients import KafkaConnection, producer
from workers.kafka.topics import read_to_end

log = structlog.get_logger(__name__)

ROOM_ATTEMPTS = 20
ROOM_WAIT_S = 0.1


class NoticeWriter:
    """Writes keyed JSON records to one topic; a lost record is logged, never fatal."""

    def __init__(
        self,
        kafka: KafkaConnection | str,
        topic: str,
        extra_config: dict[str, str] | None = None,
    ) -> None:
        self._topic = topic
        self._producer = producer(kafka, {"acks": "all", **(extra_config or {})})

    def write(self, key: str, record: BaseModel) -> None:
        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                log.warning("notice_delivery_failed", topic=self._topic, error=str(error))

        try:
            self._produce_when_room(key.encode(), record.model_dump_json().encode(), delivered)
        except (BufferError, KafkaException) as exc:  # best effort: never the caller's failure
            log.warning("notice_dropped", topic=self._topic, key=key, error=str(exc))
        self._producer.poll(0)

    def _produce_when_room(
        self, key: bytes, value: bytes, delivered: Callable[[KafkaError | None, Message], None]
    ) -> None:
        """A full local queue (the broker away) is waited on briefly, then the notice dropped."""
        for _ in range(ROOM_ATTEMPTS):
            try:
                self._producer.produce(self._topic, key=key, value=value, on_delivery=delivered)
                return
            except BufferError:
                self._producer.poll(ROOM_WAIT_S)
        raise BufferError(f"local queue still full after {ROOM_ATTEMPTS * ROOM_WAIT_S:.0f} s")

    def write_status(self, status: AdapterStatus) -> None:
        self.write(status.key, status)

    def close(self) -> None:
        self._producer.flush(10)


def read_statuses(kafka: KafkaConnection | str, topic: str) -> list[AdapterStatus]:
    """Every status on the topic, in order; a record that is not a status is skipped."""
    statuses: list[AdapterStatus] = []
    for message in read_to_end(kafka, [topic]):
        try:
            statuses.append(AdapterStatus.model_validate_json(message.value() or b""))
        except ValidationError:
            log.warning("status_unreadable", topic=topic, offset=message.offset())
    return statuses


def last_serving_states(statuses: list[AdapterStatus]) -> dict[str, AdapterUpdate]:
    """Per adapter, the most recently published state some worker reported serving."""
    states: dict[str, AdapterUpdate] = {}
    for status in statuses:
        update = status.update
        if status.state is not AdapterState.SERVING or update is None:
            continue
        known = states.get(update.name)
        if known is None or update.published_at_ms >= known.published_at_ms:
            states[update.name] = update
    return states
