"""Exactly-once under faults, on real parts: real Kafka, real vLLM, real worker processes.

Every test ends the same way: each job has exactly one result committed on the result topics
(read with read_committed), none is missing, and nothing is dead-lettered that should not be.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import psutil
import pytest
from confluent_kafka import Consumer

from tests.broker import ROOT, _local_broker
from tests.integration.harness import (
    Deployment,
    Trickle,
    deploy,
    job_records,
    mixed_jobs,
    produce,
    wait_for_event,
)
from tests.integration.processes import kill_9_leaving_no_orphans
from workers.engine.vllm_engine import engine_core_pids
from workers.kafka.sinks import DLQ_ERROR_CODE
from workers.kafka.topics import read_to_end

pytestmark = pytest.mark.integration

# A shallow engine spreads a run over many steps and commits, so faults land between and inside
# them. A killed worker's group session ends after 6 s instead of 45.
FAST = {
    "LORA_WORKERS_ADMISSION__ENGINE_DEPTH": "16",
    "LORA_WORKERS_KAFKA": json.dumps({"session.timeout.ms": "6000"}),
}
IDLE_EXIT_S = "20"
IDLE_EXIT = ("--idle-exit", IDLE_EXIT_S)


DeployFn = Callable[[str], Deployment]


@pytest.fixture
def make_deployment(tmp_path: Path) -> Iterator[DeployFn]:
    """`deploy` on a given broker; the deployments' worker processes are killed after the test,
    whatever its outcome."""
    deployments: list[Deployment] = []

    def make(bootstrap: str) -> Deployment:
        deployments.append(deploy(bootstrap, tmp_path))
        return deployments[-1]

    yield make
    for deployment in deployments:
        deployment.kill_workers()


def publish_jobs(deployment: Deployment, count: int, seed: int, prefix: str) -> list[dict]:
    jobs = mixed_jobs(count, seed=seed, prefix=prefix)
    produce(deployment.bootstrap, job_records(deployment, jobs))
    return jobs


def assert_exactly_once(deployment: Deployment, jobs: list[dict]) -> None:
    committed = deployment.results()
    expected = {job["job_id"] for job in jobs}
    missing = expected - set(committed)
    duplicated = {job_id: n for job_id, n in committed.items() if n > 1}
    unexpected = set(committed) - expected
    assert not missing, f"{len(missing)} jobs lost: {sorted(missing)[:10]}"
    assert not duplicated, f"{len(duplicated)} jobs answered twice: {list(duplicated)[:10]}"
    assert not unexpected, unexpected
    # What the transactions aborted: visible to a read_uncommitted reader, never counted above.
    topics = [p.result_topic for p in deployment.pipelines.values()]
    everything = read_to_end(deployment.bootstrap, topics, isolation="read_uncommitted")
    uncommitted = sum(1 for _ in everything)
    print(f"\n{len(jobs)} jobs, {len(committed)} committed results, {uncommitted} written in all")


def log_events(log: str) -> list[dict]:
    """The worker's own JSON log lines (vLLM's processes write plain text into the same file)."""
    events = []
    for line in log.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "event" in event:
            events.append(event)
    return events


def finish(
    deployment: Deployment,
    tmp_path: Path,
    name: str,
    idle_exit_s: str = IDLE_EXIT_S,
    **settings: str,
) -> str:
    """A last worker that serves what is left and exits once idle."""
    log_path = tmp_path / f"{name}.log"
    code = deployment.run_worker(
        "--idle-exit", idle_exit_s, log_path=log_path, settings={**FAST, **settings}
    )
    log = log_path.read_text(errors="replace")
    assert code == 0, log[-3000:]
    return log


def serve_to_the_end(
    deployment: Deployment, jobs: list[dict], workers: list[tuple[subprocess.Popen, Path]]
) -> None:
    """Until every job has a committed result (the workers staying alive), then SIGTERM them:
    each must exit 0."""
    deadline = time.monotonic() + 600
    while len(deployment.results()) < len(jobs) and time.monotonic() < deadline:
        for worker, log_path in workers:
            assert worker.poll() is None, log_path.read_text()[-3000:]
        time.sleep(2)
    for worker, _ in workers:
        worker.send_signal(signal.SIGTERM)
    for worker, log_path in workers:
        assert worker.wait(timeout=120) == 0, log_path.read_text()[-3000:]


def test_kill_9_at_several_points_of_a_run(
    kafka_bootstrap: str, tmp_path: Path, make_deployment: DeployFn
) -> None:
    deployment = make_deployment(kafka_bootstrap)
    # Enough work that some is always left at the last kill: a commit that stalls for a few
    # seconds under load lets the engine finish hundreds of jobs, then carries them at once.
    jobs = publish_jobs(deployment, 1440, seed=41, prefix="k9")
    # The same instance each time, as a restarted pod: its first act fences the killed
    # predecessor's open transaction, and static membership gives its partitions straight back.
    same_replica = {**FAST, "LORA_WORKERS_INSTANCE_ID": "replica-0"}
    # A standby engine too, started or still starting at each kill: its processes must go too.
    killed = {**same_replica, "LORA_WORKERS_ENGINE__STANDBY": "on"}
    # As the first requests enter the engine; just after a commit; after several commits.
    for point, (event, count) in enumerate(
        [("engine_running", 1), ("transaction_committed", 2), ("transaction_committed", 4)]
    ):
        log_path = tmp_path / f"killed-{point}.log"
        worker = deployment.start_worker(log_path=log_path, **killed)
        wait_for_event(worker, log_path, event, count)
        kill_9_leaving_no_orphans(worker)
    last = finish(deployment, tmp_path, "last", LORA_WORKERS_INSTANCE_ID="replica-0")
    assert_exactly_once(deployment, jobs)
    # Answers committed beyond a partition's first unanswered job are skipped, not redone.
    logs = [(tmp_path / f"killed-{point}.log").read_text() for point in range(3)] + [last]
    resumed = [
        e for log in logs for e in log_events(log) if e["event"] == "partition_resumed_with_ledger"
    ]
    # Not forced: whether a kill leaves such a commit behind depends on timing.
    print(f"resumed with a ledger: {[(e['partition'], e['answered_beyond']) for e in resumed]}")


# A worker killed inside its commit, reduced to what matters: a transaction holding the group's
# offsets, never ended.
ABANDON_OPEN_TRANSACTION = """
import os, sys
from confluent_kafka import Consumer, Producer, TopicPartition
bootstrap, group, timeout_ms, transactional_id, *topics = sys.argv[1:]
consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
consumer.subscribe(topics)
while not consumer.assignment():
    consumer.poll(0.2)
producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": transactional_id,
                     "transaction.timeout.ms": int(timeout_ms)})
producer.init_transactions()
producer.begin_transaction()
positions = [TopicPartition(t, p, 0) for t in topics for p in range(3)]
producer.send_offsets_to_transaction(positions, consumer.consumer_group_metadata())
consumer.close()
os._exit(0)
"""


def abandon_open_transaction(
    deployment: Deployment, timeout_ms: int, transactional_id: str
) -> None:
    """A process that opens a transaction holding the group's offsets of every input
    partition, then dies without ending it."""
    inputs = [p.input_topic for p in deployment.pipelines.values()]
    subprocess.run(
        [
            *(sys.executable, "-c", ABANDON_OPEN_TRANSACTION, deployment.bootstrap),
            *(deployment.group_id, str(timeout_ms), transactional_id, *inputs),
        ],
        check=True,
        timeout=120,
    )


def test_a_dead_workers_open_transaction_delays_but_does_not_end_its_successor(
    kafka_bootstrap: str, tmp_path: Path, make_deployment: DeployFn
) -> None:
    deployment = make_deployment(kafka_bootstrap)
    jobs = publish_jobs(deployment, 60, seed=47, prefix="ot")
    # The broker's timeout outlasts the engine start-up below, even on a loaded machine.
    abandon_open_transaction(deployment, timeout_ms=90000, transactional_id=uuid.uuid4().hex)
    # No instance_id, so nothing fences that transaction: the group's offsets stay unstable,
    # and fetching waits, until the broker aborts it. That wait is not idleness.
    log = finish(deployment, tmp_path, "worker", idle_exit_s="5")
    assert_exactly_once(deployment, jobs)
    events = {e["event"]: datetime.fromisoformat(e["timestamp"]) for e in log_events(log)[::-1]}
    held_back = (events["engine_running"] - events["partitions_assigned"]).total_seconds()
    print(f"first job in the engine {held_back:.1f} s after the assignment")
    assert held_back > 5, "the transaction did not hold the partitions; the test proves nothing"
    assert "partitions_waiting_for_offsets" in events  # the operator is told why


def test_a_replacement_fences_its_predecessors_open_transaction_at_start(
    kafka_bootstrap: str, tmp_path: Path, make_deployment: DeployFn
) -> None:
    """The same instance id, hence the same transactional.id: the replacement's
    init_transactions at start aborts what its killed predecessor left open, so its partitions
    fetch at once, although it has nothing of its own to commit yet."""
    deployment = make_deployment(kafka_bootstrap)
    jobs = publish_jobs(deployment, 60, seed=59, prefix="rp")
    instance = "replica-0"
    # Left alone, the broker would hold the partitions for 5 minutes.
    abandon_open_transaction(
        deployment, timeout_ms=300000, transactional_id=f"{deployment.group_id}.{instance}"
    )
    log = finish(deployment, tmp_path, "replacement", LORA_WORKERS_INSTANCE_ID=instance)
    assert_exactly_once(deployment, jobs)
    events = {e["event"]: datetime.fromisoformat(e["timestamp"]) for e in log_events(log)[::-1]}
    started = events["worker_started"]
    first_job = (events["engine_running"] - started).total_seconds()
    print(f"first job in the engine {first_job:.1f} s after the worker loop started")
    assert first_job < 15, "the predecessor's transaction held the partitions"
    assert "partitions_waiting_for_offsets" not in events


def test_one_worker_joins_and_another_leaves_mid_run(
    kafka_bootstrap: str, tmp_path: Path, make_deployment: DeployFn
) -> None:
    deployment = make_deployment(kafka_bootstrap)
    jobs = mixed_jobs(600, seed=42, prefix="rb")
    records = job_records(deployment, jobs)
    trickle = Trickle(kafka_bootstrap, records, per_second=6, hold_after=300)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = deployment.start_worker(log_path=first_log, **FAST)
    wait_for_event(first, first_log, "transaction_committed", 3)
    second = deployment.start_worker(log_path=second_log, **FAST)
    wait_for_event(second, second_log, "partitions_assigned", containing='"partitions": [["')
    trickle.release()  # the second half of the jobs arrives with two workers in the group
    wait_for_event(second, second_log, "transaction_committed", 2)
    assert "partitions_revoked" in first_log.read_text(), "the join moved no partition"
    assert trickle.running, "jobs stopped arriving before the join; the test proves nothing"
    first.send_signal(signal.SIGTERM)  # leaves; its partitions move to the second worker
    assert first.wait(timeout=120) == 0, first_log.read_text()[-3000:]
    trickle.join()
    serve_to_the_end(deployment, jobs, [(second, second_log)])
    assert_exactly_once(deployment, jobs)


def test_a_revoked_partitions_requests_are_aborted_in_the_engine(
    kafka_bootstrap: str, tmp_path: Path, make_deployment: DeployFn
) -> None:
    deployment = make_deployment(kafka_bootstrap)
    # Eager assignment: any rebalance revokes every partition of the worker, so whatever its
    # engine holds then belongs to a revoked partition (cooperative-sticky would move only some,
    # perhaps none with a request in the engine).
    # No worker dies here, so the session may be long: a revoke whose commit is retried (a
    # concurrent-transactions error under load) must not outlast it and turn into a loss.
    roundrobin = {"session.timeout.ms": "30000", "partition.assignment.strategy": "roundrobin"}
    settings = {
        **FAST,
        "LORA_WORKERS_ADMISSION__ENGINE_DEPTH": "8",
        "LORA_WORKERS_KAFKA": json.dumps(roundrobin),
    }
    log_path = tmp_path / "worker.log"
    worker = deployment.start_worker(log_path=log_path, **settings)
    wait_for_event(worker, log_path, "partitions_assigned")
    # A backlog keeps the engine full (jobs waiting behind it), so it holds requests when the
    # partitions go.
    jobs = publish_jobs(deployment, 1800, seed=48, prefix="ab")
    wait_for_event(worker, log_path, "transaction_committed", count=3)
    # The rebalance is a plain consumer joining the group: it starts at once, where a second
    # worker's graceful exit may take long enough for the backlog to run dry. It commits
    # nothing, so its partitions come back to the worker from the worker's own commits.
    topics = sorted({p.input_topic for p in deployment.pipelines.values()})
    probe = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": deployment.group_id,
            "enable.auto.commit": False,
            **roundrobin,
        }
    )
    probe.subscribe(topics)
    try:
        deadline = time.monotonic() + 120
        while not probe.assignment():
            assert time.monotonic() < deadline, "the probe was never assigned a partition"
            probe.poll(0.5)  # the join happens inside poll; its messages are never processed
        wait_for_event(worker, log_path, "jobs_aborted", timeout_s=120)
    finally:
        probe.close()
    serve_to_the_end(deployment, jobs, [(worker, log_path)])
    aborted = [e for e in log_events(log_path.read_text()) if e["event"] == "jobs_aborted"]
    print(f"\naborted on revoke: {aborted}")
    assert any(e["in_engine"] > 0 for e in aborted), aborted
    assert_exactly_once(deployment, jobs)


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A broker of this test's own, since the test stops it; (bootstrap, state dir)."""
    state = tmp_path / "broker"
    with _local_broker(state) as bootstrap:
        yield bootstrap, state


