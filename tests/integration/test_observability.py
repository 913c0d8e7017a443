"""What operators see of a running worker (real Kafka, real vLLM): `/healthz` and `/readyz`,
the per-adapter metrics the alert rules and the dashboard use, `lora-workers top`, and the W3C
trace context carried from a job to its answer and its log lines."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.harness import (
    ROOT,
    TopicWatcher,
    deploy,
    job_record,
    mixed_jobs,
    produce,
)
from workers.top import parse

pytestmark = pytest.mark.integration

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
POISON_TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def referenced_metrics() -> set[str]:
    files = [
        ROOT / "ops" / "prometheus" / "alerts.yml",
        ROOT / "ops" / "grafana" / "dashboard.json",
    ]
    return {
        name for path in files for name in re.findall(r"lora_workers_[a-z_]+", path.read_text())
    }


def test_health_readiness_metrics_top_and_trace_context(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    deployment = deploy(kafka_bootstrap, tmp_path)
    jobs = mixed_jobs(30, seed=12, prefix="obs")
    records = [job_record(deployment.pipelines[j["task"]].input_topic, j) for j in jobs]
    traced_job = {"job_id": "traced", "task": "classify", "input": "my invoice is wrong"}
    topic = deployment.pipelines["classify"].input_topic
    records.append(
        (topic, b"traced", json.dumps(traced_job).encode(), [("traceparent", TRACE.encode())])
    )
    records.append(
        (topic, b"traced-poison", b"{not json", [("traceparent", POISON_TRACE.encode())])
    )
    produce(kafka_bootstrap, records)
    results = TopicWatcher(kafka_bootstrap, [p.result_topic for p in deployment.pipelines.values()])

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "worker.log"
    worker = deployment.start_worker(
        "--metrics-port", str(port), "--idle-exit", "25", log_path=log_path
    )
    try:
        # Alive at once, ready only once the engine, adapters and assignment are up.
        deadline = time.monotonic() + 60
        while get(f"{base}/healthz")[0] != 200:
            assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        status, reason = get(f"{base}/readyz")
        assert status == 503 and "engine" in reason, (status, reason)
        deadline = time.monotonic() + 300
        while get(f"{base}/readyz")[0] != 200:
            assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        log = log_path.read_text()
        assert '"event": "adapter_updates_caught_up"' in log
        assert '"event": "partitions_assigned"' in log

        results.wait_for(lambda messages: len(messages) >= len(jobs) + 1, timeout_s=300)
        time.sleep(3)  # one more lag report after the last commit
        status, exposition = get(f"{base}/metrics")
        assert status == 200
        scraped = parse(exposition, time.monotonic())
        names = {name for name, _ in scraped.samples}
        assert sorted(referenced_metrics() - names) == []
        ok = {
            (labels["adapter"], labels["version"])
            for labels, value in scraped.matching("lora_workers_results_total")
            if labels["status"] == "ok" and value > 0
        }
        assert {("classifier", "1"), ("summarizer", "1"), ("base", "")} <= ok
        assert all(v == 0 for _, v in scraped.matching("lora_workers_consumer_lag"))
        assert scraped.samples[("lora_workers_ready", frozenset())] == 1.0

        top = subprocess.run(
            [sys.executable, "-m", "workers", "top", "--once", "--url", f"{base}/metrics"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert top.returncode == 0, top.stderr
        assert "classifier@1" in top.stdout and "ready: yes" in top.stdout
    finally:
        assert worker.wait(timeout=300) == 0, log_path.read_text()[-3000:]
        results.close()

    traced = [m for m in results.messages if m.key() == b"traced"]
    assert len(traced) == 1 and dict(traced[0].headers())["traceparent"] == TRACE.encode()
    (dead,) = deployment.read([deployment.pipelines["classify"].dlq_topic])
    assert dict(dead.headers())["traceparent"] == POISON_TRACE.encode()
    dead_letter_lines = [
        json.loads(line)
        for line in log_path.read_text().splitlines()
        if '"event": "dead_letter"' in line
    ]
    assert [line.get("traceparent") for line in dead_letter_lines] == [POISON_TRACE]
