"""Authorization errors at run time are answers, not crashes: a worker denied one result topic
dead-letters those answers as `undeliverable` and commits the rest; denied its dead-letter topic
too, or its group or transactional id, it stops with one line. `adapters publish` refused by the
broker is one line."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from tests.unit.kafka_fakes import FakeBroker, FakeProducer, FakeSource
from workers.adapters import admin, feed
from workers.core.config import Settings, SizeSettings
from workers.core.contracts import AdapterUpdate, AdapterVersionSpec
from workers.core.offsets import CommitPoint, Ledger
from workers.kafka import topics
from workers.kafka.clients import KafkaUnavailable, describe
from workers.kafka.sinks import DLQ_ERROR_CODE, DLQ_ERROR_MESSAGE, DeliveryFailed, OutputRecord
from workers.kafka.source import KafkaJobSource, RebalanceHandlers
from workers.kafka.transactions import ExactlyOnceSink

TOPIC = "jobs.classify"
DENIED = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "Broker: Topic authorization failed")


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("workers.kafka.transactions.time.sleep", lambda _s: None)


class DeniedTopicsProducer(FakeProducer):
    """A producer whose principal may not write some topics: their records' delivery reports
    say so and the transaction must be aborted, as librdkafka reports them."""

    def __init__(self, broker: FakeBroker, config: dict[str, Any], denied: set[str]) -> None:
        super().__init__(broker, config)
        self.denied = denied
        self.headers: list[Any] = []

    def produce(
        self,
        topic: str,
        key: bytes | None = None,
        value: bytes | None = None,
        headers: Any = None,
        on_delivery: Any = None,
    ) -> None:
        if topic not in self.denied:
            self.headers.append((topic, headers))
            super().produce(topic, key, value, headers, on_delivery)
            return
        self._refused = True
        self._callbacks.append(lambda: on_delivery and on_delivery(DENIED, None))


def denying(broker: FakeBroker, denied: set[str]) -> ExactlyOnceSink:
    producers: list[DeniedTopicsProducer] = []

    def new_producer(config: dict[str, Any]) -> DeniedTopicsProducer:
        producer = DeniedTopicsProducer(broker, config, denied)
        producers.append(producer)
        return producer

    sink = ExactlyOnceSink("fake:9092", "tx", 60_000, SizeSettings(), producer_factory=new_producer)
    sink.producers = producers  # type: ignore[attr-defined]
    return sink


def answer(offset: int, topic: str) -> OutputRecord:
    return OutputRecord(
        topic=topic,
        key=f"job-{offset}".encode(),
        value=f"answer {offset}".encode(),
        headers=[],
        dead_letter_topic="jobs.classify.dlq",
    )


def up_to(position: int) -> dict[tuple[str, int], CommitPoint]:
    return {(TOPIC, 0): CommitPoint(position, Ledger(position))}


def test_answers_to_a_denied_result_topic_are_dead_lettered_and_the_rest_commit() -> None:
    broker = FakeBroker()
    sink = denying(broker, {"results.denied"})
    source = FakeSource(broker)
    topics = ["results.classify", "results.denied", "results.classify"]
    for offset, topic in enumerate(topics):
        sink.write((TOPIC, 0, offset), answer(offset, topic), lambda: None)
    assert not sink.commit(up_to(3), source)  # aborted: one record was refused
    assert sink.commit(up_to(3), source)
    assert broker.log == [
        ("results.classify", b"answer 0"),
        ("jobs.classify.dlq", None),  # the minimal undeliverable answer, no payload
        ("results.classify", b"answer 2"),
    ]
    assert broker.committed[(TOPIC, 0)][0] == 3
    written = sink.producers[-1].headers  # type: ignore[attr-defined]
    headers = dict(next(h for topic, h in written if topic == "jobs.classify.dlq"))
    assert headers[DLQ_ERROR_CODE] == b"undeliverable"
    assert headers[DLQ_ERROR_MESSAGE] == (
        b"writing to results.denied: not authorized (topic): Broker: Topic authorization failed"
    )


def test_a_denied_dead_letter_topic_too_stops_the_worker_with_one_line() -> None:
    broker = FakeBroker()
    sink = denying(broker, {"results.denied", "jobs.classify.dlq"})
    source = FakeSource(broker)
    sink.write((TOPIC, 0, 0), answer(0, "results.denied"), lambda: None)
    assert not sink.commit(up_to(1), source)
    with pytest.raises(DeliveryFailed) as raised:
        sink.commit(up_to(1), source)
    assert str(raised.value) == (
        "even the undeliverable answer for ('jobs.classify', 0, 0) to jobs.classify.dlq failed: "
        "not authorized (topic): Broker: Topic authorization failed"
    )
    assert broker.log == [] and broker.committed == {}  # nothing committed: served again


class RefusingProducer:
    """A producer the broker refuses every record of, as it does a principal without Write."""

    def __init__(self, _kafka: object, _config: dict[str, Any]) -> None:
        self._delivered: list[Any] = []

    def produce(self, _topic: str, key: bytes, value: bytes, on_delivery: Any) -> None:
        self._delivered.append(on_delivery)

    def flush(self, _timeout: float) -> int:
        for delivered in self._delivered:
            delivered(DENIED, None)
        return 0


def test_adapters_publish_refused_by_the_broker_is_one_line() -> None:
    settings = Settings(bootstrap_servers="broker:9093")
    state = AdapterUpdate(
        name="classifier",
        base_model="tiny-llama",
        versions=[AdapterVersionSpec(version="v2", path="/a/classifier", sha256="0" * 64)],
        published_at_ms=1,
    )
    with pytest.raises(KafkaUnavailable) as raised:
        admin._publish(settings, state, producer_factory=RefusingProducer)
    assert str(raised.value) == (
        "cannot publish to adapters.updates at broker:9093: "
        "not authorized (topic): Broker: Topic authorization failed"
    )


class DeniedTransactionalIdProducer(FakeProducer):
    def init_transactions(self, _timeout: float) -> None:
        raise KafkaException(
            KafkaError(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, "denied", fatal=True)
        )


def test_a_denied_transactional_id_stops_the_worker_at_start() -> None:
    broker = FakeBroker()
    sink = ExactlyOnceSink(
        "fake:9092",
        "tx",
        60_000,
        SizeSettings(),
        producer_factory=lambda config: DeniedTransactionalIdProducer(broker, config),
    )
    with pytest.raises(KafkaException) as raised:
        sink.start()  # not retried at every commit for ever
    assert describe(raised.value.args[0]) == "not authorized (transactional id): denied"


class DeniedGroupProducer(FakeProducer):
    def send_offsets_to_transaction(self, *_args: Any) -> None:
        raise KafkaException(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED, "denied"))


def test_a_denied_group_stops_the_worker_instead_of_retrying_the_commit() -> None:
    broker = FakeBroker()
    sink = ExactlyOnceSink(
        "fake:9092",
        "tx",
        60_000,
        SizeSettings(),
        producer_factory=lambda config: DeniedGroupProducer(broker, config),
    )
    sink.write((TOPIC, 0, 0), answer(0, "results.classify"), lambda: None)
    with pytest.raises(KafkaException):
        sink.commit(up_to(1), FakeSource(broker))
    assert broker.log == []


class ErrorMessage:
    def __init__(self, error: KafkaError) -> None:
        self._error = error

    def error(self) -> KafkaError:
        return self._error


class DeniedConsumer:
    """A consumer whose group the broker refuses: every consume() returns that error."""

    def __init__(self, _kafka: object, _config: dict[str, Any]) -> None:
        pass

    def subscribe(self, _topics: list[str], **_callbacks: Any) -> None:
        pass

    def consume(self, num_messages: int, timeout: float) -> list[ErrorMessage]:
        return [ErrorMessage(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED, "denied"))]


def test_a_denied_group_is_one_error_from_the_source_not_a_warning_per_poll() -> None:
    jobs = KafkaJobSource(
        "fake:9092",
        "lora-workers",
        [TOPIC],
        None,
        RebalanceHandlers(revoked=lambda _p: None, lost=lambda _p: None),
        consumer_factory=DeniedConsumer,
    )
    with pytest.raises(KafkaException) as raised:
        jobs.consume(10, 0.1)
    assert describe(raised.value.args[0]) == "not authorized (group): denied"


class LateReportsProducer(DeniedTopicsProducer):
    """librdkafka's other way: the denied topic fails the transaction (its partitions cannot be
    added to it), and the records' delivery reports come only from a poll after the abort."""

    def __init__(self, broker: FakeBroker, config: dict[str, Any], denied: set[str]) -> None:
        super().__init__(broker, config, denied)
        self.late: list[Any] = []
        self.named = True  # whether those late reports name the denial

    def produce(
        self,
        topic: str,
        key: bytes | None = None,
        value: bytes | None = None,
        headers: Any = None,
        on_delivery: Any = None,
    ) -> None:
        if topic not in self.denied:
            super().produce(topic, key, value, headers, on_delivery)
            return
        reported = DENIED if self.named else KafkaError(KafkaError._PURGE_QUEUE, "purged")
        self.late.append(lambda: on_delivery(reported, None))

    def commit_transaction(self, timeout: float) -> None:
        if self.late:
            raise KafkaException(
                KafkaError(
                    KafkaError.TOPIC_AUTHORIZATION_FAILED,
                    "Failed to add partition(s) to transaction: Topic authorization failed",
                    txn_requires_abort=True,
                )
            )
        super().commit_transaction(timeout)

    def poll(self, _timeout: float) -> int:
        late, self.late = self.late, []
        for report in late:
            report()
        return len(late)


