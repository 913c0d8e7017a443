"""The operator commands against a real broker: topics create, publish."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import deploy

pytestmark = pytest.mark.integration


def test_topics_create_is_idempotent(kafka_bootstrap: str, tmp_path: Path) -> None:
    deployment = deploy(kafka_bootstrap, tmp_path)  # creates them once
    again = deployment.cli("topics", "create")
    assert again.returncode == 0, again.stderr
    lines = again.stdout.strip().splitlines()
    expected = {deployment.unknown_task_dlq, deployment.updates_topic, deployment.status_topic}
    expected.add(deployment.evaluations_topic)
    for pipeline in deployment.pipelines.values():
        expected |= {pipeline.input_topic, pipeline.result_topic, pipeline.dlq_topic}
    assert {line.split()[1] for line in lines} == expected
    assert all(line.split()[0] == "exists" for line in lines)


def test_publish_from_stdin_keys_by_job_id(kafka_bootstrap: str, tmp_path: Path) -> None:
    deployment = deploy(kafka_bootstrap, tmp_path)
    topic = deployment.pipelines["classify"].input_topic
    lines = [
        '{"job_id": "a-1", "task": "classify", "input": "refund please"}',
        "",
        '{"job_id": "a-2", "task": "classify", "input": "app crash"}',
        "not json at all",
    ]
    completed = subprocess.run(
        [sys.executable, "-m", "workers", "publish", "--topic", topic, "-"],
        input="\n".join(lines) + "\n",
        env=deployment.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == (f"published 3 jobs to {topic} (1 without a job_id key)")
    messages = deployment.read([topic])
    assert sorted((m.key(), m.value()) for m in messages if m.key()) == [
        (b"a-1", lines[0].encode()),
        (b"a-2", lines[2].encode()),
    ]
    assert [m.value() for m in messages if m.key() is None] == [b"not json at all"]


def test_publish_a_parquet_file(kafka_bootstrap: str, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    deployment = deploy(kafka_bootstrap, tmp_path)
    topic = deployment.pipelines["summarize"].input_topic
    jobs = pa.table(
        {
            "job_id": [f"n-{i}" for i in range(50)],
            "task": ["summarize"] * 50,
            "input": [f"Ana fixed report {i}. The team moved the plan." for i in range(50)],
            "tenant": [None if i % 2 else "acme" for i in range(50)],
        }
    )
    pq.write_table(jobs, tmp_path / "nightly.parquet")
    completed = deployment.cli("publish", "--topic", topic, str(tmp_path / "nightly.parquet"))
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == f"published 50 jobs to {topic}"
    published = {m.key().decode(): json.loads(m.value()) for m in deployment.read([topic])}
    assert set(published) == {f"n-{i}" for i in range(50)}
    assert published["n-0"] == {
        "job_id": "n-0",
        "task": "summarize",
        "input": "Ana fixed report 0. The team moved the plan.",
        "tenant": "acme",
    }
    assert "tenant" not in published["n-1"]  # nulls are dropped, not sent as null
