"""Benchmark: pipeline efficiency and end-to-end latency, Kafka → worker → result topic.

    .venv/bin/python bench/pipeline.py [--jobs 2048] [--repeats 2] [--latency-seconds 20]

1. Throughput: starts a raw engine and one `lora-workers run` on the tests' broker, warms the
   worker up with a few jobs (engine start-up excluded), publishes the jobs and times the worker
   from the first job it received to the last result it completed. Right after, the very same
   prompts, adapters, token budgets and output schemas go through the idle raw engine in one
   `generate` call. Repeated, medians and their ratio. With a baseline worker (`baseline`, e.g.
   the old per-batch worker of an earlier commit, compare.py --baseline-ref), it runs beside the
   first on its own topics and group, its runs alternating with the first worker's.
2. Latency: with the same worker(s) still running, publishes jobs at a steady rate of 50% and
   90% of the capacity just measured and times each job from its publish to its result reaching
   a `read_committed` consumer of the result topics (p50/p95/p99).
bench/compare.py runs `measure_pipeline` for its pipeline and latency sections.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import PROMPT, ROOT, TASK_OF, ZOO, percentile, worker_settings, zoo_inputs, zoo_jobs
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from tests.broker import kafka_broker
from tests.integration.harness import deploy, job_record, produce
from workers.core.config import Settings, load_pipelines
from workers.core.engine_api import AdapterHandle, GenerationRequest
from workers.engine.model import engine_values
from workers.engine.vllm_engine import VllmEngine
from workers.logs import configure_logging

WAIT_S = 600  # for any one phase's results; the whole benchmark must fit in 20 minutes


BASE = "base"  # a pseudo-source: a reply job with no tenant, which the base model serves
BASE_EVERY = 5  # one job in five: four adapters + base, in equal shares


def pipeline_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    """(source, input) pairs over the four adapters and the base model, in turn."""
    return [
        (BASE if i % BASE_EVERY == BASE_EVERY - 1 else source, text)
        for i, (source, text) in enumerate(zoo_inputs(count, seed))
    ]


def pipeline_jobs(pairs: list[tuple[str, str]], tokens: int, prefix: str) -> list[dict]:
    """Worker jobs for `pipeline_pairs`: the adapter named explicitly, or none (reply task, no
    tenant: the base model)."""
    jobs = zoo_jobs([(s if s != BASE else "customer-tone", t) for s, t in pairs], tokens, prefix)
    for job, (source, _) in zip(jobs, pairs, strict=True):
        if source == BASE:
            job["task"] = "reply"
            del job["adapter"]
    return jobs


@dataclass
class PipelineFigures:
    jobs: int
    broker: str
    # (seconds, output tokens) per run; pipeline and raw runs alternate
    pipeline_runs: list[tuple[float, int]] = field(default_factory=list)
    raw_runs: list[tuple[float, int]] = field(default_factory=list)
    # offered load (fraction of capacity) → (offered jobs/s, publish→result latencies in ms)
    latency: dict[float, tuple[float, list[float]]] = field(default_factory=dict)
    # offered load → where the median job's time went (`latency_stages`), in ms
    stages: dict[float, dict[str, float]] = field(default_factory=dict)
    dead_letters: int = 0
    alongside: Any = None  # what the `alongside` callable returned
    baseline: PipelineFigures | None = None  # the baseline worker's, measured alongside

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


@dataclass(frozen=True)
class WorkerVariant:
    """How to start one worker: extra environment and working directory (e.g. an older commit's
    package, through PYTHONPATH and a cwd that does not hold this checkout's `workers`)."""

    label: str
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None


WARM_UP_JOBS = 16


class RunningWorker:
    """One `python -m workers run` on its own deployment (topics, group) of the broker, with a
    collector of its result and dead-letter topics; started warm (its first jobs answered)."""

    def __init__(
        self, bootstrap: str, scratch: Path, model: Path, adapters_dir: Path, variant: WorkerVariant
    ) -> None:
        self.variant = variant
        self.bootstrap = bootstrap
        home = scratch / f"worker-{uuid.uuid4().hex[:6]}"
        (home / "deployment").mkdir(parents=True)
        self.deployment = deploy(bootstrap, home / "deployment")
        env = self.deployment.env(**worker_settings(model, adapters_dir, home), **variant.env)
        self.topic_of = {task: p.input_topic for task, p in self.deployment.pipelines.items()}
        outputs = [p.result_topic for p in self.deployment.pipelines.values()]
        self.collector = ResultCollector(bootstrap, outputs + self.deployment.dlq_topics)
        self.collector.start()
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workers", "run", "--idle-exit", "900"],
            stdout=self._log,
            stderr=self._log,
            env=env,
            cwd=variant.cwd,
        )

    def publish(self, jobs: list[dict]) -> None:
        produce(self.bootstrap, [job_record(self.topic_of[j["task"]], j) for j in jobs])

    def warm_up(self, pairs: list[tuple[str, str]], tokens: int) -> None:
        """Until the worker answered a few jobs: engine started, adapters loaded, group joined."""
        jobs = pipeline_jobs(pairs[:WARM_UP_JOBS], tokens, f"w{uuid.uuid4().hex[:6]}-")
        self.publish(jobs)
        self.collector.wait_for([j["job_id"] for j in jobs], self.process)

    def log_tail(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        try:
            self.process.terminate()  # a graceful stop: it finishes and commits what it holds
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        finally:
            self.collector.close()
            self._log.close()


# main before the latency issue (2026-12-05): fixed engine depth, arrival order in the engine.
# (The per-batch worker of 8881d9c no longer starts with today's settings environment.)
BASELINE_REF = "12ee1fe"


@contextlib.contextmanager
def baseline_checkout(ref: str) -> Iterator[WorkerVariant | None]:
    """A temporary `git worktree` of `ref`, as a worker variant that runs that commit's
    `workers` package (PYTHONPATH, and a cwd outside this checkout so `-m` cannot pick ours);
    the worktree is removed afterwards. `ref` "none": no baseline (None)."""
    if ref == "none":
        yield None
        return
    tree = Path(tempfile.mkdtemp(prefix="bench-baseline-")) / "tree"
    git = ["git", "-C", str(ROOT)]
    subprocess.run([*git, "worktree", "add", "--detach", str(tree), ref], check=True)
    try:
        yield WorkerVariant(f"{ref} worker", {"PYTHONPATH": str(tree)}, cwd=tree)
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(tree.parent, ignore_errors=True)


def measure_pipeline(
    model: Path,
    adapters_dir: Path,
    jobs_count: int,
    tokens: int,
    loads: tuple[float, ...] = (0.5, 0.9),
    latency_s: float = 20.0,
    repeats: int = 2,
    alongside: Callable[[], Any] | None = None,
    baseline: WorkerVariant | None = None,
    worker: WorkerVariant = WorkerVariant("worker"),
) -> PipelineFigures:
    """`alongside` (e.g. another approach on the same jobs) runs once, between the first
    pipeline and raw runs, so that it too is measured side by side with them. `baseline`: a
    second worker (e.g. an older commit) measured the same way, its runs alternating with the
    first worker's and the raw ones; its figures are in the result's `baseline`."""
    pairs = pipeline_pairs(jobs_count, seed=4)
    scratch = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    # The raw engine starts first and idles while the workers run, so every raw call comes
    # seconds after its pipeline runs: side by side even when the machine's load changes.
    settings = Settings().engine.model_copy(update={"model": str(model)})
    engine = VllmEngine(engine_values(settings, {}))  # zoo adapters: rank 8, the default
    running: list[RunningWorker] = []
    try:
        raw = _raw_requests(engine, adapters_dir, pairs, tokens)
        # The tests' broker: $KAFKA_BOOTSTRAP_SERVERS, a container, or ops/kafka-local. Topics
        # and groups are this run's own, so a long-lived broker's earlier runs do not count.
        with kafka_broker(scratch / "kafka") as (bootstrap, broker):
            variants = [worker] if baseline is None else [worker, baseline]
            figures = [PipelineFigures(jobs=jobs_count, broker=broker) for _ in variants]
            try:
                # Both engines start (and warm up) before anything is timed; afterwards each
                # worker idles while the other one, or the raw engine, runs.
                for variant in variants:
                    running.append(RunningWorker(bootstrap, scratch, model, adapters_dir, variant))
                for one in running:
                    one.warm_up(pairs, tokens)
                for run in range(repeats):
                    for n, (one, figure) in enumerate(zip(running, figures, strict=True)):
                        jobs = pipeline_jobs(pairs, tokens, prefix=f"p{run}-{n}-")
                        one.publish(jobs)
                        figure.pipeline_runs.append(_pipeline_run(one.collector, one.process, jobs))
                        if run == 0 and n == 0 and alongside is not None:
                            figures[0].alongside = alongside()
                    raw_run = _raw_run(engine, raw)
                    for figure in figures:
                        figure.raw_runs.append(raw_run)
                for one, figure in zip(running, figures, strict=True):
                    for n, load in enumerate(loads):
                        rate = load * figure.capacity
                        steady = pipeline_jobs(
                            pipeline_pairs(max(1, round(rate * latency_s)), seed=10 + n),
                            tokens,
                            prefix=f"l{n}-",
                        )
                        published = publish_steadily(bootstrap, steady, rate, one.topic_of)
                        one.collector.wait_for(list(published), one.process)
                        figure.latency[load] = (rate, latencies(one.collector, published))
                        figure.stages[load] = latency_stages(one.collector, published)
                    figure.dead_letters = len(one.collector.dead)
            except BaseException:
                for one in running:
                    sys.stderr.write(f"--- {one.variant.label} log ---\n{one.log_tail()}\n")
                raise
            finally:
                for one in running:
                    one.stop()
    finally:
        engine.close()
        shutil.rmtree(scratch, ignore_errors=True)
    if baseline is not None:
        figures[0].baseline = figures[1]
    return figures[0]


def _pipeline_run(
    collector: ResultCollector, worker: subprocess.Popen, jobs: list[dict]
) -> tuple[float, int]:
    """The worker's span from the first job it received to the last result committed (read by
    the read_committed collector, so commits count), and the output tokens."""
    collector.wait_for([j["job_id"] for j in jobs], worker)
    done = [collector.results[j["job_id"]] for j in jobs if j["job_id"] in collector.results]
    first_received = min(r["timings"]["received_at_ms"] for _, r in done) / 1000
    span_s = max(at for at, _ in done) - first_received
    return span_s, sum(r["usage"]["completion_tokens"] for _, r in done)


def latencies(collector: ResultCollector, published: dict[str, float]) -> list[float]:
    """Each answered job's publish → read_committed result time, in ms."""
    return [
        (collector.results[j][0] - at) * 1000
        for j, at in published.items()
        if j in collector.results
    ]


def latency_stages(collector: ResultCollector, published: dict[str, float]) -> dict[str, float]:
    """Medians, in ms, of where a job's time went, from its result's timings: published →
    consumed and routed (intake), waiting for admission (queue), in the engine (engine), and
    result built → read by a read_committed consumer (commit: the transaction and the read)."""
    stages: dict[str, list[float]] = {"intake": [], "queue": [], "engine": [], "commit": []}
    for job_id, at in published.items():
        if job_id not in collector.results or "timings" not in collector.results[job_id][1]:
            continue
        read_at, result = collector.results[job_id]
        timings = result["timings"]
        stages["intake"].append(timings["received_at_ms"] - at * 1000)
        stages["queue"].append(timings["queue_ms"])
        stages["engine"].append(timings["generate_ms"])
        stages["commit"].append(read_at * 1000 - timings["completed_at_ms"])
    return {name: statistics.median(ms) for name, ms in stages.items() if ms}


def _raw_requests(
    engine: VllmEngine, adapters_dir: Path, pairs: list[tuple[str, str]], tokens: int
) -> list[GenerationRequest]:
    """The same jobs as the worker builds them: prompt, adapter, budget and output schema."""
    pipelines = load_pipelines(Settings().pipelines_dir)
    handles = {
        source: AdapterHandle(source, "1", str(adapters_dir / source), i + 1)
        for i, source in enumerate(TASK_OF)
    }
    for handle in handles.values():
        engine.register_adapter(handle)
    task_of = {**TASK_OF, BASE: "reply"}
    requests = [
        GenerationRequest(
            engine.tokenize(PROMPT.format(task=task_of[source], text=text)),
            handles.get(source),  # None for the base model
            tokens,
            0.0,
            None,
            json_schema=pipelines[task_of[source]].output_schema,
        )
        for source, text in pairs
    ]
    engine.generate(requests[:16])  # warm-up, like the worker's first batch
    return requests


def _raw_run(engine: VllmEngine, requests: list[GenerationRequest]) -> tuple[float, int]:
    started = time.perf_counter()
    tokens = sum(g.completion_tokens for g in engine.generate(requests))
    return time.perf_counter() - started, tokens


def stage_line(stages: dict[str, float]) -> str:
    return ", ".join(f"{name} {ms:,.0f} ms" for name, ms in stages.items())


def print_figures(f: PipelineFigures, tokens: int, label: str) -> None:
    print(f"\n{label}: {f.jobs} jobs over 4 adapters, {tokens} max tokens ({f.broker})\n")
    print("| path | seconds | jobs/s | output tok/s |")
    print("| --- | ---: | ---: | ---: |")
    for path, runs in (
        ("Kafka → worker → result topic", f.pipeline_runs),
        ("raw `generate`, one call", f.raw_runs),
    ):
        seconds = statistics.median(s for s, _ in runs)
        print(f"| {path} | {seconds:.2f} | {f.jobs_s(runs):,.1f} | {f.tok_s(runs):,.0f} |")
    print(f"\npipeline / raw: {f.jobs_ratio:.2f}x jobs/s, {f.tok_ratio:.2f}x output tok/s\n")
    for load, (rate, ms) in f.latency.items():
        cells = [f"{percentile(ms, q):.0f}" for q in (0.5, 0.95, 0.99)]
        print(f"- {load:.0%} load ({rate:.0f} jobs/s): p50/p95/p99 {' / '.join(cells)} ms")
        print(f"  medians: {stage_line(f.stages.get(load, {}))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", type=Path, default=ZOO / "tiny-llama")
    parser.add_argument("--adapters", type=Path, default=ZOO / "adapters")
    parser.add_argument(
        "--baseline-ref",
        default="none",
        help=f"also measure this commit's worker alongside (e.g. {BASELINE_REF}); none: skip",
    )
    args = parser.parse_args()
    configure_logging("WARNING")
    with baseline_checkout(args.baseline_ref) as baseline:
        f = measure_pipeline(
            args.model,
            args.adapters,
            args.jobs,
            args.tokens,
            (0.5, 0.9),
            args.latency_seconds,
            args.repeats,
            baseline=baseline,
        )
    print_figures(f, args.tokens, "this checkout's worker")
    if f.baseline is not None:
        print_figures(f.baseline, args.tokens, f"{args.baseline_ref} worker")
        ratio = f.capacity / f.baseline.capacity
        print(f"\nthis worker / {args.baseline_ref} worker: {ratio:.2f}x jobs/s")


if __name__ == "__main__":
    main()