def test_broker_stops_and_restarts_under_a_running_worker(
    own_broker: tuple[str, Path], tmp_path: Path, make_deployment: DeployFn
) -> None:
    bootstrap, state = own_broker
    kafka_local = {**os.environ, "KAFKA_LOCAL_STATE": str(state)}
    deployment = make_deployment(bootstrap)
    jobs = mixed_jobs(360, seed=43, prefix="br")
    trickle = Trickle(bootstrap, job_records(deployment, jobs), per_second=6)
    log_path = tmp_path / "worker.log"
    worker = deployment.start_worker(*IDLE_EXIT, log_path=log_path, **FAST)
    wait_for_event(worker, log_path, "transaction_committed", 3)
    halt = [str(ROOT / "ops" / "kafka-local"), "halt"]
    subprocess.run(halt, env=kafka_local, check=True, timeout=60)  # kill -9 of the broker
    time.sleep(15)
    start = [str(ROOT / "ops" / "kafka-local"), "start"]
    subprocess.run(start, env=kafka_local, check=True, timeout=300, capture_output=True)
    trickle.join()
    assert worker.wait(timeout=900) == 0, log_path.read_text()[-3000:]
    log = log_path.read_text()
    assert log.count('"event": "worker_started"') == 1  # recovered without a restart
    assert_exactly_once(deployment, jobs)


