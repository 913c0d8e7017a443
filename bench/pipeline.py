"""Benchmark: pipeline efficiency and end-to-end latency, Kafka → worker → result topic.

    .venv/bin/python bench/pipeline.py [--jobs 2048] [--latency-seconds 20]

1. Throughput: publishes the jobs first, then starts one `lora-workers run` on the tests' broker
   and times the worker from the first job it received to the last result it completed (engine
   start-up excluded). After the worker is gone, the very same prompts, adapters, token budgets
   and output schemas go through the engine in one raw `generate` call. Ratio of the two.
2. Latency: with the same worker still running, publishes jobs at a steady rate of 50% and 90%
   of the capacity just measured and times each job from its publish to its result reaching a
   `read_committed` consumer of the result topics (p50/p95/p99).
bench/compare.py runs `measure_pipeline` for its pipeline and latency sections.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from common import PROMPT, TASK_OF, ZOO, percentile, worker_env, zoo_inputs, zoo_jobs
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from tests.broker import kafka_broker
from tests.integration.harness import job_record, produce
from workers.config import Settings, load_pipelines
from workers.engine import AdapterHandle, GenerationRequest, VllmEngine
from workers.logs import configure_logging

TASKS = sorted(set(TASK_OF.values()))
WAIT_S = 600  # for any one phase's results; the whole benchmark must fit in 20 minutes


@dataclass
class PipelineFigures:
    jobs: int
    pipeline_s: float
    pipeline_tokens: int
    raw_s: float
    raw_tokens: int
    broker: str
    # offered load (fraction of capacity) → (offered jobs/s, publish→result latencies in ms)
    latency: dict[float, tuple[float, list[float]]] = field(default_factory=dict)
    dead_letters: int = 0

    @property
    def capacity(self) -> float:
        return self.jobs / self.pipeline_s

    @property
    def tok_ratio(self) -> float:
        return (self.pipeline_tokens / self.pipeline_s) / (self.raw_tokens / self.raw_s)

    @property
    def jobs_ratio(self) -> float:
        return self.raw_s / self.pipeline_s


class ResultCollector(threading.Thread):
    """Every message of the result and dead-letter topics, by job id (the key), with the time it
    reached this process. read_committed: a result counts once a reader could act on it."""

    def __init__(self, bootstrap: str) -> None:
        super().__init__(daemon=True)
        self.results: dict[str, tuple[float, dict]] = {}
        self.dead: set[str] = set()
        self._closing = threading.Event()
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            },
            logger=None,
        )
        topics = [f"results.{t}" for t in TASKS] + [f"jobs.{t}.dlq" for t in TASKS]
        metadata = self._consumer.list_topics(timeout=30)
        self._consumer.assign(
            [
                TopicPartition(topic, partition, OFFSET_BEGINNING)
                for topic in topics
                for partition in metadata.topics[topic].partitions
            ]
        )

    def run(self) -> None:
        while not self._closing.is_set():
            message = self._consumer.poll(0.05)  # one at a time: consume() would batch arrivals
            if message is None or message.error() is not None:
                continue
            at = time.time()
            job_id = message.key().decode()
            if message.topic().endswith(".dlq"):
                self.dead.add(job_id)
            else:
                self.results[job_id] = (at, json.loads(message.value()))

    def wait_for(self, job_ids: list[str], worker: subprocess.Popen) -> None:
        deadline = time.monotonic() + WAIT_S
        while any(j not in self.results and j not in self.dead for j in job_ids):
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with {worker.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"results missing after {WAIT_S} s")
            time.sleep(0.2)

    def close(self) -> None:
        self._closing.set()
        self.join()
        self._consumer.close()


def publish_steadily(bootstrap: str, jobs: list[dict], rate: float) -> dict[str, float]:
    """Publish at `rate` jobs/s on a fixed schedule (no catching up in bursts beyond it);
    returns each job's publish time (also its Kafka timestamp)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "acks": "all"})
    published: dict[str, float] = {}
    started = time.perf_counter()
    for i, job in enumerate(jobs):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        at = time.time()
        topic, key, value, _ = job_record(f"jobs.{job['task']}", job)
        producer.produce(topic, key=key, value=value, timestamp=int(at * 1000))
        producer.poll(0)
        published[job["job_id"]] = at
    producer.flush(60)
    return published


