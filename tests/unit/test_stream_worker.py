"""The Kafka worker's state machine (`workers/worker.py` and its units in `workers/stream/`)
run for real on fakes of the consumer (a partitioned log with rebalances), the transactional
producer and coordinator (tests/unit/kafka_fakes.py) and the engine loop. Every test checks the
one promise: each message gets exactly one answer on the broker, and the committed offsets
reach the end. Injected: an unknown commit outcome, a fenced producer, a revoke between
commits, an engine death killing a job, a record the broker refuses."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.unit.engine_fakes import byte_chat, byte_tokens
from tests.unit.kafka_fakes import FakeBroker, FakeSource
from workers.core.config import Settings, load_pipelines
from workers.core.contracts import Job, Result, ResultStatus, Timings, Usage
from workers.core.engine_api import AdapterHandle
from workers.core.errors import JobError, JobRejected
from workers.core.messages import SourceMessage
from workers.core.offsets import CommitPoint, Ledger, TopicPartitionKey
from workers.core.prepare import JobPreparer, PreparedJob
from workers.core.processing import Answered, Outcome, Unserved
from workers.core.routing import Router
from workers.kafka.source import RebalanceHandlers
from workers.kafka.transactions import ExactlyOnceSink
from workers.worker import RunLimits, Worker

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = load_pipelines(ROOT / "pipelines")
TOPIC = PIPELINES["classify"].input_topic
RESULTS = PIPELINES["classify"].result_topic
DLQ = PIPELINES["classify"].dlq_topic
CLASSIFIER = AdapterHandle("classifier", "1", "/a/classifier", 1)


class PartitionedLog(FakeSource):
    """The consumer: reads assigned partitions from the group's committed offsets, honours
    pause, and runs scripted events (rebalances) before given consume calls."""

    def __init__(
        self,
        broker: FakeBroker,
        log: dict[TopicPartitionKey, list[SourceMessage]],
        handlers: RebalanceHandlers,
        assigned: Iterable[TopicPartitionKey],
    ) -> None:
        super().__init__(broker)
        self.log = log
        self.handlers = handlers
        self.positions: dict[TopicPartitionKey, int] = {}
        self.paused = False
        self.calls = 0
        self.events: dict[int, Callable[[PartitionedLog], None]] = {}
        for key in assigned:
            self.assign(key)

    def assign(self, key: TopicPartitionKey) -> None:
        position, _ = self.broker.committed.get(key, (0, ""))
        self.positions[key] = position

    def revoke(self, key: TopicPartitionKey) -> None:
        self.handlers.revoked([key])
        del self.positions[key]

    def consume(self, max_messages: int, _timeout_s: float) -> list[SourceMessage]:
        self.calls += 1
        event = self.events.pop(self.calls, None)
        if event is not None:
            event(self)
        if self.paused:
            return []
        batch: list[SourceMessage] = []
        share = max(1, max_messages // max(1, len(self.positions)))  # every partition fetches
        for key, position in self.positions.items():
            taken = self.log[key][position : position + share]
            self.positions[key] = position + len(taken)
            batch += taken
        return batch

    def pause_all(self) -> None:
        self.paused = True

    def resume_all(self) -> None:
        self.paused = False

    def fetch_pending(self) -> bool:
        return False

    def lag(self) -> dict[TopicPartitionKey, int]:
        return {key: len(self.log[key]) - p for key, p in self.positions.items()}

    def joined(self) -> bool:
        return True

    def commit(self, _points: dict[TopicPartitionKey, CommitPoint]) -> bool:
        raise AssertionError("exactly-once commits go through the transaction")

    def close(self) -> None:
        pass


def _result(job: PreparedJob) -> Result:
    return Result(
        job_id=job.job.job_id,
        task=job.job.task,
        status=ResultStatus.OK,
        output={"label": "billing"},
        raw_output='{"label": "billing"}',
        adapter=None,
        usage=Usage(prompt_tokens=3, completion_tokens=5),
        timings=Timings(
            enqueued_at_ms=0, received_at_ms=0, completed_at_ms=0, queue_ms=0, generate_ms=1
        ),
    )


class InstantLoop:
    """The engine loop's interface, answering every job at once; jobs whose input says "kill"
    come back as engine_crash dead letters, as the real loop gives up on a job that kills
    the engine alone."""

    def __init__(self, per_call: int = 10**9) -> None:
        self.waiting: list[PreparedJob] = []
        self.per_call = per_call  # jobs finished per outcomes() call
        self.stats = SimpleNamespace(engine_restarts=0)

    def start(self, between_steps: Callable[[], None] | None = None) -> None:
        pass

    def submit(self, jobs: Iterable[PreparedJob]) -> None:
        self.waiting.extend(jobs)

    def outcomes(self) -> list[Outcome]:
        done, self.waiting = self.waiting[: self.per_call], self.waiting[self.per_call :]
        return [
            Unserved(j, JobRejected(JobError.ENGINE_CRASH, "the engine died on this job alone"))
            if j.job.input == "kill"
            else Answered(j, _result(j))
            for j in done
        ]

    def abort(self, predicate: Callable[[PreparedJob], bool], waiting_only: bool = False) -> None:
        self.waiting = [j for j in self.waiting if not predicate(j)]

    def running(self) -> int:
        return 0

    def in_engine(self) -> int:
        return len(self.waiting)

    def shadow_runs(self) -> int:
        return 0

    def stop(self, _timeout_s: float) -> None:
        pass


def _resolve(name: str, _job: Job) -> AdapterHandle:
    return CLASSIFIER


def _serving(loop: InstantLoop) -> Any:
    preparer = JobPreparer(
        pipelines_by_topic={p.input_topic: p for p in PIPELINES.values()},
        known_tasks=set(PIPELINES),
        router=Router(_resolve),
        tokenize=byte_tokens,
        render_chat=byte_chat,
        max_model_len=512,
        max_job_bytes=4096,
    )
    return SimpleNamespace(
        loop=loop, preparer=preparer, registry=None, cache=SimpleNamespace(stats=SimpleNamespace())
    )


def _messages(partition: int, count: int, poison: set[int] = frozenset()) -> list[SourceMessage]:
    def value(offset: int) -> bytes:
        if offset in poison:
            return b"\xff not json"
        text = "kill" if offset == 7 and partition == 1 else f"invoice {offset}"
        return json.dumps(
            {"job_id": f"p{partition}-{offset}", "task": "classify", "input": text}
        ).encode()

    return [
        SourceMessage(TOPIC, partition, offset, b"k", value(offset), [], 0)
        for offset in range(count)
    ]


JOBS = 40


@pytest.fixture()
def log() -> dict[TopicPartitionKey, list[SourceMessage]]:
    return {(TOPIC, 0): _messages(0, JOBS, poison={3}), (TOPIC, 1): _messages(1, JOBS)}


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("workers.kafka.transactions.time.sleep", lambda _s: None)


def run_worker(
    broker: FakeBroker,
    log: dict[TopicPartitionKey, list[SourceMessage]],
    *,
    assigned: Iterable[TopicPartitionKey],
    max_jobs: int,
    events: dict[int, Callable[[PartitionedLog], None]] | None = None,
    consume_batch: int = 7,
    max_in_flight: int = 1000,
    loop: InstantLoop | None = None,
    source_class: type[PartitionedLog] = PartitionedLog,
) -> PartitionedLog:
    settings = Settings(
        bootstrap_servers="fake:9092",
        commit_interval_ms=0,
        admission={"consume_batch": consume_batch, "max_in_flight": max_in_flight},
        delivery={"retry_backoff_max_s": 0.01},
    )
    sink = ExactlyOnceSink(
        "fake:9092", "tx", 60_000, settings.sizes, {}, producer_factory=broker.new_producer
    )
    sources: list[PartitionedLog] = []

    def source_factory(handlers: RebalanceHandlers) -> PartitionedLog:
        source = source_class(broker, log, handlers, assigned)
        source.events = dict(events or {})
        sources.append(source)
        return source

    worker = Worker(
        settings,
        PIPELINES,
        _serving(loop or InstantLoop()),
        updates=SimpleNamespace(close=lambda: None),  # type: ignore[arg-type]
        source_factory=source_factory,  # type: ignore[arg-type]
        sink=sink,
    )
    worker.run(RunLimits(max_jobs=max_jobs, idle_exit_s=0.5))
    return sources[0]


def answers(broker: FakeBroker) -> Counter[str]:
    """Per source position, how many answers (results or dead letters) the broker holds."""
    counted: Counter[str] = Counter()
    for topic, value in broker.log:
        if topic == RESULTS:
            counted[json.loads(value or b"")["job_id"]] += 1
        else:
            counted[f"dead letter {topic}: {value!r}"] += 1
    return counted


def assert_exactly_once(broker: FakeBroker) -> None:
    counted = answers(broker)
    results = [k for k in counted if not k.startswith("dead letter")]
    assert all(n == 1 for n in counted.values()), [k for k, n in counted.items() if n > 1]
    # Every job but the undecodable one (p0-3) and the engine-killing one (p1-7) has a result.
    expected = {f"p{p}-{o}" for p in (0, 1) for o in range(JOBS)} - {"p0-3", "p1-7"}
    assert set(results) == expected
    dead = [topic for topic, _ in broker.log if topic != RESULTS]
    assert sorted(dead) == [DLQ, DLQ]
    for partition in (0, 1):
        assert broker.committed[(TOPIC, partition)][0] == JOBS


def test_every_message_is_answered_once_and_committed_to_the_end(log: Any) -> None:
    broker = FakeBroker()
    run_worker(broker, log, assigned=log, max_jobs=2 * JOBS)
    assert_exactly_once(broker)


@pytest.mark.parametrize(
    "script", [["lost_response"], ["unknown"], ["ok", "lost_response:retriable+away"]]
)
def test_an_unknown_commit_outcome_writes_nothing_twice(
    log: Any, script: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = FakeBroker(commit_script=list(script))
    # The sink's clock runs 20 s per reading: retriable commit errors pass the deadline at once.
    clock = iter(range(0, 10**9, 20))
    monkeypatch.setattr("workers.kafka.transactions.time.monotonic", lambda: next(clock))

    def back(_source: PartitionedLog) -> None:
        broker.reachable = True  # the coordinator answers again after the failed commit

    events = dict.fromkeys(range(1, 500), back)
    run_worker(broker, log, assigned=log, max_jobs=2 * JOBS, events=events)
    assert_exactly_once(broker)


def test_a_fenced_producer_mid_run_writes_nothing_twice(log: Any) -> None:
    broker = FakeBroker()

    def fence(_source: PartitionedLog) -> None:
        broker.epoch += 1  # a zombie with the same transactional.id initialised

    run_worker(broker, log, assigned=log, max_jobs=2 * JOBS, events={3: fence})
    assert_exactly_once(broker)


def test_a_refused_answer_becomes_its_dead_letter_and_the_rest_commit(log: Any) -> None:
    broker = FakeBroker()
    refused = _result_value("p0-5")
    broker.too_large = {refused}
    run_worker(broker, log, assigned=log, max_jobs=2 * JOBS)
    counted = answers(broker)
    assert "p0-5" not in counted and all(n == 1 for n in counted.values())
    assert len(counted) == 2 * JOBS  # 77 results, 3 dead letters (poison, kill, refused)
    assert broker.committed[(TOPIC, 0)][0] == JOBS


def _result_value(job_id: str) -> bytes:
    """The exact bytes the worker writes for a job's result (the fake refuses by value)."""
    from workers.kafka.sinks import result_record

    (message,) = [m for m in _messages(0, JOBS) if json.loads(m.value or b"")["job_id"] == job_id]
    job = _serving(InstantLoop()).preparer.prepare(message)
    record = result_record(RESULTS, DLQ, _result(job), Settings().sizes, None)
    assert record.value is not None
    return record.value


