"""Shared plumbing for integration tests: isolated topics, a worker process, Kafka I/O."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType

import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition

from workers.core.config import PipelineConfig, load_pipelines
from workers.kafka.topics import read_to_end, watermarks

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Deployment:
    """One test's own topics and consumer group on the shared broker."""

    bootstrap: str
    suffix: str
    pipelines_dir: Path
    pipelines: dict[str, PipelineConfig]
    workers: list[subprocess.Popen] = field(default_factory=list, compare=False, repr=False)

    @property
    def unknown_task_dlq(self) -> str:
        return f"jobs.dlq.{self.suffix}"

    @property
    def group_id(self) -> str:
        return f"lora-workers-{self.suffix}"

    @property
    def dlq_topics(self) -> list[str]:
        return [p.dlq_topic for p in self.pipelines.values()]

    @property
    def updates_topic(self) -> str:
        return f"adapters.updates.{self.suffix}"

    @property
    def status_topic(self) -> str:
        return f"adapters.status.{self.suffix}"

    @property
    def evaluations_topic(self) -> str:
        return f"adapters.evaluations.{self.suffix}"

    @property
    def adapter_root(self) -> Path:
        """A second allowed root, for adapters a test makes."""
        return self.pipelines_dir.parent / "adapters"

    def env(self, **settings: str) -> dict[str, str]:
        return {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "LORA_WORKERS_PIPELINES_DIR": str(self.pipelines_dir),
            "LORA_WORKERS_UNKNOWN_TASK_DLQ": self.unknown_task_dlq,
            "LORA_WORKERS_GROUP_ID": self.group_id,
            "LORA_WORKERS_ADAPTERS__UPDATES_TOPIC": self.updates_topic,
            "LORA_WORKERS_ADAPTERS__STATUS_TOPIC": self.status_topic,
            "LORA_WORKERS_ADAPTERS__EVALUATIONS_TOPIC": self.evaluations_topic,
            "LORA_WORKERS_ADAPTERS__ALLOWED_ROOTS": json.dumps(
                [str(ROOT / "models"), str(self.adapter_root)]
            ),
            # A standby engine's start takes one of this machine's two cores for about 13 s;
            # only tests of engine deaths need one, and ask for it.
            "LORA_WORKERS_ENGINE__STANDBY": "off",
            **settings,
        }

    def start_worker(self, *args: str, log_path: Path, **settings: str) -> subprocess.Popen:
        log = log_path.open("w")
        worker = subprocess.Popen(
            [sys.executable, "-m", "workers", "run", *args],
            env=self.env(**settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill -9 can take the engine too
        )
        self.workers.append(worker)
        return worker

    def kill_workers(self) -> None:
        """Whatever a failed test left running, engine processes included."""
        for worker in self.workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=60)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "workers", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def run_worker(
        self,
        *args: str,
        log_path: Path,
        timeout: float = 900,
        settings: dict[str, str] | None = None,
    ) -> int:
        with log_path.open("w") as log:
            completed = subprocess.run(
                [sys.executable, "-m", "workers", "run", *args],
                env=self.env(**(settings or {})),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        return completed.returncode

    def read(self, topics: list[str]) -> list[Message]:
        return list(read_to_end(self.bootstrap, topics))

    def results(self, tasks: tuple[str, ...] = ("classify", "reply", "summarize")) -> Counter[str]:
        """Committed results per job_id, read with read_committed: aborted answers never count."""
        topics = [self.pipelines[task].result_topic for task in tasks]
        return Counter(json.loads(m.value())["job_id"] for m in self.read(topics))


def assert_committed_to_the_end(deployment: Deployment) -> None:
    """The group's committed offset is the end of every input partition."""
    consumer = Consumer(
        {"bootstrap.servers": deployment.bootstrap, "group.id": deployment.group_id}
    )
    try:
        partitions = [
            TopicPartition(p.input_topic, n)
            for p in deployment.pipelines.values()
            for n in range(3)
        ]
        for committed in consumer.committed(partitions, timeout=30):
            _, high = watermarks(consumer, committed)
            nothing = high == 0 and committed.offset < 0  # an empty partition, never committed
            assert committed.offset == high or nothing, committed
    finally:
        consumer.close()


def deploy(bootstrap: str, tmp_path: Path, pipelines: Path = ROOT / "pipelines") -> Deployment:
    """Copies of the shipped pipelines (or those in `pipelines`) on topics suffixed for this
    test, topics created."""
    suffix = uuid.uuid4().hex[:8]
    pipelines_dir = tmp_path / "pipelines"
    pipelines_dir.mkdir()
    (tmp_path / "adapters").mkdir()
    for source in sorted(pipelines.glob("*.yaml")):
        document = yaml.safe_load(source.read_text())
        task = document["task"]
        document["input_topic"] = f"jobs.{task}.{suffix}"
        document["result_topic"] = f"results.{task}.{suffix}"
        # Paths in a pipeline are relative to its file: the copy points at the originals.
        if "output_schema" in document:
            document["output_schema"] = str(source.parent / document["output_schema"])
        chat = document.get("chat") or {}
        if "template" in chat:
            chat["template"] = str(source.parent / chat["template"])
        (pipelines_dir / source.name).write_text(yaml.safe_dump(document))
    deployment = Deployment(bootstrap, suffix, pipelines_dir, load_pipelines(pipelines_dir))
    created = deployment.cli("topics", "create", "--partitions", "3")
    assert created.returncode == 0, created.stderr
    return deployment


def produce(
    bootstrap: str, records: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]]
) -> None:
    """(topic, key, value, headers) records, all acknowledged before returning."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    failures: list[str] = []

    def delivered(error, _message) -> None:  # type: ignore[no-untyped-def]
        if error is not None:
            failures.append(str(error))

    for topic, key, value, headers in records:
        producer.produce(topic, key=key, value=value, headers=headers, on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(60) == 0
    assert not failures, failures


def mixed_jobs(count: int, seed: int, prefix: str) -> list[dict]:
    """Jobs over the three shipped tasks in turn, inputs from the zoo's own generators."""
    zoo = load_zoo_generators()
    rng = random.Random(seed)
    jobs = []
    for i in range(count):
        task = ["classify", "reply", "summarize"][i % 3]
        text = zoo.make_report(rng) if task == "summarize" else zoo.make_message(rng)[0]
        jobs.append({"job_id": f"{prefix}-{i:04d}", "task": task, "input": text})
    return jobs


