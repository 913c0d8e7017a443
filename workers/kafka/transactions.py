"""Exactly-once answers: results, dead letters and consumed offsets commit in one transaction.

Admission by adapter and tenant finishes jobs out of order. An answer is held here until the
next commit, which writes, in one transaction, the answers its commit points cover and those
points (`send_offsets_to_transaction` with the consumer's group metadata, which fences a member
the group has moved on from): each partition's position (the first unanswered message) and, in
the offset's metadata, the ledger of messages answered beyond it (`workers.core.offsets`), whose
answers are in the same transaction. Whoever reads the partition from that position skips what
the ledger covers, so an answer need not wait for the messages before it and is still written
exactly once. A crash at any point leaves either the whole transaction or none of it; readers
use `read_committed`.

Failures follow confluent-kafka's transactional API: a retriable error retries the same call, an
abortable one aborts, a fatal one (e.g. fenced) gets a fresh producer. Held answers stay in
memory through all of these, so an aborted transaction is simply tried again: nothing is
re-generated and the consumer need not rewind.

A commit whose outcome stays unknown (retriable errors past the deadline, or a fatal error during
`commit_transaction`) may still have committed: the coordinator completes a transaction whose
commit reached it. Nothing is sent again until the outcome is known: a fresh producer's
`init_transactions` completes (or aborts) whatever the old one left, then the group's committed
offsets and ledgers are read back and compared with the commit points that were sent. Equal:
it committed, and its answers are dropped from memory. Different: it did not, and they are sent
again in the next transaction.

The producer is made, and `init_transactions` called, as the worker starts (`start`): a
killed predecessor's open transaction would otherwise keep the group's committed offsets
unstable, and the partitions unreadable, until its transaction timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from workers import metrics
from workers.core.config import SizeSettings
from workers.core.offsets import CommitPoint, TopicPartitionKey
from workers.kafka.clients import (
    KafkaConnection,
    denied_for_good,
    describe,
    transactional_producer,
)
from workers.kafka.sinks import (
    CommitSource,
    DeliveryFailed,
    OnDone,
    OutputRecord,
    Position,
    cannot_be_written,
    produce_record,
    producer_config,
    stand_in_for,
)
from workers.kafka.source import to_topic_partitions
from workers.threads import on_daemon_thread

log = structlog.get_logger(__name__)

CALL_TIMEOUT_S = 10.0
RETRIES_PER_CALL = 3
SEND_OFFSETS_DEADLINE_S = 30.0

T = TypeVar("T")
ProducerFactory = Callable[[dict[str, Any]], Producer]


class CommitInDoubt(Exception):
    """`commit_transaction` ended without saying whether the transaction committed."""


class ExactlyOnceSink:
    def __init__(
        self,
        kafka: KafkaConnection | str,
        transactional_id: str,
        transaction_timeout_ms: int,
        sizes: SizeSettings,
        extra_config: dict[str, str] | None = None,
        producer_factory: ProducerFactory | None = None,
    ) -> None:
        self._new_producer = producer_factory or partial(transactional_producer, kafka)
        self._config: dict[str, Any] = {
            **producer_config(sizes),
            # Stable per replica (see Settings.instance_id): the next producer with this id
            # aborts whatever a killed predecessor left open.
            "transactional.id": transactional_id,
            "transaction.timeout.ms": transaction_timeout_ms,
            **(extra_config or {}),  # per-sink overrides (tests)
        }
        # How long retriable commit errors are retried; past it the outcome is in doubt. The
        # coordinator does not abort a commit that reached it, so it must be settled, not assumed.
        self._commit_deadline_s = transaction_timeout_ms / 1000 + CALL_TIMEOUT_S
        self._producer: Producer | None = None
        self._abandoned: list[Producer] = []
        self._held: dict[TopicPartitionKey, dict[int, OutputRecord]] = {}
        # The commit points of a transaction whose outcome is not known yet: nothing is sent
        # until it is.
        self._in_doubt: dict[TopicPartitionKey, CommitPoint] | None = None

    def start(self) -> None:
        """Fence and finish a predecessor's open transaction now rather than at the first
        commit. A broker that is away is not fatal here: the first commit tries again."""
        try:
            self._ready_producer()
        except KafkaException as exc:
            if denied_for_good(exc.args[0]):
                raise  # e.g. the transactional id denied: no later commit can do better
            log.warning("transactional_producer_not_ready", error=str(exc.args[0]))
            self._producer = None

    def _ready_producer(self) -> Producer:
        if self._producer is None:
            producer = self._new_producer(self._config)
            # Fences older producers with this transactional.id and aborts their open work.
            self._retrying(lambda: producer.init_transactions(CALL_TIMEOUT_S))
            self._producer = producer
            log.info(
                "transactional_producer_ready", transactional_id=self._config["transactional.id"]
            )
        return self._producer

    def write(self, position: Position, record: OutputRecord, on_done: OnDone) -> None:
        topic, partition, offset = position
        self._held.setdefault((topic, partition), {})[offset] = record
        on_done()

    def held(self) -> int:
        return sum(len(records) for records in self._held.values())

    def discard(self, partitions: set[TopicPartitionKey]) -> None:
        for key in partitions:
            self._held.pop(key, None)
            if self._in_doubt is not None:
                self._in_doubt.pop(key, None)  # the next owner reads what was committed

    def commit(self, points: dict[TopicPartitionKey, CommitPoint], source: CommitSource) -> bool:
        """One transaction: the held answers the commit points cover, and the points. False
        when it did not commit (or may not have: then nothing is sent until that is known);
        the answers stay held for the next attempt."""
        if self._in_doubt is not None and self._settle_doubt(source) is None:
            return False
        answers = self._covered_answers(points)
        failed: list[tuple[Position, KafkaError]] = []
        try:
            producer = self._ready_producer()
            producer.begin_transaction()
            for at, record in answers:
                self._produce(producer, at, record, failed)
            offsets = to_topic_partitions(points)
            group = source.group_metadata()
            sent = on_daemon_thread(
                lambda: producer.send_offsets_to_transaction(offsets, group, CALL_TIMEOUT_S),
                name="send-offsets",
            )
            try:
                sent.result(timeout=SEND_OFFSETS_DEADLINE_S)  # its KafkaException raises here
            except TimeoutError:
                self._abandon_producer()
                return False
            self._commit_until_known(producer)
        except CommitInDoubt as doubt:
            log.error("transaction_outcome_unknown", error=str(doubt), partitions=len(points))
            metrics.TRANSACTIONS.labels("in_doubt").inc()
            self._in_doubt = dict(points)
            self._abandon_producer()
            # Settled now, or at the start of a later commit: nothing is sent before that.
            return self._settle_doubt(source) is True
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if denied_for_good(error):
                raise  # the group or transactional id denied: the worker stops, one line
            self._recover(error)
            if self._producer is not None:
                self._producer.poll(0)  # delivery reports the abort left queued
            self._replace_undeliverable(failed, error)
            return False
        self._drop(answers)
        metrics.TRANSACTIONS.labels("committed").inc()
        log.info("transaction_committed", records=len(answers), partitions=len(points))
        return True

    def _covered_answers(
        self, points: dict[TopicPartitionKey, CommitPoint]
    ) -> list[tuple[Position, OutputRecord]]:
        """The held answers that commit points cover: before the position or in the ledger."""

        def covered(key: TopicPartitionKey, offset: int) -> bool:
            point = points[key]
            return offset < point.position or point.ledger.covers(offset)

        return [
            ((key[0], key[1], offset), record)
            for key in points
            for offset, record in self._held.get(key, {}).items()
            if covered(key, offset)
        ]

    def _drop(self, answers: list[tuple[Position, OutputRecord]]) -> None:
        for (topic, partition, offset), _ in answers:
            self._held[(topic, partition)].pop(offset, None)

    def _settle_doubt(self, source: CommitSource) -> bool | None:
        """Whether the in-doubt transaction committed; None while that is still unknown (the
        broker away). A fresh producer's init_transactions first completes what the old
        one left open, so the group's committed offsets are stable when read back."""
        points = self._in_doubt
        assert points is not None
        try:
            self._ready_producer()
            committed = [(source.committed_ledger(key), point) for key, point in points.items()]
        except KafkaException as exc:
            log.warning("transaction_outcome_still_unknown", error=str(exc.args[0]))
            self._replace_producer()
            return None
        self._in_doubt = None
        # One transaction: its partitions' offsets all committed, or none did.
        landed = bool(committed) and all(
            ledger.position == point.position and ledger.metadata == point.ledger.metadata
            for ledger, point in committed
        )
        if landed:
            self._drop(self._covered_answers(points))
            metrics.TRANSACTIONS.labels("committed").inc()
        log.warning("transaction_outcome_settled", committed=landed, partitions=len(points))
        return landed

    def _produce(
        self,
        producer: Producer,
        at: Position,
        record: OutputRecord,
        failed: list[tuple[Position, KafkaError]],
    ) -> None:
        """Produce one held answer into the open transaction; a delivery error names it."""

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                failed.append((at, error))

        try:
            produce_record(producer, record, on_delivery=delivered)
        except KafkaException as exc:  # refused before sending, e.g. larger than allowed
            minimal = self._hold_stand_in(at, record, str(exc.args[0]))
            produce_record(producer, minimal, on_delivery=delivered)

    def _replace_undeliverable(
        self, failed: list[tuple[Position, KafkaError]], cause: KafkaError
    ) -> None:
        """An answer the broker refused for good is replaced by its minimal dead letter before
        the next attempt: one bad answer must not keep every partition's offsets from
        committing. A transaction refused for a topic without a delivery report naming the
        answer (librdkafka can report a denied topic only as the transaction's error) would
        be refused again and again: `DeliveryFailed` stops the worker with one line instead."""
        refused = [(at, error) for at, error in failed if cannot_be_written(error)]
        if not refused and cause.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            raise DeliveryFailed(
                f"a transaction was refused ({describe(cause)}) and no answer's delivery "
                "report named the topic; check the principal's Write ACLs on the result and "
                "dead-letter topics"
            )
        for at, error in refused:
            record = self._held.get((at[0], at[1]), {}).get(at[2])
            if record is not None:
                self._hold_stand_in(at, record, describe(error))

    def _hold_stand_in(self, at: Position, record: OutputRecord, error: str) -> OutputRecord:
        minimal = stand_in_for(record, at, error)
        self._held[(at[0], at[1])][at[2]] = minimal
        return minimal

    def _commit_until_known(self, producer: Producer) -> None:
        """librdkafka: a retriable commit error leaves the outcome unknown; commit again until it
        is known. An abortable error raises to `_recover` (it did not commit); a fatal one, or
        retriable ones past the deadline, leave the outcome unknown: CommitInDoubt."""
        deadline = time.monotonic() + self._commit_deadline_s
        attempt = 0
        while True:
            try:
                producer.commit_transaction(CALL_TIMEOUT_S)
                return
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if error.txn_requires_abort() and not error.fatal():
                    raise
                attempt += 1
                if not error.retriable() or time.monotonic() > deadline:
                    raise CommitInDoubt(str(error)) from exc
                log.info("transaction_commit_retry", error=str(error), attempt=attempt)
                time.sleep(min(0.5 * attempt, 5.0))

    def _recover(self, error: KafkaError) -> None:
        metrics.TRANSACTIONS.labels("failed").inc()
        log.warning(
            "transaction_failed",
            error=str(error),
            retriable=error.retriable(),
            abortable=error.txn_requires_abort(),
            fatal=error.fatal(),
        )
        producer = self._producer
        if producer is None or error.fatal():
            self._replace_producer()
            return
        try:
            self._retrying(lambda: producer.abort_transaction(CALL_TIMEOUT_S))
        except KafkaException as abort_error:
            # No transaction open (begin failed), or the broker is still away: a new producer
            # with the same transactional.id aborts whatever is left open.
            log.warning("transaction_abort_failed", error=str(abort_error.args[0]))
            self._replace_producer()

    def _abandon_producer(self) -> None:
        # librdkafka's send_offsets_to_transaction can ignore its timeout and block for good
        # when the group coordinator went away (confluentinc/librdkafka#5456, #5511; seen here
        # after a broker restart). That producer is never used again, so its transaction is
        # never committed; the next producer's init_transactions fences and aborts it. It is
        # kept referenced: destroying a producer stuck in a call would block this thread too.
        log.error("transactional_producer_abandoned", deadline_s=SEND_OFFSETS_DEADLINE_S)
        metrics.TRANSACTIONS.labels("failed").inc()
        if self._producer is not None:
            self._abandoned.append(self._producer)
        self._producer = None

    def _replace_producer(self) -> None:
        self._producer = None  # made again, with init_transactions, on the next commit

    @staticmethod
    def _retrying(call: Callable[[], T]) -> T:
        for attempt in range(RETRIES_PER_CALL):
            try:
                return call()
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if not error.retriable() or attempt == RETRIES_PER_CALL - 1:
                    raise
                log.info("transaction_call_retry", error=str(error), attempt=attempt + 1)
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def poll(self) -> None:
        if self._producer is not None:
            self._producer.poll(0)

    def flush(self, timeout_s: float) -> None:
        """Nothing is written outside a transaction; `commit` is the flush."""

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(CALL_TIMEOUT_S)
