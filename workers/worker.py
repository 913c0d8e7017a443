"""The worker loop: consume → prepare (decode, route, tokenize) → batch by adapter → generate →
validate → write → commit. Data flows one way; each stage lives in its own module.

Generation runs on its own thread, one batch at a time, so this thread keeps polling Kafka
(group membership, rebalances, adapter updates, fetching the next jobs) however long a batch
takes: a slow batch never exceeds max.poll.interval.ms. While a batch runs, this thread does not
touch the engine; adapter updates and the choice of the next batch wait for it.

A message's offset is finished once its answer (result or dead letter) is written or held by the
sink, and commits never pass an unfinished offset (`offsets.py`). Exactly-once by default: the
answers below a commit and the commit are one transaction (`transactions.py`).
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from types import FrameType

import structlog
from confluent_kafka import KafkaException

from workers import metrics
from workers.adapters.feed import AdapterUpdateFeed
from workers.adapters.updates import UpdateRecord
from workers.core.config import PipelineConfig, Settings
from workers.core.contracts import Result, adapter_label
from workers.core.engine_api import EngineDied
from workers.core.errors import JobError, JobRejected
from workers.core.messages import SourceMessage, traced
from workers.core.offsets import OffsetTracker, TopicPartitionKey
from workers.core.prepare import PreparedJob
from workers.core.processing import ServedBatch
from workers.health import Readiness
from workers.kafka.sinks import DeliveryFailed, ResultSink, dead_letter_record, result_record
from workers.kafka.source import KafkaJobSource, RebalanceHandlers
from workers.parquet.kafka_results import ParquetResults
from workers.serving import Serving
from workers.threads import on_daemon_thread

log = structlog.get_logger(__name__)

POLL_INTERVAL_S = 0.5
LAG_REPORT_INTERVAL_S = 2.0
POLL_WHILE_GENERATING_S = 0.05
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
    engine_restarts: int = 0


@dataclass
class _Awaiting:
    job: PreparedJob
    result: Result
    sinks_left: int


@dataclass
class _InFlight:
    """The batch on the engine thread. Partitions revoked meanwhile are noted, and their answers
    dropped when it returns: the partition's next owner serves those jobs from the last commit."""

    batch: list[PreparedJob]
    future: Future[ServedBatch]
    revoked: set[TopicPartitionKey] = field(default_factory=set)

    def still_ours(self, job: PreparedJob) -> bool:
        return _partition_of(job) not in self.revoked


def _partition_of(job: PreparedJob) -> TopicPartitionKey:
    return (job.source.topic, job.source.partition)


