"""A consumed message as plain data, so the stages after the source never touch librdkafka."""

from __future__ import annotations

import re
from dataclasses import dataclass

Headers = list[tuple[str, bytes | None]]

# W3C Trace Context: version-trace_id-parent_id-flags, ids not all zeros.
TRACEPARENT = "traceparent"
_TRACEPARENT = re.compile(rb"^[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")


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
    def traceparent(self) -> str | None:
        """The job's W3C `traceparent` header when it holds a valid one; carried to its answer
        and into the log lines about it."""
        return traceparent_of(self.headers)

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


def traceparent_of(headers: Headers) -> str | None:
    for name, value in headers:
        if name.lower() == TRACEPARENT and value is not None and _TRACEPARENT.match(value):
            return value.decode()
    return None


def traced(message: SourceMessage) -> dict[str, str]:
    """Log fields naming the message's trace, if it carries one."""
    traceparent = message.traceparent
    return {} if traceparent is None else {TRACEPARENT: traceparent}
