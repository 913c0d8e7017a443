"""Intake: consume with backpressure, resume each partition from what its previous owner
committed, skip what that owner answered beyond its position, then prepare (decode, route,
tokenize) in chunks and submit to the engine loop."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Protocol

import structlog

from workers import metrics
from workers.core.errors import JobRejected
from workers.core.messages import SourceMessage
from workers.core.offsets import Ledger, OffsetTracker, TopicPartitionKey
from workers.core.prepare import PreparedJob

log = structlog.get_logger(__name__)

PREPARE_CHUNK = 64  # messages staged, routed and submitted at a time
POLL_INTERVAL_S = 0.5  # consume timeout with nothing in flight
POLL_WHILE_BUSY_S = 0.01  # with work in flight: how soon a finished job's answer is written

Position = tuple[str, int, int]


def position_of(source: SourceMessage) -> Position:
    return (source.topic, source.partition, source.offset)


class Source(Protocol):
    def consume(self, max_messages: int, timeout_s: float) -> list[SourceMessage]: ...
    def committed_ledger(self, key: TopicPartitionKey) -> Ledger: ...
    def pause_all(self) -> None: ...
    def resume_all(self) -> None: ...


class Preparer(Protocol):
    def stage_all(self, messages: list[SourceMessage]) -> list[PreparedJob | JobRejected]: ...
    def route_all(
        self, staged: list[PreparedJob | JobRejected]
    ) -> list[PreparedJob | JobRejected]: ...


class Submitted:
    """Jobs handed to the engine loop, by position. An outcome counts only if its job is still
    the one here: a revoked partition's jobs are dropped, and may come back."""

    def __init__(self) -> None:
        self._jobs: dict[Position, PreparedJob] = {}

    def add(self, job: PreparedJob) -> None:
        self._jobs[position_of(job.source)] = job

    def take(self, job: PreparedJob) -> bool:
        """True, and forgotten, when `job` is the one submitted at its position."""
        position = position_of(job.source)
        submitted = self._jobs.get(position)
        if submitted is None or submitted.source is not job.source:
            return False
        del self._jobs[position]
        return True

    def drop(self, partitions: set[TopicPartitionKey]) -> int:
        dropped = [p for p in self._jobs if (p[0], p[1]) in partitions]
        for position in dropped:
            del self._jobs[position]
        return len(dropped)

    def __len__(self) -> int:
        return len(self._jobs)


class Intake:
    def __init__(
        self,
        source: Source,
        offsets: OffsetTracker,
        preparer: Preparer,
        submit: Callable[[Iterable[PreparedJob]], None],
        submitted: Submitted,
        routing: threading.Lock,
        *,
        consume_batch: int,
        max_in_flight: int,
        in_flight: Callable[[], int],
        answered_before: Callable[[SourceMessage], None],
        reject: Callable[[SourceMessage, JobRejected], None],
    ) -> None:
        self._source = source
        self._offsets = offsets
        self._preparer = preparer
        self._submit = submit
        self._submitted = submitted
        self._routing = routing
        self._consume_batch = consume_batch
        self._max_in_flight = max_in_flight
        self._in_flight = in_flight  # unanswered or uncommitted messages
        self._answered_before = answered_before
        self._reject = reject
        self.paused = False

    def consume(self, busy: bool) -> list[SourceMessage]:
        """The next messages. Backpressure: fetching pauses while too much work is unanswered
        or uncommitted, and the source is still polled so the consumer stays in its group."""
        overloaded = self._in_flight() >= self._max_in_flight
        if overloaded != self.paused:
            (self._source.pause_all if overloaded else self._source.resume_all)()
            self.paused = overloaded
        timeout = POLL_WHILE_BUSY_S if busy else POLL_INTERVAL_S
        messages = self._source.consume(self._consume_batch, timeout)
        for topic, count in Counter(message.topic for message in messages).items():
            metrics.MESSAGES_CONSUMED.labels(topic).inc(count)
        return messages

    def accept(self, messages: list[SourceMessage]) -> None:
        fresh: list[SourceMessage] = []
        for message in messages:
            key = (message.topic, message.partition)
            if not self._offsets.resumed(key):
                self._resume(key)
            self._offsets.track(message.topic, message.partition, message.offset)
            if self._offsets.already_answered(message.topic, message.partition, message.offset):
                # Answered by this partition's previous owner, beyond the offset it could
                # commit: its answer is already on the result topic.
                self._answered_before(message)
                continue
            fresh.append(message)
        # In chunks, so the engine starts on the first jobs while later ones are embedded.
        for start in range(0, len(fresh), PREPARE_CHUNK):
            self._prepare(fresh[start : start + PREPARE_CHUNK])

    def _resume(self, key: TopicPartitionKey) -> None:
        ledger = self._source.committed_ledger(key)
        if ledger.highest >= ledger.position:
            log.info(
                "partition_resumed_with_ledger",
                partition=key,
                position=ledger.position,
                answered_beyond=ledger.covered_count(),
            )
        self._offsets.resume(key, ledger)

    def _prepare(self, messages: list[SourceMessage]) -> None:
        staged = self._preparer.stage_all(messages)  # embedding routes take a while: unlocked
        prepared: list[PreparedJob] = []
        with self._routing:
            for message, job in zip(messages, self._preparer.route_all(staged), strict=True):
                if isinstance(job, JobRejected):
                    self._reject(message, job)
                    continue
                self._submitted.add(job)
                prepared.append(job)
            self._submit(prepared)