def late_reporting(broker: FakeBroker, named: bool) -> ExactlyOnceSink:
    def new_producer(config: dict[str, Any]) -> LateReportsProducer:
        producer = LateReportsProducer(broker, config, {"results.denied"})
        producer.named = named
        return producer

    return ExactlyOnceSink("fake:9092", "tx", 60_000, SizeSettings(), producer_factory=new_producer)


def test_a_denial_reported_after_the_abort_still_dead_letters_the_answer() -> None:
    broker = FakeBroker()
    sink = late_reporting(broker, named=True)
    source = FakeSource(broker)
    sink.write((TOPIC, 0, 0), answer(0, "results.denied"), lambda: None)
    sink.write((TOPIC, 0, 1), answer(1, "results.classify"), lambda: None)
    assert not sink.commit(up_to(2), source)
    assert sink.commit(up_to(2), source)
    assert broker.log == [("jobs.classify.dlq", None), ("results.classify", b"answer 1")]


def test_a_denial_no_report_names_stops_the_worker_instead_of_retrying_for_ever() -> None:
    broker = FakeBroker()
    sink = late_reporting(broker, named=False)
    sink.write((TOPIC, 0, 0), answer(0, "results.denied"), lambda: None)
    with pytest.raises(DeliveryFailed, match=r"^a transaction was refused \(not authorized"):
        sink.commit(up_to(1), FakeSource(broker))
    assert broker.log == [] and broker.committed == {}


