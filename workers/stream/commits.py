"""When answered positions commit: every `commit_interval_ms`, or before a Parquet file is
published; after a failed commit, later and later (up to `retry_backoff_max_s`), never
spinning. What a commit contains is the sink's business (`workers/kafka/transactions.py`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from workers.core.offsets import OffsetTracker
from workers.kafka.sinks import CommitSource, ResultSink

log = structlog.get_logger(__name__)

FIRST_BACKOFF_S = 0.5
FLUSH_TIMEOUT_S = 60.0


class CommitCoordinator:
    def __init__(
        self,
        offsets: OffsetTracker,
        sink: ResultSink,
        source: CommitSource,
        interval_s: float,
        backoff_max_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._offsets = offsets
        self._sink = sink
        self._source = source
        self._interval_s = interval_s
        self._backoff_max_s = backoff_max_s
        self._clock = clock
        self._last_attempt = clock()
        self.backoff_s = 0.0  # 0 unless the last commit failed

    def due(self) -> bool:
        return self._clock() - self._last_attempt >= max(self._interval_s, self.backoff_s)

    def commit_if_due(self) -> None:
        if self.due():
            self.commit()

    def commit_before_publishing(self) -> bool:
        """Before a Parquet file is published: everything answered so far, unless a failed
        commit is still backing off."""
        if self.backoff_s and not self.due():
            return False
        self._sink.flush(FLUSH_TIMEOUT_S)
        return self.commit()

    def commit(self) -> bool:
        """True when every answered position is committed."""
        self._last_attempt = self._clock()
        points = self._offsets.committable()
        if not points:
            return True
        if self._sink.commit(points, self._source):
            self._offsets.mark_committed(points)
            self.backoff_s = 0.0
            log.debug(
                "committed", positions={f"{t}[{p}]": c.position for (t, p), c in points.items()}
            )
            return True
        # Broker away or a rebalance under way: try again later, backing off.
        self.backoff_s = min(max(2 * self.backoff_s, FIRST_BACKOFF_S), self._backoff_max_s)
        log.warning("commit_deferred", retry_in_s=self.backoff_s)
        return False
