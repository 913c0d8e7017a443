"""Publish jobs from a JSONL file (or stdin) to a topic, keyed by job_id."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from confluent_kafka import KafkaError, Message, Producer


@dataclass
class PublishReport:
    written: int = 0
    failed: int = 0
    unkeyed: int = 0  # lines that are not a JSON object with a job_id (published anyway)


def job_key(line: str) -> bytes | None:
    """The job_id as the message key, so one job always lands in one partition."""
    try:
        document = json.loads(line)
    except json.JSONDecodeError:
        return None
    job_id = document.get("job_id") if isinstance(document, dict) else None
    return job_id.encode() if isinstance(job_id, str) else None


def publish_lines(bootstrap_servers: str, topic: str, lines: Iterable[str]) -> PublishReport:
    report = PublishReport()
    producer = Producer(
        {
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,
            "linger.ms": 10,
            # A fresh broker answers "coordinator loading" once; librdkafka retries, so only
            # errors are worth printing to an operator.
            "log_level": 3,
        },
        logger=None,
    )

    def delivered(error: KafkaError | None, _message: Message) -> None:
        if error is None:
            report.written += 1
        else:
            report.failed += 1

    for raw_line in lines:
        line = raw_line.rstrip("\n")
        if not line.strip():
            continue
        key = job_key(line)
        report.unkeyed += key is None
        while True:
            try:
                producer.produce(topic, key=key, value=line.encode(), on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    remaining = producer.flush(60)
    report.failed += remaining
    return report
