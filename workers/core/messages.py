"""A consumed message as plain data, so the stages after the source never touch librdkafka."""

from __future__ import annotations

from dataclasses import dataclass

Headers = list[tuple[str, bytes | None]]


@dataclass(frozen=True)
class SourceMessage:
    """One input record: from a Kafka topic, or a row of a bulk job file."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int
