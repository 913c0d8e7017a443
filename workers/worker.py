"""The worker loop: consume → prepare (decode, route, tokenize) → batch by adapter → generate →
validate → write → commit. Data flows one way; each stage lives in its own module.

At-least-once: a message's offset is finished only when its result or dead-letter record has
been acknowledged by the broker, and commits never pass an unfinished offset.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from types import FrameType

import structlog

from workers import metrics
from workers.adapter_cache import AdapterCache
from workers.adapter_feed import AdapterUpdateFeed
from workers.adapters import AdapterRegistry
from workers.batching import AdapterBatcher
from workers.config import PipelineConfig, Settings
from workers.contracts import Result
from workers.engine import Engine
from workers.errors import JobRejected
from workers.offsets import OffsetTracker, TopicPartitionKey
from workers.parquet_results import ParquetResults
from workers.prepare import JobPreparer, PreparedJob
from workers.processing import BatchProcessor
from workers.sinks import KafkaSink
from workers.source import KafkaJobSource, SourceMessage

log = structlog.get_logger(__name__)

POLL_INTERVAL_S = 0.5
FLUSH_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RunLimits:
    max_jobs: int | None = None  # exit after this many messages are finished
    idle_exit_s: float | None = None  # exit after this long with nothing to do


@dataclass
class RunSummary:
    finished: int = 0
    results: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    dead_letters: Counter[tuple[str, str]] = field(default_factory=Counter)
    output_tokens: int = 0


@dataclass
class _Awaiting:
    job: PreparedJob
    result: Result
    sinks_left: int


class Worker:
    def __init__(
        self,
        settings: Settings,
        pipelines: dict[str, PipelineConfig],
        engine: Engine,
        preparer: JobPreparer,
        registry: AdapterRegistry,
        updates: AdapterUpdateFeed,
        cache: AdapterCache,
        batcher: AdapterBatcher[PreparedJob],
        source_factory: Callable[[Callable[[list[TopicPartitionKey]], None]], KafkaJobSource],
        sink: KafkaSink,
    ) -> None:
        self.settings = settings
        self.pipelines = pipelines
        self.engine = engine
        self.preparer = preparer
        self.registry = registry
        self.updates = updates
        self.cache = cache
        self.batcher = batcher
        self.processor = BatchProcessor(engine, cache, pipelines)
        self.parquet = ParquetResults(pipelines)
        self._awaiting: dict[tuple[str, int, int], _Awaiting] = {}
        self.sink = sink
        self.pipelines_by_topic = {p.input_topic: p for p in pipelines.values()}
        self.offsets = OffsetTracker()
        self.summary = RunSummary()
        self._stop_requested = False
        self._paused = False
        self._last_commit = time.monotonic()
        self.source = source_factory(self._on_revoke)

    # --- lifecycle ---------------------------------------------------------------------------

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        self._stop_requested = True

    def run(self, limits: RunLimits) -> RunSummary:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        last_activity = time.monotonic()
        log.info("worker_started", topics=sorted(self.pipelines_by_topic))
        try:
            while not self._should_stop(limits):
                messages = self._consume()
                now = time.monotonic()
                if messages or len(self.batcher) or self.offsets.unfinished_count():
                    last_activity = now
                for message in messages:
                    self._accept(message)
                while batch := self.batcher.next_batch(time.monotonic()):
                    self._run_batch(batch)
                self._follow_adapter_updates()
                self.sink.poll(0)
                self._flush_parquet()
                self._commit_if_due()
                if limits.idle_exit_s is not None and now - last_activity >= limits.idle_exit_s:
                    log.info("idle_exit", idle_s=limits.idle_exit_s)
                    break
        finally:
            self._shutdown()
        return self.summary

    def _should_stop(self, limits: RunLimits) -> bool:
        if self._stop_requested:
            return True
        return limits.max_jobs is not None and self.summary.finished >= limits.max_jobs

    def _shutdown(self) -> None:
        # Results already handed to the producer are flushed and committed; jobs still waiting
        # in the batcher are not committed, so the group serves them again (at-least-once).
        try:
            self.sink.flush(FLUSH_TIMEOUT_S)
            self._flush_parquet(force=True)
            self._commit()
        finally:
            self.source.close()
            self.updates.close()
            log.info(
                "worker_stopped",
                finished=self.summary.finished,
                output_tokens=self.summary.output_tokens,
                not_started=len(self.batcher),
                adapter_cache=vars(self.cache.stats),
            )

    def _follow_adapter_updates(self) -> None:
        self.updates.follow(self.registry.apply_record)
        # Versions replaced by an update leave the engine once no waiting job was routed to them.
        waiting = {key for key in self.batcher.pending_keys() if isinstance(key, int)}
        released = self.registry.release_unused(waiting)
        if released:
            self.cache.refresh(unregistered=released)

    # --- consume and prepare -----------------------------------------------------------------

    def _consume(self) -> list[SourceMessage]:
        # Backpressure: stop fetching while too much work is unfinished, but keep polling so the
        # consumer stays in its group.
        overloaded = self.offsets.unfinished_count() >= self.settings.batching.max_in_flight
        if overloaded != self._paused:
            (self.source.pause_all if overloaded else self.source.resume_all)()
            self._paused = overloaded
        due_in = self.batcher.seconds_until_due(time.monotonic())
        timeout = POLL_INTERVAL_S if due_in is None else min(POLL_INTERVAL_S, due_in)
        messages = self.source.consume(self.settings.batching.consume_batch, timeout)
        for message in messages:
            metrics.MESSAGES_CONSUMED.labels(message.topic).inc()
        return messages

    def _accept(self, message: SourceMessage) -> None:
        self.offsets.track(message.topic, message.partition, message.offset)
        try:
            prepared = self.preparer.prepare(message)
        except JobRejected as rejection:
            self._dead_letter(message, rejection)
            return
        self.batcher.add(prepared)

    def _dead_letter(self, message: SourceMessage, rejection: JobRejected) -> None:
        pipeline = self.pipelines_by_topic[message.topic]
        topic = (
            self.settings.unknown_task_dlq
            if rejection.code == "unknown_task"
            else pipeline.dlq_topic
        )
        log.warning(
            "dead_letter",
            code=rejection.code,
            reason=rejection.message,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
        )

        def delivered() -> None:
            self._finish(message)
            self.summary.dead_letters[(pipeline.task, rejection.code)] += 1
            metrics.DEAD_LETTERS.labels(pipeline.task, rejection.code).inc()

        self.sink.write_dead_letter(topic, message, rejection.code, rejection.message, delivered)

    # --- generate, validate, write -----------------------------------------------------------

    def _run_batch(self, batch: list[PreparedJob]) -> None:
        outcome = self.processor.run(batch)
        for job, result in outcome.results:
            source = job.source
            position = (source.topic, source.partition, source.offset)
            sinks = job.pipeline.sinks
            # The offset is finished once every sink of the pipeline has the result.
            self._awaiting[position] = _Awaiting(job, result, len(sinks))
            if "kafka" in sinks:
                self.sink.write_result(
                    job.pipeline.result_topic, result, partial(self._sink_done, position)
                )
            if "parquet" in sinks:
                self.parquet.add(source.topic, source.partition, source.offset, result)
        for retry in outcome.retries:
            self.batcher.add(retry)

    def _sink_done(self, position: tuple[str, int, int]) -> None:
        awaiting = self._awaiting.get(position)
        if awaiting is None:
            return  # a partition revoked meanwhile
        awaiting.sinks_left -= 1
        if awaiting.sinks_left > 0:
            return
        del self._awaiting[position]
        job, result = awaiting.job, awaiting.result
        adapter = metrics.adapter_label(
            result.adapter.name if result.adapter else None,
            result.adapter.version if result.adapter else None,
        )
        self._finish(job.source)
        self.summary.results[(result.task, result.status.value, adapter)] += 1
        self.summary.output_tokens += result.usage.completion_tokens
        metrics.RESULTS.labels(result.task, result.status.value, adapter).inc()
        metrics.OUTPUT_TOKENS.labels(result.task, adapter).inc(result.usage.completion_tokens)

    def _flush_parquet(
        self, *, force: bool = False, only: set[TopicPartitionKey] | None = None
    ) -> None:
        self.parquet.flush(
            self.offsets.first_unfinished_outside, self._parquet_written, force=force, only=only
        )

    def _parquet_written(self, key: TopicPartitionKey, offsets: list[int]) -> None:
        for offset in offsets:
            self._sink_done((*key, offset))
        # Commit before the partition's next file: at most one file is ever uncommitted, and a
        # replay rewrites exactly that file under the same name.
        self.sink.flush(FLUSH_TIMEOUT_S)
        self._commit()

    # --- offsets -----------------------------------------------------------------------------

    def _finish(self, message: SourceMessage) -> None:
        self.offsets.finish(message.topic, message.partition, message.offset)
        self.summary.finished += 1

    def _commit_if_due(self) -> None:
        if (time.monotonic() - self._last_commit) * 1000 >= self.settings.commit_interval_ms:
            self._commit()

    def _commit(self) -> None:
        positions = self.offsets.committable()
        if positions:
            self.source.commit(positions)
            self.offsets.mark_committed(positions)
            log.debug("committed", positions={f"{t}[{p}]": o for (t, p), o in positions.items()})
        self._last_commit = time.monotonic()

    def _on_revoke(self, partitions: list[TopicPartitionKey]) -> None:
        # Commit what is finished for the partitions we are losing, and drop their waiting jobs:
        # the next owner starts from that commit, so nothing is lost.
        self.sink.flush(FLUSH_TIMEOUT_S)
        revoked = set(partitions)
        self._flush_parquet(force=True, only=revoked)
        self.parquet.forget(revoked)
        positions = {k: v for k, v in self.offsets.committable().items() if k in revoked}
        if positions:
            self.source.commit(positions)
        dropped = self.batcher.discard(
            lambda job: (job.source.topic, job.source.partition) in revoked
        )
        self.offsets.forget(partitions)
        log.info("revoked_handled", committed=len(positions), dropped_jobs=len(dropped))
