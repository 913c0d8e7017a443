"""Kafka → Parquet on real parts: a worker writing results to a Parquet dataset is killed with -9
midway and restarted; the dataset ends with exactly one row per job, none missing."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml

from tests.datasets import read_dataset
from tests.integration.harness import deploy, job_record, mixed_jobs, produce
from tests.integration.processes import kill_9_leaving_no_orphans

pytestmark = pytest.mark.integration

SHALLOW_ENGINE = {
    "LORA_WORKERS_ADMISSION__ENGINE_DEPTH": "16",
    # The killed worker stays a group member until its session times out; keep that short.
    "LORA_WORKERS_KAFKA": '{"session.timeout.ms": "6000"}',
}


def test_kill_9_and_restart_leave_no_duplicate_or_missing_row(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    deployment = deploy(kafka_bootstrap, tmp_path)
    dataset = tmp_path / "dataset"
    for path in deployment.pipelines_dir.glob("*.yaml"):
        pipeline = yaml.safe_load(path.read_text())
        pipeline["sinks"] = ["parquet"]
        pipeline["parquet"] = {"path": str(dataset), "rows_per_file": 12, "max_file_age_ms": 300}
        path.write_text(yaml.safe_dump(pipeline))

    jobs = mixed_jobs(240, seed=9, prefix="pq")
    random.Random(9).shuffle(jobs)
    topics = {
        task: f"jobs.{task}.{deployment.suffix}" for task in ("classify", "reply", "summarize")
    }
    records = [job_record(topics[job["task"]], job) for job in jobs]
    records.insert(100, (topics["classify"], b"poison", b"not json", []))  # dead-lettered
    produce(kafka_bootstrap, records)

    first_log = tmp_path / "first.log"
    first = deployment.start_worker(log_path=first_log, **SHALLOW_ENGINE)
    deadline = time.monotonic() + 600
    while len(list(dataset.rglob("*.parquet"))) < 4:
        assert first.poll() is None, first_log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no files in 10 minutes"
        time.sleep(0.1)
    kill_9_leaving_no_orphans(first)

    exit_code = deployment.run_worker(
        "--idle-exit", "30", log_path=tmp_path / "second.log", settings=SHALLOW_ENGINE
    )
    assert exit_code == 0, (tmp_path / "second.log").read_text()[-3000:]

    table = read_dataset(dataset)
    job_ids = table.column("job_id").to_pylist()
    assert sorted(job_ids) == sorted(j["job_id"] for j in jobs)  # no gap, no duplicate
    assert set(pc.unique(table.column("task")).to_pylist()) == {"classify", "reply", "summarize"}
    assert pc.all(pc.equal(table.column("status"), "ok")).as_py()
    # The poison is answered in its dead-letter topic, once, with its reason and origin.
    (dead,) = deployment.read([deployment.pipelines["classify"].dlq_topic])
    headers = dict(dead.headers())
    assert (dead.key(), dead.value()) == (b"poison", b"not json")
    assert headers["dlq.error.code"] == b"invalid_json"
    assert headers["dlq.source.topic"] == topics["classify"].encode()
