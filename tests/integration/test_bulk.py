"""Bulk mode on a real vLLM engine: 500+ jobs over three tasks into Parquet, killed with -9
midway and run again: one row per input job, no duplicate, no gap; read back with DuckDB."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from tests.integration.harness import expected_adapter, load_zoo_generators
from tests.integration.processes import kill_9_leaving_no_orphans

pytestmark = pytest.mark.integration

TINY_BUDGET = 3  # tokens: no classifier answer fits, so these must end as invalid_output


def bulk_jobs() -> list[dict]:
    zoo = load_zoo_generators()
    rng = random.Random(77)
    jobs: list[dict] = []
    for i in range(200):
        text, label, _ = zoo.make_message(rng)
        job = {
            "job_id": f"k-{i:04d}",
            "task": "classify",
            "input": text,
            "metadata": {"expected_label": label},
        }
        if i % 25 == 0:
            job["params"] = {"max_tokens": TINY_BUDGET}
        jobs.append(job)
    for i in range(160):
        job = {"job_id": f"r-{i:04d}", "task": "reply", "input": zoo.make_message(rng)[0]}
        tenant = ["acme", "globex", None, "initech"][i % 4]
        if tenant:
            job["tenant"] = tenant
        jobs.append(job)
    for i in range(150):
        jobs.append({"job_id": f"s-{i:04d}", "task": "summarize", "input": zoo.make_report(rng)})
    rng.shuffle(jobs)
    return jobs


def bulk(input_path: Path, output: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "workers",
            "bulk",
            "--input",
            str(input_path),
            "--output",
            str(output),
            "--rows-per-file",
            "40",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_bulk_run_survives_kill_9_without_duplicates_or_gaps(tmp_path: Path) -> None:
    jobs = bulk_jobs()
    input_path = tmp_path / "nightly.jsonl"
    with input_path.open("w") as lines:
        for job in jobs:
            lines.write(json.dumps(job) + "\n")
        lines.write("this row is not JSON\n")
        lines.write(json.dumps({"job_id": "x-1", "task": "translate", "input": "hola"}) + "\n")
    output = tmp_path / "dataset"

    first = bulk(input_path, output, tmp_path / "first.log")
    deadline = time.monotonic() + 600
    while len(list(output.rglob("part-*.parquet"))) < 3:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no files written in 10 minutes"
        time.sleep(0.2)
    kill_9_leaving_no_orphans(first, tmp_path / "first.log")
    files = list(output.rglob("part-*.parquet"))
    files_before = len(files)
    rows_before = sum(pq.ParquetFile(path).metadata.num_rows for path in files)

    second = bulk(input_path, output, tmp_path / "second.log")
    assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    summary = (tmp_path / "second.log").read_text()
    skipped = re.search(r"skipped \(already written\)\D*([\d,]+)", summary)
    assert skipped is not None, summary[-3000:]
    assert int(skipped.group(1).replace(",", "")) == rows_before > 0

    source = (
        f"read_parquet('{output}/**/*.parquet', hive_partitioning = true, union_by_name = true)"
    )
    relation = duckdb.sql(
        "SELECT job_id, task, status, adapter_name, error_code, error_message, out_label, "
        f"out_summary, epoch_ms(completed_at) AS completed_ms FROM {source}"
    )
    columns, rows = relation.columns, relation.fetchall()
    table = [dict(zip(columns, row, strict=True)) for row in rows]
    by_id: dict[str, list[dict]] = {}
    for row in table:
        by_id.setdefault(row["job_id"], []).append(row)
    expected_ids = {j["job_id"] for j in jobs} | {"row-510", "x-1"}
    assert set(by_id) == expected_ids  # no gap, nothing extra
    assert [i for i, found in by_id.items() if len(found) > 1] == []  # no duplicate
    assert files_before >= 3

    for job in jobs:
        (row,) = by_id[job["job_id"]]
        assert row["task"] == job["task"]
        assert row["adapter_name"] == expected_adapter(job)
        if job["task"] == "classify" and "params" in job:
            assert row["status"] == "invalid_output"
            assert row["error_code"] == "truncated" and row["error_message"]
        elif job["task"] in ("classify", "summarize"):
            assert row["status"] == "ok", row  # constrained decoding: every answer validates
    classified = [j for j in jobs if j["task"] == "classify" and "params" not in j]
    correct = sum(
        by_id[j["job_id"]][0]["out_label"] == j["metadata"]["expected_label"] for j in classified
    )
    assert correct / len(classified) >= 0.9
    assert all(by_id[j["job_id"]][0]["out_summary"] for j in jobs if j["task"] == "summarize")
    assert by_id["row-510"][0]["error_code"] == "invalid_json"
    assert by_id["x-1"][0]["error_code"] == "unknown_task"
