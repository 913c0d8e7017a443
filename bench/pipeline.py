"""Benchmark: pipeline efficiency and end-to-end latency, Kafka → worker → result topic.

    .venv/bin/python bench/pipeline.py [--jobs 2048] [--repeats 2] [--latency-seconds 20]

1. Throughput: starts a raw engine, publishes the jobs, then starts one `lora-workers run` on
   the tests' broker and times the worker from the first job it received to the last result it
   completed (engine start-up excluded). Right after, the very same prompts, adapters, token
   budgets and output schemas go through the idle raw engine in one `generate` call. Repeated
   (later loads are published to the running worker), medians and their ratio.
2. Latency: with the same worker still running, publishes jobs at a steady rate of 50% and 90%
   of the capacity just measured and times each job from its publish to its result reaching a
   `read_committed` consumer of the result topics (p50/p95/p99).
bench/compare.py runs `measure_pipeline` for its pipeline and latency sections.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import PROMPT, TASK_OF, ZOO, percentile, worker_settings, zoo_inputs, zoo_jobs
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from tests.broker import kafka_broker
from tests.integration.harness import deploy, job_record, produce
from workers.core.config import Settings, load_pipelines
from workers.core.engine_api import AdapterHandle, GenerationRequest
from workers.engine.vllm_engine import VllmEngine
from workers.logs import configure_logging

WAIT_S = 600  # for any one phase's results; the whole benchmark must fit in 20 minutes


@dataclass
class PipelineFigures:
    jobs: int
    broker: str
    # (seconds, output tokens) per run; pipeline and raw runs alternate
    pipeline_runs: list[tuple[float, int]] = field(default_factory=list)
    raw_runs: list[tuple[float, int]] = field(default_factory=list)
    # offered load (fraction of capacity) → (offered jobs/s, publish→result latencies in ms)
    latency: dict[float, tuple[float, list[float]]] = field(default_factory=dict)
    dead_letters: int = 0
    alongside: Any = None  # what the `alongside` callable returned

    def tok_s(self, runs: list[tuple[float, int]]) -> float:
        return statistics.median(tokens / seconds for seconds, tokens in runs)

    def jobs_s(self, runs: list[tuple[float, int]]) -> float:
        return statistics.median(self.jobs / seconds for seconds, _ in runs)

    @property
    def capacity(self) -> float:
        return self.jobs_s(self.pipeline_runs)

    @property
    def tok_ratio(self) -> float:
        return self.tok_s(self.pipeline_runs) / self.tok_s(self.raw_runs)

    @property
    def jobs_ratio(self) -> float:
        return self.capacity / self.jobs_s(self.raw_runs)


class ResultCollector(threading.Thread):
    """Every message of the result and dead-letter topics, by job id (the key), with the time it
    reached this process. read_committed: a result counts once a reader could act on it."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
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


def publish_steadily(
    bootstrap: str, jobs: list[dict], rate: float, topic_of: dict[str, str]
) -> dict[str, float]:
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
        topic, key, value, _ = job_record(topic_of[job["task"]], job)
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
    repeats: int = 2,
    alongside: Callable[[], Any] | None = None,
) -> PipelineFigures:
    """`alongside` (e.g. another approach on the same jobs) runs once, between the first
    pipeline and raw runs, so that it too is measured side by side with them."""
    pairs = zoo_inputs(jobs_count, seed=4)
    scratch = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    # The raw engine starts first and idles while the worker runs, so every raw call comes
    # seconds after its pipeline run: side by side even when the machine's load changes.
    engine = VllmEngine(Settings().engine.model_copy(update={"model": model}))
    try:
        raw = _raw_requests(engine, adapters_dir, pairs, tokens)
        # The tests' broker: $KAFKA_BOOTSTRAP_SERVERS, a container, or ops/kafka-local. Topics
        # and group are this run's own, so a long-lived broker's earlier runs do not count.
        with kafka_broker(scratch / "kafka") as (bootstrap, broker):
            (scratch / "deployment").mkdir()
            deployment = deploy(bootstrap, scratch / "deployment")
            env = deployment.env(**worker_settings(model, adapters_dir, scratch))
            topic_of = {task: p.input_topic for task, p in deployment.pipelines.items()}

            def records(jobs: list[dict]) -> list:
                return [job_record(topic_of[j["task"]], j) for j in jobs]

            outputs = [p.result_topic for p in deployment.pipelines.values()]
            collector = ResultCollector(bootstrap, outputs + deployment.dlq_topics)
            collector.start()
            cli = [sys.executable, "-m", "workers"]
            figures = PipelineFigures(jobs=jobs_count, broker=broker)
            # The first load waits in Kafka before the worker starts (start-up not timed).
            first = zoo_jobs(pairs, tokens, prefix="p0-")
            produce(bootstrap, records(first))
            with tempfile.TemporaryFile() as log:
                worker = subprocess.Popen(
                    [*cli, "run", "--idle-exit", "600"], stdout=log, stderr=log, env=env
                )
                try:
                    for run in range(repeats):
                        jobs = first if run == 0 else zoo_jobs(pairs, tokens, prefix=f"p{run}-")
                        if run > 0:
                            produce(bootstrap, records(jobs))
                        figures.pipeline_runs.append(_pipeline_run(collector, worker, jobs))
                        if run == 0 and alongside is not None:
                            figures.alongside = alongside()
                        figures.raw_runs.append(_raw_run(engine, raw))
                    for n, load in enumerate(loads):
                        rate = load * figures.capacity
                        steady = zoo_jobs(
                            zoo_inputs(max(1, round(rate * latency_s)), seed=10 + n),
                            tokens,
                            prefix=f"l{n}-",
                        )
                        figures.latency[load] = (
                            rate,
                            _latencies(bootstrap, collector, worker, steady, rate, topic_of),
                        )
                    figures.dead_letters = len(collector.dead)
                except BaseException:
                    log.seek(0)
                    sys.stderr.write(log.read().decode(errors="replace")[-4000:])
                    raise
                finally:
                    worker.terminate()  # a graceful stop: it finishes and commits what it holds
                    worker.wait(timeout=120)
                    collector.close()
    finally:
        engine.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return figures


