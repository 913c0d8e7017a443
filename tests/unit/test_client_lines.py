"""`publish --by-task` splits a mixed-task file: each line to its task's topic, and a line of
no pipeline's task named by its line number instead of published."""

from __future__ import annotations

from workers.client.lines import rows_by_task

TOPICS = {"classify": "jobs.classify", "reply": "jobs.reply"}


def test_each_line_goes_to_its_tasks_topic_and_unknown_tasks_are_named_by_line() -> None:
    rows = [
        (1, b'{"job_id": "a", "task": "classify", "input": "x"}'),
        (2, b'{"job_id": "b", "task": "reply", "input": "x"}'),
        (3, b'{"job_id": "c", "task": "translate", "input": "x"}'),
        (4, b"not json"),
        (5, b'{"job_id": "d", "task": "classify", "input": "y"}'),
        (6, b'{"job_id": "e", "task": 7}'),
    ]
    by_topic, unrouted = rows_by_task(rows, TOPICS)
    assert {t: [n for n, _ in r] for t, r in by_topic.items()} == {
        "jobs.classify": [1, 5],
        "jobs.reply": [2],
    }
    assert [line for line, _ in unrouted] == [3, 4, 6]
    assert "translate" in unrouted[0][1]
