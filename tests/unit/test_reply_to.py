"""`reply_to`: a job may name a topic that also gets its answer. The contract bounds the name
(a bad one is `invalid_job`), and the copy rides in the same transaction as the result, through
an unknown commit outcome, exactly once (on the fakes of tests/unit/kafka_fakes.py)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from tests.unit.kafka_fakes import FakeBroker, FakeSource
from tests.unit.results import make_result
from workers.core.config import SizeSettings
from workers.core.contracts import Job
from workers.core.errors import JobError, JobRejected
from workers.core.messages import SourceMessage
from workers.kafka.sinks import dead_letter_record, reply_topic_of, result_record
from workers.kafka.transactions import ExactlyOnceSink

SIZES = SizeSettings()
TOPIC = "jobs.classify"


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("workers.kafka.transactions.time.sleep", lambda _s: None)


@pytest.mark.parametrize("topic", ["replies.svc-a", "r", "a_b-C.9", "x" * 249])
def test_a_kafka_topic_name_is_a_valid_reply_to(topic: str) -> None:
    assert Job(job_id="j", task="classify", input="x", reply_to=topic).reply_to == topic


@pytest.mark.parametrize("topic", ["", ".", "..", "a b", "replies/x", "x" * 250, "é", ".hidden"])
def test_a_bad_reply_to_is_refused(topic: str) -> None:
    with pytest.raises(ValidationError, match="reply_to"):
        Job(job_id="j", task="classify", input="x", reply_to=topic)


def source(document: object) -> SourceMessage:
    return SourceMessage(TOPIC, 0, 7, b"j-1", json.dumps(document).encode(), [], 0)


def test_a_dead_letter_goes_to_the_reply_topic_only_when_the_job_names_a_valid_one() -> None:
    rejection = JobRejected(JobError.UNKNOWN_ADAPTER, "no such adapter")
    named = source({"job_id": "j-1", "task": "classify", "input": "x", "reply_to": "replies.a"})
    assert reply_topic_of(named, rejection) == "replies.a"
    record = dead_letter_record("jobs.classify.dlq", named, rejection, SIZES, "replies.a")
    assert (record.topic, record.reply_to) == ("jobs.classify.dlq", "replies.a")
    for document in ({"reply_to": "a b"}, {"reply_to": 3}, ["reply_to"], {"job_id": "x"}):
        assert reply_topic_of(source(document), rejection) is None
    not_json = SourceMessage(TOPIC, 0, 7, None, b"{nope", [], 0)
    assert reply_topic_of(not_json, JobRejected(JobError.INVALID_JSON, "bad")) is None


def make_sink(broker: FakeBroker) -> ExactlyOnceSink:
    return ExactlyOnceSink(
        "fake:9092",
        "lora-workers-test",
        transaction_timeout_ms=60_000,
        sizes=SIZES,
        producer_factory=broker.new_producer,
    )


def test_the_reply_copy_commits_with_the_result_exactly_once_through_an_unknown_outcome() -> None:
    from workers.core.offsets import CommitPoint, Ledger

    broker = FakeBroker()
    sink = make_sink(broker)
    sink.start()
    done: list[int] = []
    for offset in range(3):
        result = make_result(job_id=f"j-{offset}")
        reply = "replies.a" if offset != 1 else None
        record = result_record("results.classify", "jobs.classify.dlq", result, SIZES, None, reply)
        sink.write((TOPIC, 0, offset), record, lambda o=offset: done.append(o))
    points = {(TOPIC, 0): CommitPoint(3, Ledger(3))}
    broker.commit_script = ["lost_response"]  # commits; the answer looks lost
    assert sink.commit(points, FakeSource(broker)) in (True, False)
    sink.commit(points, FakeSource(broker))
    topics = [topic for topic, _ in broker.log]
    assert topics.count("results.classify") == 3
    assert topics.count("replies.a") == 2  # j-1 named no reply topic
    replies = [value for topic, value in broker.log if topic == "replies.a"]
    assert sorted(json.loads(v or b"")["job_id"] for v in replies) == ["j-0", "j-2"]
    assert done == [0, 1, 2]


def test_one_delivery_report_for_a_record_and_its_copy() -> None:
    from workers.kafka.sinks import produce_record

    reports: list[object] = []
    callbacks: list[object] = []

    class Recorder:
        def produce(self, topic: str, **fields: object) -> None:
            callbacks.append(fields["on_delivery"])

    record = result_record("results.classify", "d", make_result(), SIZES, None, "replies.a")
    produce_record(Recorder(), record, on_delivery=lambda e, _m: reports.append(e))  # type: ignore[arg-type]
    assert len(callbacks) == 2
    callbacks[0](None, None)  # type: ignore[operator]
    assert reports == []  # the copy is not acknowledged yet
    callbacks[1](None, None)  # type: ignore[operator]
    assert reports == [None]


def test_a_reply_topic_that_does_not_exist_makes_the_answer_undeliverable_not_retried() -> None:
    from confluent_kafka import KafkaError

    from workers.kafka.sinks import cannot_be_written, produce_record

    reports: list[KafkaError | None] = []
    callbacks: list = []

    class Recorder:
        def produce(self, topic: str, **fields: object) -> None:
            callbacks.append(fields["on_delivery"])

    record = result_record("results.classify", "d", make_result(), SIZES, None, "replies.gone")
    produce_record(Recorder(), record, on_delivery=lambda e, _m: reports.append(e))  # type: ignore[arg-type]
    callbacks[0](None, None)
    callbacks[1](KafkaError(KafkaError._UNKNOWN_TOPIC, "gone"), None)
    (error,) = reports
    assert error is not None and cannot_be_written(error)
    assert "replies.gone" in error.str()