def job_records(deployment: Deployment, jobs: list[dict]) -> list:
    return [job_record(deployment.pipelines[j["task"]].input_topic, j) for j in jobs]


def wait_for_event(
    worker: subprocess.Popen,
    log_path: Path,
    event: str,
    count: int = 1,
    timeout_s: float = 300,
    containing: str = "",
) -> None:
    """Until the worker's JSON log holds `count` lines of `event` (that also contain
    `containing`); the worker must stay alive meanwhile."""
    needle = f'"event": "{event}"'

    def seen() -> int:
        lines = log_path.read_text(errors="replace").splitlines()
        return sum(1 for line in lines if needle in line and containing in line)

    deadline = time.monotonic() + timeout_s
    while seen() < count:
        assert worker.poll() is None, log_path.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"no {event} x{count} in {timeout_s}s"
        time.sleep(0.1)


class Trickle:
    """Publishes jobs at a steady rate on a thread, so faults land mid-stream. With `hold_after`
    it stops after that many jobs until `release()`, so a slow step (an engine start) cannot let
    the stream run dry before the fault."""

    def __init__(
        self, bootstrap: str, records: list, per_second: float, hold_after: int | None = None
    ) -> None:
        self._bootstrap = bootstrap
        self._records = records
        self._interval = 1 / per_second
        self._hold_after = hold_after
        self._released = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.failures: list[str] = []
        self._thread.start()

    def _run(self) -> None:
        # Idempotent producer with a long delivery timeout: rides out a broker restart.
        producer = Producer(
            {
                "bootstrap.servers": self._bootstrap,
                "enable.idempotence": True,
                "delivery.timeout.ms": 300_000,
            }
        )

        def delivered(error, _message) -> None:  # type: ignore[no-untyped-def]
            if error is not None:
                self.failures.append(str(error))

        for sent, (topic, key, value, headers) in enumerate(self._records):
            if sent == self._hold_after:
                self._released.wait(600)
            producer.produce(topic, key=key, value=value, headers=headers, on_delivery=delivered)
            producer.poll(0)
            time.sleep(self._interval)
        if producer.flush(300) != 0:
            self.failures.append("not all jobs acknowledged")

    def release(self) -> None:
        self._released.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout_s: float = 600) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "publishing did not finish"
        assert not self.failures, self.failures


def job_record(topic: str, job: dict) -> tuple[str, bytes, bytes, list[tuple[str, bytes]]]:
    return (topic, job["job_id"].encode(), json.dumps(job).encode(), [])


class TopicWatcher:
    """Collects every message of some topics from the beginning, for as long as a test runs."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self.messages: list[Message] = []
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"watcher-{uuid.uuid4()}",
                "enable.auto.commit": False,
                # Only what a transaction committed: an aborted answer must never count.
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
            }
        )
        metadata = self._consumer.list_topics(timeout=30)
        self._consumer.assign(
            [
                TopicPartition(topic, partition, OFFSET_BEGINNING)
                for topic in topics
                for partition in metadata.topics[topic].partitions
            ]
        )

    def wait_for(self, predicate: Callable[[list[Message]], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate(self.messages):
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout_s}s")
            for message in self._consumer.consume(num_messages=500, timeout=0.5):
                assert message.error() is None, message.error()
                self.messages.append(message)

    def json_values(self, topic: str | None = None) -> list[dict]:
        return [
            json.loads(m.value())
            for m in self.messages
            if (topic is None or m.topic() == topic) and m.value() is not None
        ]

    def close(self) -> None:
        self._consumer.close()


@cache
def load_zoo_generators() -> ModuleType:
    # The zoo script's synthetic generators give inputs with known labels; reusing them keeps the
    # test's ground truth identical to what the classifier was trained to do.
    spec = importlib.util.spec_from_file_location("build_zoo", ROOT / "ops" / "build_zoo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def expected_adapter(job: dict) -> str | None:
    """The routing the README promises, written out independently of workers.core.routing."""
    if job.get("adapter"):
        return job["adapter"]
    if job["task"] == "classify":
        return "classifier"
    if job["task"] == "summarize":
        return "summarizer"
    return {"acme": "customer-tone", "globex": "partner-tone"}.get(job.get("tenant"))
