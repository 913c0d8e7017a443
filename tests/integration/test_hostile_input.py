"""Hostile input on real parts: messages that are legal Kafka records but hit parser limits,
encoding corners, numbers the engine refuses and size limits, interleaved with good jobs across
partitions. Every good job is answered, every hostile message is answered exactly once (a
result or a dead letter with its reason), offsets commit to the end, and the worker exits 0."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Producer

from tests.integration.harness import (
    assert_committed_to_the_end,
    deploy,
    job_record,
    mixed_jobs,
)

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Hostile:
    task: str  # whose input topic it is published to
    value: bytes | None
    expect: str  # a dead-letter code, or "result" for a job that is served anyway
    job_id: str | None = None  # for "result"
    key: bytes = b"hostile"


def job(job_id: str, task: str = "classify", **fields: object) -> dict:
    return {"job_id": job_id, "task": task, "input": "refund please", **fields}


def raw(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogatepass")


HOSTILE = [
    Hostile("classify", None, "invalid_json"),
    Hostile("classify", b"", "invalid_json"),
    Hostile("reply", b"\xff\xfe\xfa not utf-8", "invalid_json"),
    Hostile("reply", b"[" * 50_000 + b"]" * 50_000, "invalid_json"),
    Hostile(
        "summarize",
        raw(
            '{"job_id": "deep", "task": "summarize", "input": "x", "metadata": '
            + '{"a": ' * 500
            + "1"
            + "}" * 500
            + "}"
        ),
        "invalid_job",
    ),
    Hostile(
        "classify",
        raw(
            '{"job_id": "digits", "task": "classify", "input": "x", "params": {"seed": '
            + "7" * 6000
            + "}}"
        ),
        "invalid_json",
    ),
    Hostile("classify", json.dumps(job("seed64", params={"seed": 2**64})).encode(), "invalid_job"),
    Hostile("classify", json.dumps(job("seedneg", params={"seed": -1})).encode(), "invalid_job"),
    Hostile(
        "classify", raw(json.dumps(job("nan", params={"temperature": float("nan")}))), "invalid_job"
    ),
    Hostile(
        "classify",
        raw(
            '{"job_id": "inf", "task": "classify", "input": "x", "params": {"temperature": 1e999}}'
        ),
        "invalid_job",
    ),
    Hostile("classify", json.dumps(job("tok0", params={"max_tokens": 0})).encode(), "invalid_job"),
    Hostile(
        "reply", raw('{"job_id": "sur-in", "task": "reply", "input": "a \\ud800 b"}'), "invalid_job"
    ),
    Hostile(
        "reply",
        raw('{"job_id": "sur-meta", "task": "reply", "input": "hi", "metadata": {"\\udfff": 1}}'),
        "invalid_job",
    ),
    Hostile("reply", raw('{"job_id": "\\ud83d", "task": "reply", "input": "hi"}'), "invalid_job"),
    Hostile("classify", b"[]", "invalid_job"),
    Hostile("classify", b'"a string"', "invalid_job"),
    Hostile("classify", b"null", "invalid_job"),
    Hostile("classify", json.dumps(job("j" * 300)).encode(), "invalid_job"),
    Hostile("classify", json.dumps(job("path", adapter="../../etc")).encode(), "invalid_job"),
    Hostile("classify", json.dumps(job("mismatch", task="summarize")).encode(), "task_mismatch"),
    # Size limits: past max_job_bytes (500,000); just below it, with its metadata echoed back.
    Hostile(
        "summarize",
        json.dumps(job("huge", "summarize", metadata={"pad": "x" * 600_000})).encode(),
        "job_too_large",
    ),
    Hostile(
        "classify",
        json.dumps(job("nearly", metadata={"pad": "y" * 480_000})).encode(),
        "result",
        "nearly",
    ),
    # Served normally: control characters, a long key, an empty metadata object.
    Hostile(
        "reply", json.dumps(job("nul", "reply", input="a\u0000b\u001f")).encode(), "result", "nul"
    ),
    Hostile(
        "classify",
        json.dumps(job("longkey", metadata={})).encode(),
        "result",
        "longkey",
        b"k" * 100_000,
    ),
]


def test_hostile_messages_are_each_answered_once_and_never_stop_the_worker(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    deployment = deploy(kafka_bootstrap, tmp_path)
    good = mixed_jobs(90, seed=99, prefix="good")
    records = [
        (r, None)
        for r in (job_record(deployment.pipelines[j["task"]].input_topic, j) for j in good)
    ]
    for index, hostile in enumerate(HOSTILE):
        topic = deployment.pipelines[hostile.task].input_topic
        records.append(
            ((topic, hostile.key, hostile.value, [("x-case", str(index).encode())]), index)
        )
    random.Random(5).shuffle(records)
    positions = publish_with_positions(kafka_bootstrap, records)

    log_path = tmp_path / "worker.log"
    exit_code = deployment.run_worker("--idle-exit", "20", log_path=log_path)
    log = log_path.read_text(errors="replace")
    assert exit_code == 0, log[-3000:]

    results: Counter[str] = Counter()
    for message in deployment.read([p.result_topic for p in deployment.pipelines.values()]):
        results[json.loads(message.value())["job_id"]] += 1
    answered: dict[tuple[str, int, int], list[str]] = defaultdict(list)
    dlq_topics = [p.dlq_topic for p in deployment.pipelines.values()]
    for message in deployment.read([*dlq_topics, deployment.unknown_task_dlq]):
        headers = dict(message.headers() or [])
        source = (
            headers["dlq.source.topic"].decode(),
            int(headers["dlq.source.partition"]),
            int(headers["dlq.source.offset"]),
        )
        answered[source].append(headers["dlq.error.code"].decode())

    assert {j["job_id"]: results[j["job_id"]] for j in good} == {j["job_id"]: 1 for j in good}
    for index, hostile in enumerate(HOSTILE):
        at = positions[index]
        if hostile.expect == "result":
            assert results[hostile.job_id] == 1 and at not in answered, (index, hostile.job_id)
        else:
            assert answered.get(at) == [hostile.expect], (
                index,
                answered.get(at),
                hostile.value[:80] if hostile.value else None,
            )
    assert len(answered) == sum(h.expect != "result" for h in HOSTILE)
    assert_committed_to_the_end(deployment)


def publish_with_positions(bootstrap: str, records: list) -> dict[int, tuple[str, int, int]]:
    """Publish (record, hostile index or None); returns each hostile message's position."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    positions: dict[int, tuple[str, int, int]] = {}
    failures: list[str] = []

    def delivered(index, error, message) -> None:  # type: ignore[no-untyped-def]
        if error is not None:
            failures.append(str(error))
        elif index is not None:
            positions[index] = (message.topic(), message.partition(), message.offset())

    for (topic, key, value, headers), index in records:
        producer.produce(
            topic,
            key=key,
            value=value,
            headers=headers,
            on_delivery=lambda error, message, index=index: delivered(index, error, message),
        )
        producer.poll(0)
    assert producer.flush(60) == 0
    assert not failures, failures
    return positions
