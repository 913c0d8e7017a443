"""Calling lora-workers from a service (docs/client.md): submit jobs, await their answers.

    from workers.client import Client, JobFailed, as_completed

    with Client("lora-workers.yaml") as client:
        handle = client.submit({"job_id": "j-1", "task": "classify", "input": "..."})
        try:
            result = handle.result(timeout=30)
        except JobFailed as failed:
            print(failed.code, failed.message)

One producer and one consumer per client. The consumer reads, `read_committed`, the topics
where answers land: the client's `reply_to` topic when it has one, else every pipeline's result
and dead-letter topics and the unknown-task dead-letter topic. It starts `lookback_s` seconds
back (None: from the beginning), so a restarted client still finds answers committed while it
was away; reading from the beginning finds everything retained but reads every answer ever
written first. The bookkeeping (handles, bounded memory) is in `workers.client.book`.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import structlog
from confluent_kafka import OFFSET_BEGINNING, KafkaError, Message, TopicPartition

from workers.client.book import (
    DEFAULT_MAX_KEPT,
    AnswerBook,
    JobFailed,
    JobHandle,
    Outcome,
    as_completed,
    outcome_of,
)
from workers.core.config import PipelineConfig, Settings, load_pipelines
from workers.core.contracts import Job, Result
from workers.kafka import clients
from workers.kafka.acls import READER_GROUP_PREFIX
from workers.kafka.clients import KafkaConnection, describe
from workers.kafka.sinks import produce_waiting_for_room
from workers.kafka.topics import read_to_end

__all__ = [
    "DEFAULT_LOOKBACK_S",
    "DEFAULT_MAX_KEPT",
    "PUBLISH_FAILED",
    "Client",
    "JobFailed",
    "JobHandle",
    "UnknownTask",
    "as_completed",
]

log = structlog.get_logger(__name__)

DEFAULT_LOOKBACK_S = 900.0
PUBLISH_FAILED = "publish_failed"  # JobFailed.code of a job the broker never took
POLL_S = 0.1
METADATA_TIMEOUT_S = 10.0


class UnknownTask(ValueError):
    """No pipeline serves the job's task: it would only be dead-lettered."""


def _settings(config: Settings | str | Path | None) -> Settings:
    if isinstance(config, Settings):
        return config
    settings: Settings = Settings.load(config=None if config is None else Path(config)).settings
    return settings