def test_broker_frozen_past_the_transaction_timeout_writes_nothing_twice(
    own_broker: tuple[str, Path], tmp_path: Path, make_deployment: DeployFn
) -> None:
    """The broker stopped with SIGSTOP mid-stream (commits run every 100 ms, so inside one),
    for longer than the transaction timeout plus the sink's margin, then resumed: whatever the
    outcome of the commit it froze, nothing is lost or answered twice, and the worker lives."""
    bootstrap, state = own_broker
    deployment = make_deployment(bootstrap)
    jobs = mixed_jobs(240, seed=53, prefix="fz")
    trickle = Trickle(bootstrap, job_records(deployment, jobs), per_second=6)
    log_path = tmp_path / "worker.log"
    timeout_ms = 10_000
    settings = {**FAST, "LORA_WORKERS_DELIVERY__TRANSACTION_TIMEOUT_MS": str(timeout_ms)}
    worker = deployment.start_worker(*IDLE_EXIT, log_path=log_path, **settings)
    wait_for_event(worker, log_path, "transaction_committed", 3)
    broker = psutil.Process(int((state / "pid").read_text()))
    frozen = [broker, *broker.children(recursive=True)]
    for process in frozen:
        process.suspend()
    time.sleep(timeout_ms / 1000 + 15)
    for process in frozen:
        process.resume()
    trickle.join()
    assert worker.wait(timeout=900) == 0, log_path.read_text()[-3000:]
    events = [e["event"] for e in log_events(log_path.read_text())]
    assert events.count("worker_started") == 1
    counts = {e: events.count(e) for e in ("transaction_outcome_unknown", "transaction_failed")}
    print(f"\n{counts}")
    assert_exactly_once(deployment, jobs)