def _pipeline_run(
    collector: ResultCollector, worker: subprocess.Popen, jobs: list[dict]
) -> tuple[float, int]:
    """The worker's span from its first received job to its last completed result."""
    collector.wait_for([j["job_id"] for j in jobs], worker)
    done = [collector.results[j["job_id"]][1] for j in jobs if j["job_id"] in collector.results]
    span_s = (
        max(r["timings"]["completed_at_ms"] for r in done)
        - min(r["timings"]["received_at_ms"] for r in done)
    ) / 1000
    return span_s, sum(r["usage"]["completion_tokens"] for r in done)


def _latencies(
    bootstrap: str,
    collector: ResultCollector,
    worker: subprocess.Popen,
    jobs: list[dict],
    rate: float,
    topic_of: dict[str, str],
) -> list[float]:
    published = publish_steadily(bootstrap, jobs, rate, topic_of)
    collector.wait_for(list(published), worker)
    return [
        (collector.results[j][0] - at) * 1000
        for j, at in published.items()
        if j in collector.results
    ]


def _raw_requests(
    engine: VllmEngine, adapters_dir: Path, pairs: list[tuple[str, str]], tokens: int
) -> list[GenerationRequest]:
    """The same jobs as the worker builds them: prompt, adapter, budget and output schema."""
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
    return requests


def _raw_run(engine: VllmEngine, requests: list[GenerationRequest]) -> tuple[float, int]:
    started = time.perf_counter()
    tokens = sum(g.completion_tokens for g in engine.generate(requests))
    return time.perf_counter() - started, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", type=Path, default=ZOO / "tiny-llama")
    parser.add_argument("--adapters", type=Path, default=ZOO / "adapters")
    args = parser.parse_args()
    configure_logging("WARNING")
    f = measure_pipeline(
        args.model,
        args.adapters,
        args.jobs,
        args.tokens,
        (0.5, 0.9),
        args.latency_seconds,
        args.repeats,
    )
    print(f"\n{f.jobs} jobs over 4 adapters, {args.tokens} max tokens, same prompts ({f.broker})\n")
    print("| path | seconds | jobs/s | output tok/s |")
    print("| --- | ---: | ---: | ---: |")
    for label, runs in (
        ("Kafka → worker → result topic", f.pipeline_runs),
        ("raw `generate`, one call", f.raw_runs),
    ):
        seconds = statistics.median(s for s, _ in runs)
        print(f"| {label} | {seconds:.2f} | {f.jobs_s(runs):,.1f} | {f.tok_s(runs):,.0f} |")
    print(f"\npipeline / raw: {f.jobs_ratio:.2f}x jobs/s, {f.tok_ratio:.2f}x output tok/s\n")
    for load, (rate, ms) in f.latency.items():
        cells = [f"{percentile(ms, q):.0f}" for q in (0.5, 0.95, 0.99)]
        print(f"- {load:.0%} load ({rate:.0f} jobs/s): p50/p95/p99 {' / '.join(cells)} ms")


if __name__ == "__main__":
    main()
