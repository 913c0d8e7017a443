"""Publish jobs from a JSONL or Parquet file (or JSONL on stdin) to a topic, keyed by job_id,
with a progress bar: a nightly file fanned out to a fleet of workers."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial

from confluent_kafka import KafkaError, KafkaException, Message
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from workers.kafka.clients import KafkaConnection, describe, producer
from workers.kafka.sinks import produce_waiting_for_room


@dataclass
class PublishReport:
    written: int = 0
    unkeyed: int = 0  # lines that are not a JSON object with a job_id (published anyway)
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line, reason), not written

    @property
    def failed(self) -> int:
        return len(self.errors)


def job_key(value: bytes) -> bytes | None:
    """The job_id as the message key, so one job always lands in one partition."""
    try:
        document = json.loads(value)
    except (ValueError, RecursionError):  # not JSON, or past a parser limit
        return None
    job_id = document.get("job_id") if isinstance(document, dict) else None
    return job_id.encode() if isinstance(job_id, str) else None


def publish_rows(
    kafka: KafkaConnection | str,
    topic: str,
    rows: Iterable[tuple[int, bytes]],
    total: int | None = None,
) -> PublishReport:
    report = PublishReport()
    writer = producer(kafka, {"enable.idempotence": True, "linger.ms": 10})

    def delivered(line: int, error: KafkaError | None, _message: Message) -> None:
        if error is None:
            report.written += 1
        else:
            report.errors.append((line, describe(error)))

    progress = Progress(
        TextColumn(f"publishing to {topic}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with progress:
        bar = progress.add_task("publish", total=total)
        for line, value in rows:
            key = job_key(value)
            report.unkeyed += key is None
            # One line that cannot be written is reported with its number; the rest go on.
            try:
                produce_waiting_for_room(
                    writer, topic, key=key, value=value, on_delivery=partial(delivered, line)
                )
            except KafkaException as exc:
                report.errors.append((line, describe(exc.args[0])))
            writer.poll(0)
            progress.advance(bar)
    remaining = writer.flush(60)
    if remaining:
        report.errors.append((0, f"{remaining} messages not acknowledged within 60 s"))
    report.errors.sort()
    return report