def measure_pipeline(
    model: Path,
    adapters_dir: Path,
    jobs_count: int,
    tokens: int,
    loads: tuple[float, ...] = (0.5, 0.9),
    latency_s: float = 20.0,
) -> PipelineFigures:
    pairs = zoo_inputs(jobs_count, seed=4)
    jobs = zoo_jobs(pairs, tokens, prefix="p")
    scratch = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        env = worker_env(model, adapters_dir, scratch)
        # The tests' broker: $KAFKA_BOOTSTRAP_SERVERS, a container, or ops/kafka-local.
        with kafka_broker(scratch / "kafka") as (bootstrap, broker):
            env["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
            figures = _through_kafka(bootstrap, broker, env, jobs, tokens, loads, latency_s)
        engine = VllmEngine(Settings().engine.model_copy(update={"model": model}))
        try:
            figures.raw_s, figures.raw_tokens = _raw_generate(engine, adapters_dir, pairs, tokens)
        finally:
            engine.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return figures


def _through_kafka(
    bootstrap: str,
    broker: str,
    env: dict[str, str],
    jobs: list[dict],
    tokens: int,
    loads: tuple[float, ...],
    latency_s: float,
) -> PipelineFigures:
    cli = [sys.executable, "-m", "workers"]
    subprocess.run([*cli, "topics", "create"], env=env, check=True, capture_output=True)
    collector = ResultCollector(bootstrap)
    collector.start()
    produce(bootstrap, [job_record(f"jobs.{j['task']}", j) for j in jobs])
    with tempfile.TemporaryFile() as log:
        worker = subprocess.Popen(
            [*cli, "run", "--idle-exit", "600"], stdout=log, stderr=log, env=env
        )
        try:
            return _measure(bootstrap, collector, worker, jobs, tokens, loads, latency_s, broker)
        except BaseException:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            worker.terminate()  # a graceful stop: it finishes and commits what it holds
            worker.wait(timeout=120)
            collector.close()


def _measure(
    bootstrap: str,
    collector: ResultCollector,
    worker: subprocess.Popen,
    jobs: list[dict],
    tokens: int,
    loads: tuple[float, ...],
    latency_s: float,
    broker: str,
) -> PipelineFigures:
    collector.wait_for([j["job_id"] for j in jobs], worker)
    done = [collector.results[j["job_id"]][1] for j in jobs if j["job_id"] in collector.results]
    span_s = (
        max(r["timings"]["completed_at_ms"] for r in done)
        - min(r["timings"]["received_at_ms"] for r in done)
    ) / 1000
    figures = PipelineFigures(
        jobs=len(done),
        pipeline_s=span_s,
        pipeline_tokens=sum(r["usage"]["completion_tokens"] for r in done),
        raw_s=0.0,
        raw_tokens=0,
        broker=broker,
    )
    for n, load in enumerate(loads):
        rate = load * figures.capacity
        count = max(1, round(rate * latency_s))
        steady = zoo_jobs(zoo_inputs(count, seed=10 + n), tokens, prefix=f"l{n}-")
        published = publish_steadily(bootstrap, steady, rate)
        collector.wait_for(list(published), worker)
        latencies = [
            (collector.results[j][0] - at) * 1000
            for j, at in published.items()
            if j in collector.results
        ]
        figures.latency[load] = (rate, latencies)
    figures.dead_letters = len(collector.dead)
    return figures


def _raw_generate(
    engine: VllmEngine, adapters_dir: Path, pairs: list[tuple[str, str]], tokens: int
) -> tuple[float, int]:
    """The same jobs as one `generate` call on the worker's own engine settings."""
    pipelines = load_pipelines(Settings().pipelines_dir, Settings().schemas_dir)
    handles = {
        source: AdapterHandle(source, "1", str(adapters_dir / source), i + 1)
        for i, source in enumerate(TASK_OF)
    }
    for handle in handles.values():
        engine.register_adapter(handle)
    requests = [
        GenerationRequest(
            engine.tokenize(PROMPT.format(task=TASK_OF[source], text=text)),
            handles[source],
            tokens,
            0.0,
            None,
            json_schema=pipelines[TASK_OF[source]].output_schema,
        )
        for source, text in pairs
    ]
    engine.generate(requests[:16])  # warm-up, like the worker's first batch
    started = time.perf_counter()
    raw_tokens = sum(g.completion_tokens for g in engine.generate(requests))
    return time.perf_counter() - started, raw_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--model", type=Path, default=ZOO / "tiny-llama")
    parser.add_argument("--adapters", type=Path, default=ZOO / "adapters")
    args = parser.parse_args()
    configure_logging("WARNING")
    f = measure_pipeline(
        args.model, args.adapters, args.jobs, args.tokens, (0.5, 0.9), args.latency_seconds
    )
    print(f"\n{f.jobs} jobs over 4 adapters, {args.tokens} max tokens, same prompts ({f.broker})\n")
    print("| path | seconds | jobs/s | output tok/s |")
    print("| --- | ---: | ---: | ---: |")
    for label, seconds, tokens in (
        ("Kafka → worker → result topic", f.pipeline_s, f.pipeline_tokens),
        ("raw `generate`, one call", f.raw_s, f.raw_tokens),
    ):
        print(f"| {label} | {seconds:.2f} | {f.jobs / seconds:,.1f} | {tokens / seconds:,.0f} |")
    print(f"\npipeline / raw: {f.jobs_ratio:.2f}x jobs/s, {f.tok_ratio:.2f}x output tok/s\n")
    for load, (rate, ms) in f.latency.items():
        cells = [f"{percentile(ms, q):.0f}" for q in (0.5, 0.95, 0.99)]
        print(f"- {load:.0%} load ({rate:.0f} jobs/s): p50/p95/p99 {' / '.join(cells)} ms")


if __name__ == "__main__":
    main()