def test_sigterm_while_generating_then_restart(
    kafka_bootstrap: str, tmp_path: Path, make_deployment: DeployFn
) -> None:
    deployment = make_deployment(kafka_bootstrap)
    jobs: list[dict] = []
    outcomes = []
    # Jobs not yet in the engine go back to the group at once. Within the deadline the requests
    # in the engine complete and commit; with no deadline they are aborted and abandoned.
    for phase, (name, deadline) in enumerate([("graceful", "30"), ("no-deadline", "0")]):
        # A fresh backlog each time, so the engine is full when the signal comes.
        jobs += publish_jobs(deployment, 360, seed=44 + phase, prefix=f"st{phase}")
        log_path = tmp_path / f"{name}.log"
        worker = deployment.start_worker(
            log_path=log_path, **FAST, LORA_WORKERS_DELIVERY__SHUTDOWN_DEADLINE_S=deadline
        )
        # The engine fills (depth 16) as its busy period starts, with the backlog behind it; a
        # count of commits is no such sign (on an idle machine 360 jobs take 5 s and 3 commits).
        wait_for_event(worker, log_path, "engine_running")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=120) == 0, log_path.read_text()[-3000:]
        stopped = [e for e in log_events(log_path.read_text()) if e["event"] == "worker_stopped"]
        outcomes.append(stopped[0]["abandoned"])
    assert outcomes[0] == 0, "the graceful stop abandoned requests in the engine"
    assert outcomes[1] > 0, "the stop without a deadline abandoned nothing"
    # Every job is answered once, so the abandoned jobs were served again by the next worker.
    finish(deployment, tmp_path, "last")
    assert_exactly_once(deployment, jobs)


def test_engine_core_killed_with_many_requests_in_it_is_restarted(
    kafka_bootstrap: str, tmp_path: Path, make_deployment: DeployFn
) -> None:
    deployment = make_deployment(kafka_bootstrap)
    # Enough work that the engine is still full when the kill comes: 240 jobs took 1.0 s here.
    jobs = publish_jobs(deployment, 1200, seed=45, prefix="ec")
    log_path = tmp_path / "worker.log"
    # A deep engine: the jobs waiting when the worker starts enter it as fast as room frees.
    deep = {**FAST, "LORA_WORKERS_ADMISSION__ENGINE_DEPTH": "256"}
    worker = deployment.start_worker(*IDLE_EXIT, log_path=log_path, **deep)
    wait_for_event(worker, log_path, "engine_running", 1)
    time.sleep(0.5)  # the engine full: 1,200 answers of 32-64 tokens take several seconds
    cores = engine_core_pids(worker.pid)
    assert cores, "no engine-core process under the worker"
    for pid in cores:
        os.kill(pid, signal.SIGKILL)
    assert worker.wait(timeout=600) == 0, log_path.read_text()[-3000:]
    log = log_path.read_text()
    assert log.count('"event": "engine_restarted"') >= 1
    assert log.count('"event": "worker_started"') == 1
    (death,) = [e for e in log_events(log) if e["event"] == "engine_died" and "requests" in e]
    print(f"\n{death['requests']} requests died together")
    assert death["requests"] >= 50  # many requests in the engine died together...
    assert_exactly_once(deployment, jobs)  # ...and every one was served again
    assert deployment.read(deployment.dlq_topics) == []


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def latencies_s(deployment: Deployment, job_ids: set[str]) -> list[float]:
    """Kafka timestamp of each job to its result, from the committed results' timings."""
    topics = [p.result_topic for p in deployment.pipelines.values()]
    results = [json.loads(m.value()) for m in deployment.read(topics)]
    return [
        (r["timings"]["completed_at_ms"] - r["timings"]["enqueued_at_ms"]) / 1000
        for r in results
        if r["job_id"] in job_ids
    ]


