"""The exactly-once sink's state machine on fakes of the producer, the transaction coordinator
and the source (tests/unit/kafka_fakes.py): every answer reaches the result log exactly once
through unknown commit outcomes, fenced producers, revokes while in doubt and refused records."""

from __future__ import annotations

import pytest

from tests.unit.kafka_fakes import FakeBroker, FakeSource
from workers.core.config import SizeSettings
from workers.core.offsets import CommitPoint, Ledger
from workers.kafka.sinks import OutputRecord
from workers.kafka.transactions import ExactlyOnceSink

TOPIC = "jobs.classify"


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("workers.kafka.transactions.time.sleep", lambda _s: None)


def make_sink(broker: FakeBroker) -> ExactlyOnceSink:
    return ExactlyOnceSink(
        "fake:9092",
        "lora-workers-test",
        transaction_timeout_ms=60_000,
        sizes=SizeSettings(),
        extra_config={},
        producer_factory=broker.new_producer,
    )


def answer(offset: int, partition: int = 0) -> OutputRecord:
    return OutputRecord(
        topic="results.classify",
        key=f"job-{partition}-{offset}".encode(),
        value=f"answer {partition}/{offset}".encode(),
        headers=[],
        dead_letter_topic="jobs.classify.dlq",
    )


def write(sink: ExactlyOnceSink, offsets: range, partition: int = 0) -> None:
    for offset in offsets:
        sink.write((TOPIC, partition, offset), answer(offset, partition), lambda: None)


def up_to(position: int, partition: int = 0) -> dict[tuple[str, int], CommitPoint]:
    return {(TOPIC, partition): CommitPoint(position, Ledger(position))}


def test_start_fences_a_predecessor_and_aborts_its_open_transaction() -> None:
    broker = FakeBroker()
    predecessor = make_sink(broker)
    predecessor.start()
    write(predecessor, range(3))
    broker.commit_script = ["unknown"]  # killed mid-commit: the transaction stays open
    broker.reachable = True
    predecessor_producer = broker.producers[0]
    predecessor_producer.begin_transaction()
    assert broker.open is not None

    make_sink(broker).start()  # the replacement, before it has anything to commit

    assert broker.open is None  # the partitions' committed offsets are stable again
    assert len(broker.producers) == 2 and broker.producers[1].epoch == broker.epoch


def test_start_with_the_broker_away_is_not_fatal() -> None:
    broker = FakeBroker(reachable=False)
    sink = make_sink(broker)
    sink.start()
    broker.reachable = True
    write(sink, range(2))
    assert sink.commit(up_to(2), FakeSource(broker))
    assert broker.values() == [b"answer 0/0", b"answer 0/1"]


def test_a_commit_that_landed_with_its_answer_lost_is_not_sent_again() -> None:
    broker = FakeBroker(commit_script=["lost_response"])
    sink = make_sink(broker)
    source = FakeSource(broker)
    write(sink, range(3))
    assert sink.commit(up_to(3), source)  # settled at once: it did commit
    write(sink, range(3, 5))
    assert sink.commit(up_to(5), source)
    assert broker.values() == [f"answer 0/{o}".encode() for o in range(5)]
    assert broker.committed[(TOPIC, 0)] == (5, "")
    assert sink.held() == 0


def test_a_commit_that_never_arrived_is_sent_again_exactly_once() -> None:
    broker = FakeBroker(commit_script=["unknown"])
    sink = make_sink(broker)
    source = FakeSource(broker)
    write(sink, range(3))
    assert not sink.commit(up_to(3), source)
    assert broker.values() == []
    assert sink.held() == 3
    assert sink.commit(up_to(3), source)
    assert broker.values() == [f"answer 0/{o}".encode() for o in range(3)]


def test_nothing_is_sent_while_the_outcome_is_unknown() -> None:
    broker = FakeBroker(commit_script=["lost_response"])
    sink = make_sink(broker)
    source = FakeSource(broker)
    write(sink, range(3))
    broker.reachable = False  # the coordinator goes away just after the commit
    assert not sink.commit(up_to(3), source)
    write(sink, range(3, 6))
    assert not sink.commit(up_to(6), source)  # still unknown: nothing sent
    produced_while_unknown = sum(len(p.produced) for p in broker.producers[1:])
    assert produced_while_unknown == 0
    broker.reachable = True
    assert sink.commit(up_to(6), source)
    assert broker.values() == [f"answer 0/{o}".encode() for o in range(6)]


@pytest.mark.parametrize(("step", "written"), [("lost_response", 4), ("unknown", 2)])
def test_a_partition_revoked_while_in_doubt_is_left_to_its_next_owner(
    step: str, written: int
) -> None:
    broker = FakeBroker(commit_script=[f"{step}+away"])
    sink = make_sink(broker)
    source = FakeSource(broker)
    write(sink, range(2), partition=0)
    write(sink, range(2), partition=1)
    assert not sink.commit({**up_to(2, partition=0), **up_to(2, partition=1)}, source)
    sink.discard({(TOPIC, 1)})
    broker.reachable = True
    assert sink.commit(up_to(2, partition=0), source)
    assert sink.held() == 0
    assert broker.values().count(b"answer 0/0") == 1 and broker.values().count(b"answer 0/1") == 1
    assert len(broker.values()) == written  # partition 1's answers: only if they had landed


def test_a_fenced_producer_is_replaced_and_its_answers_sent_once() -> None:
    broker = FakeBroker()
    sink = make_sink(broker)
    source = FakeSource(broker)
    write(sink, range(2))
    assert sink.commit(up_to(2), source)
    broker.epoch += 1  # another producer with this transactional.id took over
    write(sink, range(2, 4))
    assert not sink.commit(up_to(4), source)
    assert sink.commit(up_to(4), source)
    assert broker.values() == [f"answer 0/{o}".encode() for o in range(4)]


def test_an_abortable_commit_error_aborts_and_retries() -> None:
    broker = FakeBroker(commit_script=["abortable"])
    sink = make_sink(broker)
    source = FakeSource(broker)
    write(sink, range(2))
    assert not sink.commit(up_to(2), source)
    assert broker.values() == []
    assert sink.commit(up_to(2), source)
    assert broker.values() == [b"answer 0/0", b"answer 0/1"]


def test_a_refused_record_is_replaced_by_its_dead_letter_and_the_rest_commit() -> None:
    broker = FakeBroker(too_large={b"answer 0/1"})
    sink = make_sink(broker)
    source = FakeSource(broker)
    write(sink, range(3))
    assert not sink.commit(up_to(3), source)
    assert sink.commit(up_to(3), source)
    values = broker.values()
    assert values[0] == b"answer 0/0" and values[-1] == b"answer 0/2"
    assert len(values) == 3 and b"answer 0/1" not in values
    assert broker.log[1][0] == "jobs.classify.dlq"


@pytest.mark.parametrize("step", ["lost_response:retriable+away", "unknown:retriable+away"])
def test_retriable_commit_errors_past_the_deadline_leave_the_outcome_in_doubt(
    step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coordinator unreachable past the transaction timeout in the middle of a commit."""
    broker = FakeBroker(commit_script=[step])
    sink = make_sink(broker)
    source = FakeSource(broker)
    clock = iter(range(0, 100_000, 20))
    monkeypatch.setattr("workers.kafka.transactions.time.monotonic", lambda: next(clock))
    write(sink, range(3))
    assert not sink.commit(up_to(3), source)
    broker.reachable = True
    while not sink.commit(up_to(3), source):
        pass
    assert broker.values() == [f"answer 0/{o}".encode() for o in range(3)]
    assert sink.held() == 0