class Client:
    """Submit jobs and await their answers; thread-safe, and usable from asyncio.

    `config`: the worker's `Settings`, or its configuration file (None: the same lookup as the
    CLI: `$LORA_WORKERS_CONFIG`, then `lora-workers.yaml` here). `reply_to`: a topic this
    client's jobs name as their `reply_to`; it must exist, and then the client reads only it.
    `max_kept`: answers kept for jobs nobody awaits (oldest dropped first).
    """

    def __init__(
        self,
        config: Settings | str | Path | None = None,
        *,
        reply_to: str | None = None,
        lookback_s: float | None = DEFAULT_LOOKBACK_S,
        max_kept: int = DEFAULT_MAX_KEPT,
    ) -> None:
        self.settings = _settings(config)
        self.pipelines: dict[str, PipelineConfig] = load_pipelines(self.settings.pipelines_dir)
        self.reply_to = reply_to
        self._kafka = KafkaConnection.from_settings(self.settings)
        self._book = AnswerBook(max_kept)
        self._producer = clients.producer(
            self._kafka, {"enable.idempotence": True, "acks": "all", "linger.ms": 5}
        )
        self._consumer = clients.consumer(
            self._kafka,
            {
                # Never committed nor joined (assign); named so the reader ACLs cover it.
                "group.id": f"{READER_GROUP_PREFIX}client-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 20,  # an answer waits at most this long in the broker
            },
        )
        try:
            self._assign(lookback_s)
        except BaseException:
            self._consumer.close()  # e.g. the reply topic missing: leave nothing behind
            raise
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, name="lora-workers-client", daemon=True)
        self._thread.start()

    # --- answers ---------------------------------------------------------------------------

    def answer_topics(self) -> list[str]:
        if self.reply_to is not None:
            return [self.reply_to]
        topics = {self.settings.unknown_task_dlq}
        for pipeline in self.pipelines.values():
            topics.update({str(pipeline.result_topic), pipeline.dlq_topic})
        return sorted(topics)

    def _assign(self, lookback_s: float | None) -> None:
        metadata = self._consumer.list_topics(timeout=METADATA_TIMEOUT_S)
        wanted = self.answer_topics()
        missing = [t for t in wanted if t not in metadata.topics]
        if self.reply_to is not None and missing:
            raise ValueError(f"reply topic {self.reply_to} does not exist; create it first")
        if missing:
            log.warning("answer_topics_missing", topics=missing)
        partitions = [
            TopicPartition(topic, p, OFFSET_BEGINNING)
            for topic in wanted
            if topic not in missing
            for p in metadata.topics[topic].partitions
        ]
        if lookback_s is not None and partitions:
            since_ms = int((time.time() - lookback_s) * 1000)
            asked = [TopicPartition(tp.topic, tp.partition, since_ms) for tp in partitions]
            found = self._consumer.offsets_for_times(asked, timeout=METADATA_TIMEOUT_S)
            # -1: nothing written since then: from the end, resolved now (a lazy OFFSET_END
            # would miss what is written before the first fetch).
            partitions = [
                TopicPartition(
                    tp.topic,
                    tp.partition,
                    tp.offset if tp.offset >= 0 else self._high_watermark(tp),
                )
                for tp in found
            ]
        self._consumer.assign(partitions)

    def _high_watermark(self, tp: TopicPartition) -> int:
        _low, high = self._consumer.get_watermark_offsets(tp, timeout=METADATA_TIMEOUT_S)
        return int(high)

    def _read(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0)  # delivery reports: a refused job fails its handle
            message = self._consumer.poll(POLL_S)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("client_read_error", error=describe(error))
                continue
            found = outcome_of(
                message.topic() or "", message.key(), message.value(), message.headers()
            )
            if found is not None:
                self._book.answered(*found)

    # --- submitting ------------------------------------------------------------------------

    def submit(self, job: Job | Mapping[str, Any]) -> JobHandle:
        """Validate the job (`pydantic.ValidationError`), send it to its task's input topic
        keyed by job_id, and return its handle. `UnknownTask` when no pipeline serves it."""
        valid = job if isinstance(job, Job) else Job.model_validate(job)
        pipeline = self.pipelines.get(valid.task)
        if pipeline is None:
            raise UnknownTask(f"no pipeline serves task {valid.task!r}")
        if self.reply_to is not None and valid.reply_to is None:
            valid = valid.model_copy(update={"reply_to": self.reply_to})
        handle = self._book.expect(valid.job_id, valid.task)
        job_id = valid.job_id

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                failed = JobFailed(job_id, PUBLISH_FAILED, describe(error), pipeline.input_topic)
                self._book.answered(job_id, failed)

        produce_waiting_for_room(
            self._producer,
            str(pipeline.input_topic),
            key=job_id.encode(),
            # Only the fields given: a job carries exactly one of input/messages as keys.
            value=valid.model_dump_json(exclude_unset=True).encode(),
            headers=[("content-type", b"application/json")],
            on_delivery=delivered,
        )
        return handle

    def submit_many(self, jobs: Iterable[Job | Mapping[str, Any]]) -> list[JobHandle]:
        """Submit each job (all validated first: one invalid job sends none), then flush."""
        valid = [job if isinstance(job, Job) else Job.model_validate(job) for job in jobs]
        unknown = sorted({job.task for job in valid} - set(self.pipelines))
        if unknown:
            raise UnknownTask(f"no pipeline serves task(s) {', '.join(unknown)}")
        handles = [self.submit(job) for job in valid]
        self.flush()
        return handles

    def flush(self, timeout_s: float = 30.0) -> None:
        self._producer.flush(timeout_s)

    # --- awaiting --------------------------------------------------------------------------

    def handle(self, job_id: str) -> JobHandle:
        """A handle for a job submitted earlier (perhaps by another process)."""
        return self._book.expect(job_id)

    def get(self, job_id: str, timeout: float | None = None) -> Result:
        """The job's result; `JobFailed` for a dead letter, `TimeoutError` past `timeout`."""
        return self.handle(job_id).result(timeout)

    async def result(self, job_id: str | JobHandle, timeout: float | None = None) -> Result:
        """`await client.result(job_id)`: as `get`, without blocking the event loop."""
        handle = job_id if isinstance(job_id, JobHandle) else self.handle(job_id)
        loop = asyncio.get_running_loop()
        arrived: asyncio.Future[None] = loop.create_future()

        def settle(_handle: JobHandle) -> None:
            loop.call_soon_threadsafe(lambda: arrived.done() or arrived.set_result(None))

        handle.add_listener(settle)
        try:
            await asyncio.wait_for(arrived, timeout)
        except TimeoutError:
            raise TimeoutError(f"job {handle.job_id}: no answer within {timeout} s") from None
        return handle.result(0)

    def stats(self) -> dict[str, int]:
        return self._book.stats()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._producer.flush(10)
        self._closed.set()
        self._thread.join()
        self._consumer.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def find_answer(kafka: KafkaConnection, topics: list[str], job_id: str) -> Outcome | None:
    """The first committed answer for `job_id` in `topics`, read from the beginning to the end
    (a full scan: for a command line, not a hot path)."""
    for message in read_to_end(kafka, topics):
        if message.key() is not None and message.key() != job_id.encode():
            continue  # every answer is keyed by its job id: skip the others unparsed
        found = outcome_of(message.topic() or "", message.key(), message.value(), message.headers())
        if found is not None and found[0] == job_id:
            return found[1]
    return None