def wait_for_answers(
    deployment: Deployment, jobs: list[dict], dead: int, worker: subprocess.Popen, log_path: Path
) -> None:
    """Until every job has a committed result and `dead` dead letters are written."""
    expected = {job["job_id"] for job in jobs}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert worker.poll() is None, log_path.read_text()[-3000:]
        answered = expected <= set(deployment.results())
        if answered and len(deployment.read(deployment.dlq_topics)) >= dead:
            return
        time.sleep(1)
    raise AssertionError(f"not all {len(jobs)} jobs answered in time")


def test_a_payload_that_kills_the_engine_repeated_among_good_jobs(
    kafka_bootstrap: str, tmp_path: Path, make_deployment: DeployFn
) -> None:
    """5 copies of an engine-killing payload among 1,000 good jobs, on a warm worker with a
    standby engine (`engine.standby: auto`) at full depth: every good job answered, and their
    p99 at most twice what it is without the payload."""
    deployment = make_deployment(kafka_bootstrap)
    marker = "crash-the-engine-now"
    log_path = tmp_path / "worker.log"
    settings = {
        "LORA_WORKERS_ENGINE__FAULT_INJECTION_CRASH_MARKER": marker,
        "LORA_WORKERS_ENGINE__STANDBY": "auto",
        # Engine restarts run on the engine loop's thread; a worker that stopped polling
        # meanwhile would be thrown out of its group.
        "LORA_WORKERS_KAFKA": json.dumps(
            {"session.timeout.ms": "6000", "max.poll.interval.ms": "15000"}
        ),
    }
    worker = deployment.start_worker(log_path=log_path, **settings)
    wait_for_event(worker, log_path, "partitions_assigned", containing='"partitions": [["')
    wait_for_event(worker, log_path, "engine_standby_ready")
    # The same worker, warm, without and then with the payload: the good jobs' latency compared.
    baseline = mixed_jobs(1000, seed=46, prefix="pb")
    produce(kafka_bootstrap, job_records(deployment, baseline))
    wait_for_answers(deployment, baseline, 0, worker, log_path)
    jobs = mixed_jobs(1000, seed=49, prefix="px")
    poisons = [
        {"job_id": f"poison-{n}", "task": "reply", "input": f"hello {marker} please"}
        for n in range(5)
    ]
    mixed = [*jobs[:10], poisons[0]]
    for n, poison in enumerate(poisons[1:]):  # the repeats spread over the rest
        mixed += [*jobs[10 + 200 * n : 210 + 200 * n], poison]
    mixed += jobs[810:]
    assert len(mixed) == 1005
    produce(kafka_bootstrap, job_records(deployment, mixed))
    wait_for_answers(deployment, jobs, len(poisons), worker, log_path)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    assert_exactly_once(deployment, baseline + jobs)
    dead = deployment.read(deployment.dlq_topics)
    assert sorted(m.key() for m in dead) == sorted(p["job_id"].encode() for p in poisons)
    assert {dict(m.headers())[DLQ_ERROR_CODE] for m in dead} == {b"engine_crash"}
    events = log_events(log_path.read_text())
    assert not [e for e in events if e["event"] == "partitions_lost"]
    restarts = [e for e in events if e["event"] == "engine_restarted"]
    # The first death, with good jobs in the engine, switches to the standby started before.
    assert restarts and restarts[0]["from_standby"], restarts
    before = p99(latencies_s(deployment, {job["job_id"] for job in baseline}))
    after = p99(latencies_s(deployment, {job["job_id"] for job in jobs}))
    print(
        f"\ngood jobs' p99: {before:.1f} s alone, {after:.1f} s with the payload x5 "
        f"({after / before:.2f}x); restarts: "
        + ", ".join(f"{e['restart_s']} s{' (standby)' * e['from_standby']}" for e in restarts)
    )
    assert after <= 2 * before
