"""Summaries of what the workers wrote: result counts by task, adapter and status."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from workers.core.contracts import adapter_label
from workers.kafka.clients import KafkaConnection
from workers.kafka.topics import read_to_end


@dataclass
class ResultsReport:
    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    examples: dict[tuple[str, str, str], str] = field(default_factory=dict)
    dead_letters: Counter[tuple[str, str]] = field(default_factory=Counter)


def collect(
    kafka: KafkaConnection | str, result_topics: list[str], dlq_topics: list[str]
) -> ResultsReport:
    report = ResultsReport()
    for message in read_to_end(kafka, result_topics):
        result = json.loads(message.value())
        adapter = result["adapter"]
        label = adapter_label(adapter and adapter["name"], adapter and adapter["version"])
        key = (result["task"], label, result["status"])
        report.counts[key] += 1
        report.examples.setdefault(key, result["raw_output"])
    for message in read_to_end(kafka, dlq_topics):
        headers = dict(message.headers() or [])
        code = (headers.get("dlq.error.code") or b"?").decode()
        report.dead_letters[(message.topic(), code)] += 1
    return report


def print_report(report: ResultsReport, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="Results by task and adapter")
    for column in ("task", "adapter", "status", "jobs", "example output"):
        table.add_column(column, overflow="fold")
    for (task, adapter, status), count in sorted(report.counts.items()):
        example = report.examples[(task, adapter, status)]
        table.add_row(task, adapter, status, str(count), example[:70])
    console.print(table)
    if report.dead_letters:
        dlq = Table(title="Dead letters")
        for column in ("topic", "reason", "messages"):
            dlq.add_column(column)
        for (topic, code), count in sorted(report.dead_letters.items()):
            dlq.add_row(topic, code, str(count))
        console.print(dlq)
