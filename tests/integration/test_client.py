"""The client, request-reply, the `get`/`results --json`/`publish --by-task` commands and the
example HTTP endpoint, on the real broker and one real worker (one engine start)."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from examples.http_endpoint import make_server
from tests.integration.harness import Deployment, deploy, job_record, mixed_jobs, produce
from workers.client import Client, JobFailed, as_completed
from workers.core.config import Settings
from workers.core.contracts import Result
from workers.kafka.topics import TopicSpec, create_topics, read_to_end

pytestmark = pytest.mark.integration

ANSWER_WAIT_S = 600  # the engine's start is part of the first answers' wait


@dataclass
class Running:
    deployment: Deployment
    settings: Settings
    reply_topic: str
    tmp_path: Path


@pytest.fixture(scope="module")
def running(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp_path = tmp_path_factory.mktemp("client")
    deployment = deploy(kafka_bootstrap, tmp_path)
    reply_topic = f"replies.{deployment.suffix}"
    create_topics(kafka_bootstrap, [TopicSpec(reply_topic, 3)], 1)
    settings = Settings(
        bootstrap_servers=kafka_bootstrap,
        pipelines_dir=deployment.pipelines_dir,
        unknown_task_dlq=deployment.unknown_task_dlq,
        group_id=deployment.group_id,
    )
    deployment.start_worker(log_path=tmp_path / "worker.log")
    try:
        yield Running(deployment, settings, reply_topic, tmp_path)
    finally:
        deployment.kill_workers()


def poisons() -> list[dict]:
    """Valid jobs (the client sends them) the worker dead-letters, with the reason expected."""
    return [
        {"job_id": "p-ghost-c", "task": "classify", "input": "refund", "adapter": "ghost"},
        {"job_id": "p-ghost-r", "task": "reply", "input": "hello", "adapter": "ghost"},
        {"job_id": "p-long", "task": "summarize", "input": "word " * 800},
    ]


POISON_CODES = {"p-ghost-c": "unknown_adapter", "p-ghost-r": "unknown_adapter"}
POISON_CODES["p-long"] = "context_exceeded"


def test_a_client_awaits_every_job_and_poison_raises_its_reason(running: Running) -> None:
    deployment = running.deployment
    good = mixed_jobs(12, seed=22, prefix="c")
    # Jobs the client would refuse to send, published as other services might: their dead
    # letters reach the client too.
    raw = [
        {"job_id": "p-task", "task": "translate", "input": "x"},  # unknown_task
        {"job_id": "p-mismatch", "task": "reply", "input": "x"},  # on classify: task_mismatch
    ]
    with Client(running.settings) as client:
        handles = client.submit_many([*good, *poisons()])
        classify_topic = deployment.pipelines["classify"].input_topic
        produce(deployment.bootstrap, [job_record(classify_topic, job) for job in raw])
        handles += [client.handle("p-task"), client.handle("p-mismatch")]
        outcomes: dict[str, Result | JobFailed] = {}
        for handle in as_completed(handles, timeout=ANSWER_WAIT_S):
            try:
                outcomes[handle.job_id] = handle.result(0)
            except JobFailed as failed:
                outcomes[handle.job_id] = failed
        assert client.stats()["awaited"] == 0
    for job in good:
        result = outcomes[job["job_id"]]
        assert isinstance(result, Result), result
        assert (result.job_id, result.task) == (job["job_id"], job["task"])
    expected = {**POISON_CODES, "p-task": "unknown_task", "p-mismatch": "task_mismatch"}
    assert {
        job_id: outcome.code
        for job_id, outcome in outcomes.items()
        if isinstance(outcome, JobFailed)
    } == expected


def test_reply_to_gets_exactly_one_answer_per_job_and_results_stay(running: Running) -> None:
    deployment = running.deployment
    good = mixed_jobs(6, seed=23, prefix="r")
    with Client(running.settings, reply_to=running.reply_topic) as client:
        assert client.answer_topics() == [running.reply_topic]
        handles = client.submit_many([*good, poisons()[0] | {"job_id": "rp-ghost"}])
        outcomes = {}
        for handle in as_completed(handles, timeout=ANSWER_WAIT_S):
            try:
                outcomes[handle.job_id] = handle.result(0).status
            except JobFailed as failed:
                outcomes[handle.job_id] = failed.code
    assert outcomes["rp-ghost"] == "unknown_adapter"
    assert len(outcomes) == len(good) + 1
    replies = Counter(
        m.key().decode() for m in read_to_end(deployment.bootstrap, [running.reply_topic])
    )
    assert replies == Counter({job_id: 1 for job_id in outcomes})
    # The result topics are as they were: each good job's result there too, once.
    results = deployment.results()
    assert all(results[job["job_id"]] == 1 for job in good)


def test_a_restarted_client_finds_answers_committed_before_and_asyncio_awaits(
    running: Running,
) -> None:
    first = mixed_jobs(3, seed=24, prefix="a")
    with Client(running.settings) as client:
        handles = client.submit_many(first)
        for handle in handles:
            handle.result(ANSWER_WAIT_S)
    # A new process: answers already committed are read back (lookback), without resubmitting.
    with Client(running.settings) as restarted:

        async def both() -> tuple[Result, JobFailed | None]:
            result = await restarted.result(first[0]["job_id"], timeout=60)
            try:
                await restarted.result("p-ghost-c", timeout=60)
            except JobFailed as failed:
                return result, failed
            return result, None

        result, failed = asyncio.run(both())
    assert result.job_id == first[0]["job_id"]
    assert failed is not None and failed.code == "unknown_adapter"


def test_the_get_results_and_publish_commands(running: Running) -> None:
    deployment = running.deployment
    jobs = mixed_jobs(2, seed=25, prefix="g")
    lines = [
        json.dumps(jobs[0]),
        json.dumps(jobs[1]),
        json.dumps({"job_id": "g-x", "task": "translate", "input": "x"}),
    ]
    path = running.tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    published = deployment.cli("publish", "--by-task", str(path))
    assert published.returncode == 1, published.stderr
    assert "line 3: unknown task 'translate'" in published.stderr
    assert published.stdout.count("published 1 jobs to") == 2
    got = deployment.cli("get", jobs[1]["job_id"], "--wait", str(ANSWER_WAIT_S), "--json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["job_id"] == jobs[1]["job_id"]
    assert deployment.cli("get", jobs[0]["job_id"], "--wait", "120").returncode == 0
    dead = deployment.cli("get", "p-ghost-c", "--json")
    assert dead.returncode == 1
    assert json.loads(dead.stdout)["dead_letter"]["code"] == "unknown_adapter"
    missing = deployment.cli("get", "never-submitted", "--wait", "1")
    assert missing.returncode == 1 and "no answer for job never-submitted" in missing.stderr
    report = deployment.cli("results", "--json")
    assert report.returncode == 0, report.stderr
    document = json.loads(report.stdout)
    assert sum(row["jobs"] for row in document["results"]) >= 2
    assert any(row["code"] == "unknown_adapter" for row in document["dead_letters"])
    stray = running.tmp_path / "stray.jsonl"
    stray.write_text(json.dumps({"job_id": "s-1", "task": "classify", "input": "x"}) + "\n")
    warned = deployment.cli("publish", "--topic", f"nowhere.{deployment.suffix}", str(stray))
    assert f"warning: no pipeline reads topic nowhere.{deployment.suffix}" in warned.stderr


def test_the_example_http_endpoint_answers(running: Running) -> None:
    with Client(running.settings) as client:
        server = make_server(client, "127.0.0.1", 0, timeout_s=ANSWER_WAIT_S)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}/jobs"

        def post(document: object) -> tuple[int, dict]:
            request = urllib.request.Request(url, data=json.dumps(document).encode())
            try:
                with urllib.request.urlopen(request, timeout=ANSWER_WAIT_S) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())

        try:
            job = mixed_jobs(1, seed=26, prefix="h")[0]
            status, body = post(job)
            assert (status, body["job_id"]) == (200, job["job_id"])
            status, body = post(
                {"job_id": "h-ghost", "task": "classify", "input": "x", "adapter": "ghost"}
            )
            assert (status, body["code"]) == (422, "unknown_adapter")
            status, body = post({"job_id": "h-bad", "task": "classify"})
            assert status == 400 and "input" in body["error"]
            status, body = post({"job_id": "h-bad", "task": "translate", "input": "x"})
            assert status == 400 and "translate" in body["error"]
        finally:
            server.shutdown()


def test_a_client_refuses_a_reply_topic_that_does_not_exist(running: Running) -> None:
    missing = f"replies.missing.{running.deployment.suffix}"
    with pytest.raises(ValueError, match=f"reply topic {missing} does not exist"):
        Client(running.settings, reply_to=missing)


def test_reply_to_gets_exactly_one_answer_per_job_through_kill_9(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    from tests.integration.harness import job_records, wait_for_event
    from tests.integration.processes import kill_9_leaving_no_orphans
    from tests.integration.test_faults import FAST

    deployment = deploy(kafka_bootstrap, tmp_path)
    reply_topic = f"replies.{deployment.suffix}"
    create_topics(kafka_bootstrap, [TopicSpec(reply_topic, 3)], 1)
    # Enough that work is left at the second kill: a busy machine's commits carry more each.
    jobs = [job | {"reply_to": reply_topic} for job in mixed_jobs(600, seed=27, prefix="k")]
    produce(kafka_bootstrap, job_records(deployment, jobs))
    replica = {**FAST, "LORA_WORKERS_INSTANCE_ID": "replica-0"}
    try:
        for point, count in enumerate((1, 4)):  # just after a commit; after several
            log_path = tmp_path / f"killed-{point}.log"
            worker = deployment.start_worker(log_path=log_path, **replica)
            wait_for_event(worker, log_path, "transaction_committed", count)
            kill_9_leaving_no_orphans(worker)
        code = deployment.run_worker(
            "--idle-exit", "20", log_path=tmp_path / "last.log", settings=replica
        )
        assert code == 0, (tmp_path / "last.log").read_text()[-3000:]
    finally:
        deployment.kill_workers()
    expected = Counter({job["job_id"]: 1 for job in jobs})
    replies = Counter(m.key().decode() for m in read_to_end(kafka_bootstrap, [reply_topic]))
    assert replies == expected
    assert deployment.results() == expected
