"""Notices are best effort: a full local queue (the broker away) drops a notice with a log line,
never raises into the engine loop or the worker."""

from __future__ import annotations

import pytest

from workers.core.contracts import AdapterState, AdapterStatus
from workers.kafka import status
from workers.kafka.status import NoticeWriter


def test_a_full_local_queue_drops_the_notice_instead_of_raising(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(status, "ROOM_ATTEMPTS", 3)
    # Nothing listens on port 1: records stay queued, and the queue holds one.
    writer = NoticeWriter("127.0.0.1:1", "adapters.status", {"queue.buffering.max.messages": "1"})
    notice = AdapterStatus(
        name="classifier", version="1", state=AdapterState.SERVING, worker="w1", at_ms=1
    )
    for _ in range(3):
        writer.write_status(notice)  # the second and third find the queue full
    assert len(writer._producer) == 1
    writer._producer.purge()
