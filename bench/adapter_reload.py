"""Benchmark: update-to-first-served latency of a hot reload, on real Kafka and a real worker.

    .venv/bin/python bench/adapter_reload.py [--updates 10]

Starts ops/kafka-local and one `lora-workers run`, keeps a steady trickle of jobs for one
adapter flowing, announces a new version of it again and again, and measures, per update, the
time from the announcement being acknowledged by the broker to (a) the worker's `serving`
status and (b) the first result produced by the new version. Prints p50/p95.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

from common import ROOT, percentile
from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition

from tests.broker import kafka_broker
from tests.integration.harness import deploy
from workers.adapters.admin import publish_version
from workers.core.config import Settings
from workers.logs import configure_logging

ADAPTER = "customer-tone"
TENANT = "acme"  # routes reply jobs to customer-tone


def tail_consumer(bootstrap: str, topic: str) -> Consumer:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4()}"})
    partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in partitions])
    return consumer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=10)
    args = parser.parse_args()
    configure_logging("WARNING")

    scratch = Path(tempfile.mkdtemp(prefix="bench-reload-"))
    kafka_state = scratch / "kafka"
    broker = ExitStack()  # the tests' broker: $KAFKA_BOOTSTRAP_SERVERS, a container or kafka-local
    bootstrap, _ = broker.enter_context(kafka_broker(kafka_state))
    # Topics (the compacted updates topic too) and group of this run's own: a long-lived
    # broker's earlier runs are not replayed.
    (scratch / "deployment").mkdir()
    deployment = deploy(bootstrap, scratch / "deployment")
    env = deployment.env()
    os.environ.update(env)
    reply = deployment.pipelines["reply"]
    worker = None
    clients: list[Consumer] = []
    try:
        cli = [sys.executable, "-m", "workers"]
        settings = Settings()
        status = tail_consumer(bootstrap, settings.adapters.status_topic)
        results = tail_consumer(bootstrap, reply.result_topic)
        clients += [status, results]
        log = (scratch / "worker.log").open("w")
        worker = subprocess.Popen([*cli, "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})

        def send_job() -> None:
            job = {
                "job_id": str(uuid.uuid4()),
                "task": "reply",
                "tenant": TENANT,
                "input": "Hi, this is Ana. I have a question about my invoice.",
            }
            producer.produce(reply.input_topic, key=job["job_id"].encode(), value=json.dumps(job))
            producer.poll(0)

        # Wait until the worker serves: its first result for the adapter.
        deadline = time.monotonic() + 180
        served = False
        while not served:
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not serve within 180 s")
            send_job()
            for message in results.consume(100, timeout=0.2):
                served = served or message.error() is None
        to_status, to_first_result = [], []
        for i in range(args.updates):
            version = f"bench-{i}"
            weights = ["partner-tone", "customer-tone"][i % 2]
            path = deployment.adapter_root / version
            shutil.copytree(ROOT / "models" / "adapters" / weights, path)
            publish_version(
                settings,
                name=ADAPTER,
                version=version,
                path=path,
                base_model="tiny-llama",
                weight=1.0,
                tenants=None,
                hot=False,
                max_lora_rank=settings.engine.max_lora_rank,
            )
            started = time.time()  # the broker has acknowledged the update
            status_at = first_at = None
            deadline = time.monotonic() + 60
            while first_at is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"version {version} never served")
                send_job()
                for message in status.consume(100, timeout=0.01):
                    update = json.loads(message.value())
                    if update["version"] == version and update["state"] == "serving":
                        status_at = update["at_ms"] / 1000
                for message in results.consume(100, timeout=0.02):
                    result = json.loads(message.value())
                    if (result["adapter"] or {}).get("version") == version:
                        first_at = result["timings"]["completed_at_ms"] / 1000
            if status_at is not None:
                to_status.append((status_at - started) * 1000)
            to_first_result.append((first_at - started) * 1000)
        producer.flush(10)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=120)
        for client in clients:
            client.close()
        broker.close()
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n{args.updates} hot reloads of {ADAPTER!r} under a steady trickle of jobs\n")
    print("| from broker-acked update to | p50 ms | p95 ms |")
    print("| --- | ---: | ---: |")
    for label, values in (
        ("worker's `serving` status", to_status),
        ("first result by the new version", to_first_result),
    ):
        print(f"| {label} | {statistics.median(values):.0f} | {percentile(values, 0.95):.0f} |")


if __name__ == "__main__":
    main()