class MetadataConsumer:
    """A consumer of a principal that may not describe `refused`: a listing of every topic
    leaves it out; asked by name, the broker refuses it. Other unlisted topics are absent."""

    def __init__(self, refused: str) -> None:
        self.refused = refused
        self.assigned: list[Any] | None = None

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> SimpleNamespace:
        if topic is None:
            return SimpleNamespace(topics={})
        error = KafkaError.TOPIC_AUTHORIZATION_FAILED if topic == self.refused else None
        absent = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
        described = SimpleNamespace(
            error=KafkaError(error, "Broker: Topic authorization failed") if error else absent,
            partitions={},
        )
        return SimpleNamespace(topics={topic: described})

    def assign(self, partitions: list[Any]) -> None:
        self.assigned = partitions

    def close(self) -> None:
        pass


def test_reading_a_topic_the_principal_may_not_describe_is_one_line_not_an_empty_read() -> None:
    def refusing(_kafka: object, **_config: Any) -> MetadataConsumer:
        return MetadataConsumer("adapters.updates")

    absent = topics.read_to_end("b:1", ["jobs.absent"], reader_factory=refusing)
    assert list(absent) == []  # absent: nothing to read
    with pytest.raises(KafkaException) as raised:
        list(
            topics.read_to_end("b:1", ["jobs.absent", "adapters.updates"], reader_factory=refusing)
        )
    assert describe(raised.value.args[0]) == (
        "not authorized (topic): adapters.updates: Broker: Topic authorization failed"
    )


def test_a_worker_denied_the_updates_topic_stops_rather_than_serving_without_it() -> None:
    with pytest.raises(KafkaException, match=r"adapters\.updates"):
        feed.AdapterUpdateFeed(
            "b:1",
            "adapters.updates",
            consumer_factory=lambda _kafka, _config: MetadataConsumer("adapters.updates"),
        )
