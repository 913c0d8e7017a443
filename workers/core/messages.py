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

    @property
    def size(self) -> int:
        """Bytes of key, value and headers: what the broker counts against its limits."""
        return record_size(self.key, self.value, self.headers)


def record_size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    return (
        len(key or b"")
        + len(value or b"")
        + sum(len(name) + len(data or b"") for name, data in headers)
    )
