"""Fakes of a transactional Kafka producer, the broker's transaction coordinator and the job
source, for fast tests of the exactly-once state machine. They model what the sink relies on:
a transaction's records and offsets become visible together or not at all; a new producer with
the same transactional.id fences the old one and completes (if its commit reached the
coordinator) or aborts its open transaction; `committed` reads the group's offsets back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from workers.core.offsets import Ledger

Key = tuple[str, int]


def kafka_error(code: int, **flags: bool) -> KafkaException:
    return KafkaException(KafkaError(code, "injected", **flags))


@dataclass
class Transaction:
    records: list[tuple[str, bytes | None]] = field(default_factory=list)
    offsets: dict[Key, tuple[int, str]] = field(default_factory=dict)
    commit_reached_coordinator: bool = False


@dataclass
class FakeBroker:
    """The result log, the group's committed offsets, and the coordinator's open transaction."""

    log: list[tuple[str, bytes | None]] = field(default_factory=list)
    committed: dict[Key, tuple[int, str]] = field(default_factory=dict)
    open: Transaction | None = None
    epoch: int = 0
    reachable: bool = True
    # What each commit_transaction call does, in turn; "ok" once the script is used up:
    # "ok", "lost_response" (commits, then the answer is lost: the outcome looks unknown),
    # "unknown" (the request never arrives; the outcome looks unknown), "abortable"; with
    # "+away" the coordinator then becomes unreachable; ":retriable" raises a retriable error
    # rather than a fatal one.
    commit_script: list[str] = field(default_factory=list)
    too_large: set[bytes] = field(default_factory=set)  # record values refused for their size
    producers: list[FakeProducer] = field(default_factory=list)

    def complete(self, transaction: Transaction) -> None:
        self.log.extend(transaction.records)
        self.committed.update(transaction.offsets)

    def new_producer(self, config: dict[str, Any]) -> FakeProducer:
        producer = FakeProducer(self, config)
        self.producers.append(producer)
        return producer

    def values(self) -> list[bytes | None]:
        return [value for _topic, value in self.log]


class FakeProducer:
    def __init__(self, broker: FakeBroker, config: dict[str, Any]) -> None:
        self.broker = broker
        self.config = config
        self.epoch = -1
        self.produced: list[bytes | None] = []
        self._callbacks: list[Callable[[], None]] = []
        self._refused = False  # a record of the open transaction was refused

    def _check(self) -> None:
        if not self.broker.reachable:
            raise kafka_error(KafkaError._TRANSPORT, retriable=True)
        if self.epoch != self.broker.epoch:
            raise kafka_error(KafkaError._FENCED, fatal=True)

    def init_transactions(self, _timeout: float) -> None:
        if not self.broker.reachable:
            raise kafka_error(KafkaError._TRANSPORT, retriable=True)
        pending = self.broker.open
        if pending is not None and pending.commit_reached_coordinator:
            self.broker.complete(pending)
        self.broker.open = None  # completed, or aborted
        self.broker.epoch += 1
        self.epoch = self.broker.epoch

    def begin_transaction(self) -> None:
        self._check()
        self.broker.open = Transaction()

    def produce(
        self,
        topic: str,
        key: bytes | None = None,
        value: bytes | None = None,
        headers: Any = None,
        on_delivery: Callable[..., None] | None = None,
    ) -> None:
        assert self.broker.open is not None
        self.produced.append(value)
        if value in self.broker.too_large:
            error = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large")
            self._refused = True
            self._callbacks.append(lambda: on_delivery and on_delivery(error, None))
            return
        self.broker.open.records.append((topic, value))
        self._callbacks.append(lambda: on_delivery and on_delivery(None, None))

    def send_offsets_to_transaction(
        self, offsets: list[TopicPartition], _group: object, _timeout: float
    ) -> None:
        self._check()
        assert self.broker.open is not None
        for tp in offsets:
            self.broker.open.offsets[(tp.topic, tp.partition)] = (tp.offset, tp.metadata or "")

    def commit_transaction(self, _timeout: float) -> None:
        self._check()
        callbacks, self._callbacks = self._callbacks, []
        refused, self._refused = self._refused, False
        for callback in callbacks:
            callback()
        if refused:
            raise kafka_error(KafkaError._INVALID_ARG, txn_requires_abort=True)
        step = self.broker.commit_script.pop(0) if self.broker.commit_script else "ok"
        step, _, away = step.partition("+")
        if away:
            self.broker.reachable = False
        transaction = self.broker.open
        assert transaction is not None
        if step == "abortable":
            raise kafka_error(KafkaError._TIMED_OUT, txn_requires_abort=True)
        step, _, how = step.partition(":")
        # How the outcome looks unknown: a fatal error, or a retriable one (then retried).
        unknown = kafka_error(KafkaError._TIMED_OUT, **{how or "fatal": True})
        if step == "lost_response":
            transaction.commit_reached_coordinator = True
            self.broker.complete(transaction)
            self.broker.open = None
            raise unknown
        if step == "unknown":
            raise unknown
        self.broker.complete(transaction)
        self.broker.open = None

    def abort_transaction(self, _timeout: float) -> None:
        self._check()
        self._callbacks, self._refused = [], False
        self.broker.open = None

    def poll(self, _timeout: float) -> int:
        return 0

    def flush(self, _timeout: float) -> int:
        return 0


class FakeSource:
    """The part of the job source a commit uses: group metadata and committed offsets."""

    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker

    def group_metadata(self) -> object:
        return object()

    def committed_ledger(self, key: Key) -> Ledger:
        if not self.broker.reachable:
            raise kafka_error(KafkaError._TRANSPORT, retriable=True)
        position, metadata = self.broker.committed.get(key, (-1001, ""))
        return Ledger.decode(position, metadata)