class Worker:
    def __init__(
        self,
        settings: Settings,
        pipelines: dict[str, PipelineConfig],
        serving: Serving,
        updates: AdapterUpdateFeed,
        source_factory: Callable[[RebalanceHandlers], KafkaJobSource],
        sink: ResultSink,
        readiness: Readiness | None = None,
    ) -> None:
        self.settings = settings
        self.pipelines = pipelines
        self.serving = serving
        self.batcher = serving.batcher
        self.updates = updates
        self.parquet = ParquetResults(pipelines)
        self._awaiting: dict[tuple[str, int, int], _Awaiting] = {}
        self.sink = sink
        self.pipelines_by_topic = {p.input_topic: p for p in pipelines.values()}
        self.offsets = OffsetTracker()
        self.summary = RunSummary()
        self._stop_requested = False
        self._paused = False
        self._inflight: _InFlight | None = None
        self._last_commit = time.monotonic()
        self._commit_backoff_s = 0.0
        self._readiness = readiness or Readiness()
        self._next_lag_report = 0.0
        self.source = source_factory(
            RebalanceHandlers(revoked=self._on_revoked, lost=self._on_lost)
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        self._stop_requested = True

    def run(self, limits: RunLimits) -> RunSummary:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        last_activity = time.monotonic()
        log.info(
            "worker_started",
            topics=sorted(self.pipelines_by_topic),
            delivery=self.settings.delivery.mode,
        )
        try:
            while not self._should_stop(limits):
                messages = self._consume()
                now = time.monotonic()
                # Waiting for a partition's committed offset is not idleness: its jobs are
                # still to come.
                if messages or self._busy() or self.source.fetch_pending():
                    last_activity = now
                for message in messages:
                    self._accept(message)
                self._collect_batch()
                if self._inflight is None:
                    self._follow_adapter_updates()
                    batch = self.batcher.next_batch(time.monotonic())
                    if batch:
                        self._start_batch(batch)
                self.sink.poll()
                self._flush_parquet()
                self._commit_if_due()
                self._report_progress(now)
                if limits.idle_exit_s is not None and now - last_activity >= limits.idle_exit_s:
                    log.info("idle_exit", idle_s=limits.idle_exit_s)
                    break
        finally:
            self._shutdown()
        return self.summary

    def _report_progress(self, now: float) -> None:
        """Readiness follows the assignment; consumer lag every few seconds (cached offsets)."""
        if now < self._next_lag_report:
            return
        self._next_lag_report = now + LAG_REPORT_INTERVAL_S
        lag = self.source.lag()
        self._readiness.update(assigned=bool(lag))
        for (topic, partition), behind in lag.items():
            metrics.CONSUMER_LAG.labels(topic, str(partition)).set(behind)

    def _busy(self) -> bool:
        return bool(
            self._inflight
            or len(self.batcher)
            or self.offsets.unfinished_count()
            or self.sink.held()
        )

    def _should_stop(self, limits: RunLimits) -> bool:
        if self._stop_requested:
            return True
        return limits.max_jobs is not None and self.summary.finished >= limits.max_jobs

    def _shutdown(self) -> None:
        # Stop fetching, give the running batch until the deadline, commit what is answered.
        # Jobs not answered by then are not committed, so the group serves them again.
        try:
            self.source.pause_all()
            self._await_batch(self.settings.delivery.shutdown_deadline_s)
            self.sink.flush(FLUSH_TIMEOUT_S)
            self._flush_parquet(force=True)
            self._commit()
        finally:
            self.source.close()  # leaves the group; partitions move at once
            self.sink.close()
            self.updates.close()
            log.info(
                "worker_stopped",
                finished=self.summary.finished,
                output_tokens=self.summary.output_tokens,
                not_started=len(self.batcher),
                abandoned=len(self._inflight.batch) if self._inflight else 0,
                engine_restarts=self.summary.engine_restarts,
                adapter_cache=vars(self.serving.cache.stats),
            )

    def _await_batch(self, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        while self._inflight is not None and time.monotonic() < deadline:
            self.source.consume(1, POLL_WHILE_GENERATING_S)  # paused: serves callbacks only
            self._collect_batch()
        if self._inflight is not None:
            log.warning("batch_abandoned", jobs=len(self._inflight.batch), deadline_s=deadline_s)

    def _follow_adapter_updates(self) -> None:
        registry, cache = self.serving.registry, self.serving.cache
        try:
            self.updates.follow(self._apply_update)
            # Versions replaced by an update leave the engine once no waiting job was routed
            # to them.
            waiting = {key for key in self.batcher.pending_keys() if isinstance(key, int)}
            released = registry.release_unused(waiting)
            if released:
                cache.refresh(unregistered=released)
        except EngineDied as death:  # between batches: handled as during one
            self._restart_engine_after(death)

    def _apply_update(self, record: UpdateRecord) -> None:
        try:
            self.serving.registry.apply_record(record)
        except EngineDied as death:
            # The engine died under this update (or just before it): restart and apply it once
            # more; a second death is the update's doing, and it is refused.
            self._restart_engine_after(death)
            try:
                self.serving.registry.apply_record(record)
            except EngineDied as again:
                self._restart_engine_after(again)
                self.serving.registry.refuse(record, "the engine died twice applying it")

    def _restart_engine_after(self, death: EngineDied) -> None:
        log.error("engine_died_between_batches", error=str(death))
        metrics.ENGINE_RESTARTS.inc()
        self.serving.restart_engine()
        self.summary.engine_restarts += 1

    # --- consume and prepare -----------------------------------------------------------------

    def _consume(self) -> list[SourceMessage]:
        # Backpressure: stop fetching while too much work is unanswered or uncommitted, but keep
        # polling so the consumer stays in its group.
        in_flight = self.offsets.unfinished_count() + self.sink.held()
        overloaded = in_flight >= self.settings.batching.max_in_flight
        if overloaded != self._paused:
            (self.source.pause_all if overloaded else self.source.resume_all)()
            self._paused = overloaded
        if self._inflight is not None:
            timeout = POLL_WHILE_GENERATING_S
        else:
            due_in = self.batcher.seconds_until_due(time.monotonic())
            timeout = POLL_INTERVAL_S if due_in is None else min(POLL_INTERVAL_S, due_in)
        messages = self.source.consume(self.settings.batching.consume_batch, timeout)
        for message in messages:
            metrics.MESSAGES_CONSUMED.labels(message.topic).inc()
        return messages

    def _accept(self, message: SourceMessage) -> None:
        self.offsets.track(message.topic, message.partition, message.offset)
        try:
            prepared = self.serving.preparer.prepare(message)
        except JobRejected as rejection:
            self._dead_letter(message, rejection)
            return
        self.batcher.add(prepared)

    def _dead_letter(self, message: SourceMessage, rejection: JobRejected) -> None:
        pipeline = self.pipelines_by_topic[message.topic]
        topic = (
            self.settings.unknown_task_dlq
            if rejection.code is JobError.UNKNOWN_TASK
            else pipeline.dlq_topic
        )
        source = f"{message.topic}[{message.partition}]@{message.offset}"
        log.warning(
            "dead_letter",
            code=rejection.code,
            reason=rejection.message,
            source=source,
            **traced(message),
        )

        def done() -> None:
            self._finish(message)
            self.summary.dead_letters[(pipeline.task, rejection.code)] += 1
            metrics.DEAD_LETTERS.labels(pipeline.task, rejection.code).inc()

        record = dead_letter_record(topic, message, rejection, self.settings.sizes)
        self.sink.write((message.topic, message.partition, message.offset), record, done)

    # --- generate (engine thread), validate, write ------------------------------------------

    def _start_batch(self, batch: list[PreparedJob]) -> None:
        log.info("batch_started", jobs=len(batch), adapters=len({j.adapter_key for j in batch}))
        # A daemon thread: a shutdown past its deadline must not wait for generate() to return.
        # Errors reach the worker thread through the future, which re-raises them.
        future = on_daemon_thread(lambda: self.serving.processor.serve(batch), name="engine")
        self._inflight = _InFlight(batch, future)

    def _collect_batch(self) -> None:
        inflight = self._inflight
        if inflight is None or not inflight.future.done():
            return
        self._inflight = None
        served = inflight.future.result()  # an engine that cannot restart ends the worker
        self.summary.engine_restarts += served.engine_restarts
        for handle, reason in served.unavailable:
            self.serving.registry.mark_unavailable(handle, reason)
        for job, result in served.results:
            if inflight.still_ours(job):
                self._write_result(job, result)
        for retry in served.retries:
            if inflight.still_ours(retry):
                self.batcher.add(retry)
        for job, rejection in served.unserved:
            if inflight.still_ours(job):
                self._dead_letter(job.source, rejection)

    def _write_result(self, job: PreparedJob, result: Result) -> None:
        try:
            self._write_to_sinks(job, result)
        except (DeliveryFailed, KafkaException):
            raise  # the sink itself is broken, not this job
        except Exception as exc:  # this job's answer alone: dead-letter it, keep serving
            log.exception("result_write_failed", job_id=job.job.job_id, **traced(job.source))
            self._awaiting.pop((job.source.topic, job.source.partition, job.source.offset), None)
            self._dead_letter(job.source, JobRejected.internal(exc))

    def _write_to_sinks(self, job: PreparedJob, result: Result) -> None:
        source = job.source
        position = (source.topic, source.partition, source.offset)
        sinks = job.pipeline.sinks
        # The offset is finished once every sink of the pipeline has the result.
        self._awaiting[position] = _Awaiting(job, result, len(sinks))
        if "kafka" in sinks:
            record = result_record(
                job.pipeline.result_topic,
                job.pipeline.dlq_topic,
                result,
                self.settings.sizes,
                source.traceparent,
            )
            self.sink.write(position, record, partial(self._sink_done, position))
        if "parquet" in sinks:
            self.parquet.add(source.topic, source.partition, source.offset, result)

    def _sink_done(self, position: tuple[str, int, int]) -> None:
        awaiting = self._awaiting.get(position)
        if awaiting is None:
            return  # a partition revoked meanwhile
        awaiting.sinks_left -= 1
        if awaiting.sinks_left > 0:
            return
        del self._awaiting[position]
        job, result = awaiting.job, awaiting.result
        adapter = adapter_label(
            result.adapter and result.adapter.name, result.adapter and result.adapter.version
        )
        self._finish(job.source)
        self.summary.results[(result.task, result.status.value, adapter)] += 1
        self.summary.output_tokens += result.usage.completion_tokens
        metrics.record_result(result, int(time.time() * 1000))

    def _flush_parquet(
        self, *, force: bool = False, only: set[TopicPartitionKey] | None = None
    ) -> None:
        self.parquet.flush(
            self.offsets.first_unfinished_outside,
            self._parquet_written,
            self._commit_parquet_file,
            force=force,
            only=only,
        )

    def _parquet_written(self, key: TopicPartitionKey, offsets: list[int]) -> None:
        for offset in offsets:
            self._sink_done((*key, offset))

    def _commit_parquet_file(self) -> bool:
        # Commit before the partition's next file: at most one file is ever uncommitted, and a
        # replay rewrites exactly that file under the same name.
        if self._commit_backoff_s and not self._commit_due():
            return False
        self.sink.flush(FLUSH_TIMEOUT_S)
        return self._commit()

    # --- offsets -----------------------------------------------------------------------------

    def _finish(self, message: SourceMessage) -> None:
        self.offsets.finish(message.topic, message.partition, message.offset)
        self.summary.finished += 1

    def _commit_due(self) -> bool:
        interval_s = max(self.settings.commit_interval_ms / 1000, self._commit_backoff_s)
        return time.monotonic() - self._last_commit >= interval_s

    def _commit_if_due(self) -> None:
        if self._commit_due():
            self._commit()

    def _commit(self) -> bool:
        """True when every finished position is committed."""
        self._last_commit = time.monotonic()
        positions = self.offsets.committable()
        if not positions:
            return True
        if self.sink.commit(positions, self.source):
            self.offsets.mark_committed(positions)
            self._commit_backoff_s = 0.0
            log.debug("committed", positions={f"{t}[{p}]": o for (t, p), o in positions.items()})
            return True
        # Broker away or a rebalance under way: try again later, backing off, never spinning.
        self._commit_backoff_s = min(
            max(2 * self._commit_backoff_s, 0.5), self.settings.delivery.retry_backoff_max_s
        )
        log.warning("commit_deferred", retry_in_s=self._commit_backoff_s)
        return False

    def _on_revoked(self, partitions: list[TopicPartitionKey]) -> None:
        # Still ours for the length of this call: commit what is answered (bounded by the
        # sink's call timeouts), then let go; the next owner starts from that commit.
        revoked = set(partitions)
        if self._inflight is not None:
            self._inflight.revoked |= revoked
        self.sink.flush(FLUSH_TIMEOUT_S)
        self._flush_parquet(force=True, only=revoked)
        self._commit()
        self._let_go(revoked)

    def _on_lost(self, partitions: list[TopicPartitionKey]) -> None:
        # Already someone else's (our session expired): commit nothing, drop everything.
        lost = set(partitions)
        if self._inflight is not None:
            self._inflight.revoked |= lost
        self._let_go(lost)

    def _let_go(self, partitions: set[TopicPartitionKey]) -> None:
        for topic, partition in partitions:
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(topic, str(partition))
        self._next_lag_report = 0.0  # readiness follows the new assignment at once
        self.parquet.forget(partitions)
        self.sink.discard(partitions)
        dropped = self.batcher.discard(lambda job: _partition_of(job) in partitions)
        for position in [p for p in self._awaiting if (p[0], p[1]) in partitions]:
            del self._awaiting[position]
        self.offsets.forget(list(partitions))
        log.info("partitions_released", partitions=sorted(partitions), dropped_jobs=len(dropped))
