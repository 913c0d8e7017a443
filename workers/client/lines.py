"""A mixed-task job file, split by task: each line goes to its task's input topic."""

from __future__ import annotations

import json
from collections.abc import Iterable


def task_of(value: bytes) -> str | None:
    try:
        document = json.loads(value)
    except (ValueError, RecursionError):
        return None
    task = document.get("task") if isinstance(document, dict) else None
    return task if isinstance(task, str) else None


def rows_by_task(
    rows: Iterable[tuple[int, bytes]], topics: dict[str, str]
) -> tuple[dict[str, list[tuple[int, bytes]]], list[tuple[int | None, str]]]:
    """(line, value) rows grouped by their task's input topic (`topics`: task -> topic), and
    (line, reason) for each row of no pipeline's task, which is not published."""
    by_topic: dict[str, list[tuple[int, bytes]]] = {}
    unrouted: list[tuple[int | None, str]] = []
    for line, value in rows:
        task = task_of(value)
        if task is None:
            unrouted.append((line, "no task: not a JSON object with a string task"))
        elif task not in topics:
            unrouted.append((line, f"unknown task {task!r}"))
        else:
            by_topic.setdefault(topics[task], []).append((line, value))
    return by_topic, unrouted