def test_a_revoked_partition_is_finished_by_its_next_owner_exactly_once(log: Any) -> None:
    broker = FakeBroker()

    def revoke_partition_1(source: PartitionedLog) -> None:
        source.revoke((TOPIC, 1))

    first = run_worker(
        broker, log, assigned=log, max_jobs=JOBS + 10, events={3: revoke_partition_1}
    )
    assert (TOPIC, 1) not in first.positions
    handed_over, _ = broker.committed[(TOPIC, 1)]
    assert 0 < handed_over < JOBS  # the first worker answered part of it, then let go
    run_worker(broker, log, assigned=[(TOPIC, 1)], max_jobs=JOBS - handed_over)
    assert_exactly_once(broker)


def test_a_new_owner_skips_what_the_ledger_says_was_answered(log: Any) -> None:
    """The previous owner committed position 10 with 12-19 answered beyond it (their answers
    are on the topic); the new owner answers 10, 11 and 20 on, and nothing twice."""
    broker = FakeBroker()
    for offset in (*range(10), *range(12, 20)):
        broker.log.append((RESULTS, json.dumps({"job_id": f"p1-{offset}"}).encode()))
    ledger = Ledger(10, 19, frozenset({10, 11}))
    broker.committed[(TOPIC, 1)] = (10, ledger.metadata)
    run_worker(broker, log, assigned=[(TOPIC, 1)], max_jobs=JOBS - 10)
    counted = answers(broker)
    assert all(n == 1 for n in counted.values()), counted
    assert {f"p1-{o}" for o in range(JOBS)} - {"p1-7"} <= set(counted)
    assert broker.committed[(TOPIC, 1)][0] == JOBS


class CountingPauses(PartitionedLog):
    pauses = 0

    def pause_all(self) -> None:
        self.pauses += 1
        super().pause_all()


def test_backpressure_pauses_fetching_while_too_much_is_unanswered(log: Any) -> None:
    broker = FakeBroker()
    source = run_worker(
        broker,
        log,
        assigned=log,
        max_jobs=2 * JOBS,
        consume_batch=8,
        max_in_flight=10,
        loop=InstantLoop(per_call=3),
        source_class=CountingPauses,
    )
    assert_exactly_once(broker)
    assert isinstance(source, CountingPauses)
    assert source.pauses >= 3  # paused while over the limit, resumed, and once at shutdown
