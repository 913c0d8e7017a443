"""The worker loop: consume → prepare (decode, route, tokenize) → submit to the engine loop
(admission by adapter and tenant, generation, validation) → write → commit. Data flows one way;
each stage lives in its own module.

The engine loop (`workers.engine.loop`) owns the engine on its own thread and hands back each
job as soon as its request finishes; this thread keeps polling Kafka (group membership,
rebalances, fetching the next jobs) and writing answers however busy the engine is, so nothing
exceeds max.poll.interval.ms. Adapter updates are applied on the engine loop's thread, between
engine steps (`_between_steps`).

A message's offset is finished once its answer (result or dead letter) is written or held by the
sink. Commits never pass an unfinished offset, and carry a ledger of the offsets finished beyond
it, skipped when the partition is read again (`offsets.py`). Exactly-once by default: the
answers a commit covers and the commit are one transaction (`transactions.py`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from types import FrameType

import structlog
from confluent_kafka import KafkaException

from workers import metrics
from workers.adapters.feed import AdapterUpdateFeed
from workers.adapters.updates import UpdateRecord
from workers.core.config import PipelineConfig, Settings
from workers.core.contracts import AdapterStatus, Result, adapter_label
from workers.core.engine_api import EngineDied
from workers.core.errors import JobError, JobRejected
from workers.core.evaluation import ShadowSummaries
from workers.core.messages import SourceMessage, traced
from workers.core.offsets import OffsetTracker, TopicPartitionKey
from workers.core.prepare import PreparedJob
from workers.core.processing import Answered, Evaluated, Outcome, evaluation_of
from workers.health import Readiness
from workers.kafka.sinks import DeliveryFailed, ResultSink, dead_letter_record, result_record
from workers.kafka.source import KafkaJobSource, RebalanceHandlers
from workers.kafka.status import NoticeWriter
from workers.parquet.kafka_results import ParquetResults
from workers.serving import Serving

log = structlog.get_logger(__name__)

POLL_INTERVAL_S = 0.5
LAG_REPORT_INTERVAL_S = 2.0
POLL_WHILE_GENERATING_S = 0.01  # how soon a finished job's answer is written
FLUSH_TIMEOUT_S = 60.0
UPDATES_INTERVAL_S = 0.1
LOOP_JOIN_TIMEOUT_S = 30.0
PREPARE_CHUNK = 64  # messages staged, routed and submitted at a time


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


def _partition_of(job: PreparedJob) -> TopicPartitionKey:
    return (job.source.topic, job.source.partition)


def _position_of(source: SourceMessage) -> tuple[str, int, int]:
    return (source.topic, source.partition, source.offset)


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
        evaluations: NoticeWriter | None = None,
        report_status: Callable[[AdapterStatus], None] | None = None,
    ) -> None:
        self.settings = settings
        self.pipelines = pipelines
        self.serving = serving
        self.loop = serving.loop
        self.updates = updates
        self.parquet = ParquetResults(pipelines)
        self._awaiting: dict[tuple[str, int, int], _Awaiting] = {}
        self.sink = sink
        self.pipelines_by_topic = {p.input_topic: p for p in pipelines.values()}
        self.offsets = OffsetTracker()
        self.summary = RunSummary()
        self._stop_requested = False
        self._paused = False
        # Jobs handed to the engine loop, by position; an outcome counts only if its job is
        # still the one here (a revoked partition's jobs are dropped, and may come back).
        self._submitted: dict[tuple[str, int, int], PreparedJob] = {}
        # Routing a job and submitting it happen under this lock, and so does unloading unused
        # adapter versions: no version leaves the engine between a job's routing and its
        # submission.
        self._routing = threading.Lock()
        self._next_updates = 0.0
        self._last_commit = time.monotonic()
        self._commit_backoff_s = 0.0
        self._readiness = readiness or Readiness()
        self._next_lag_report = 0.0
        self._evaluations = evaluations
        self._report_status = report_status
        self._shadow_summaries = ShadowSummaries(
            settings.shadow.summary_window, settings.shadow.status_interval_s, settings.worker_id
        )
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
        self.loop.start(between_steps=self._between_steps)
        try:
            self.sink.start()
            while not self._should_stop(limits):
                messages = self._consume()
                # Waiting for a partition's committed offset is not idleness: its jobs are
                # still to come.
                active = bool(messages) or self._busy() or self.source.fetch_pending()
                self._accept(messages)
                self._collect()
                self._report_shadows(force=False)
                self.sink.poll()
                self._flush_parquet()
                self._commit_if_due()
                now = time.monotonic()
                self._report_progress(now)
                if active:  # after the work: time blocked in a commit is not idle time
                    last_activity = now
                if limits.idle_exit_s is not None and now - last_activity >= limits.idle_exit_s:
                    log.info("idle_exit", idle_s=limits.idle_exit_s)
                    break
        finally:
            self._shutdown()
        return self.summary

    def _report_progress(self, now: float) -> None:
        """Readiness follows group membership; consumer lag every few seconds (cached offsets)."""
        if now < self._next_lag_report:
            return
        self._next_lag_report = now + LAG_REPORT_INTERVAL_S
        lag = self.source.lag()
        self._readiness.update(joined=self.source.joined())
        for (topic, partition), behind in lag.items():
            metrics.CONSUMER_LAG.labels(topic, str(partition)).set(behind)

    def _busy(self) -> bool:
        return bool(
            self._submitted
            or self.offsets.unfinished_count()
            or self.sink.held()
            or self.loop.shadow_runs()
        )

    def _should_stop(self, limits: RunLimits) -> bool:
        if self._stop_requested:
            return True
        return limits.max_jobs is not None and self.summary.finished >= limits.max_jobs

    def _shutdown(self) -> None:
        # Stop fetching and give the jobs not yet in the engine back to the group; give those in
        # it until the deadline, then abort them; commit what is answered. What is not answered
        # stays uncommitted, so the group serves it again.
        abandoned = not_started = 0
        try:
            self.source.pause_all()
            self.loop.abort(lambda _job: True, waiting_only=True)
            self._await_engine(self.settings.delivery.shutdown_deadline_s)
            abandoned = self.loop.running()  # aborted by the stop below
            # Counted now: closing the source releases the partitions' jobs.
            not_started = len(self._submitted) - abandoned
            self.sink.flush(FLUSH_TIMEOUT_S)
            self._flush_parquet(force=True)
            self._commit()
            self._report_shadows(force=True)
        finally:
            self.loop.stop(LOOP_JOIN_TIMEOUT_S)  # aborts what is still in the engine
            self.source.close()  # leaves the group; partitions move at once
            self.sink.close()
            self.updates.close()
            self.summary.engine_restarts = self.loop.stats.engine_restarts
            log.info(
                "worker_stopped",
                finished=self.summary.finished,
                output_tokens=self.summary.output_tokens,
                abandoned=abandoned,
                not_started=not_started,
                engine_restarts=self.summary.engine_restarts,
                adapter_cache=vars(self.serving.cache.stats),
            )

    def _await_engine(self, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        while self.loop.in_engine() and time.monotonic() < deadline:
            self.source.consume(1, POLL_WHILE_GENERATING_S)  # paused: serves callbacks only
            self._collect()
            self.sink.poll()
        self._collect()
        if self.loop.running():
            log.warning("jobs_abandoned", jobs=self.loop.running(), deadline_s=deadline_s)

    # --- on the engine loop's thread, between engine steps ------------------------------------

    def _between_steps(self) -> None:
        now = time.monotonic()
        if now < self._next_updates:
            return
        self._next_updates = now + UPDATES_INTERVAL_S
        registry, cache = self.serving.registry, self.serving.cache
        try:
            self.updates.follow(self._apply_update)
            # Versions replaced by an update leave the engine once no job holds them.
            with self._routing:
                released = registry.release_unused(
                    key for key in self.loop.holding() if isinstance(key, int)
                )
            if released:
                cache.refresh(unregistered=released)
        except EngineDied as death:
            self.loop.recover(death)

    def _apply_update(self, record: UpdateRecord) -> None:
        try:
            self.serving.registry.apply_record(record)
        except EngineDied as death:
            # The engine died under this update (or just before it): restart and apply it once
            # more; a second death is the update's doing, and it is refused.
            self.loop.recover(death)
            try:
                self.serving.registry.apply_record(record)
            except EngineDied as again:
                self.loop.recover(again)
                self.serving.registry.refuse(record, "the engine died twice applying it")

    # --- consume and prepare -----------------------------------------------------------------

    def _consume(self) -> list[SourceMessage]:
        # Backpressure: stop fetching while too much work is unanswered or uncommitted, but keep
        # polling so the consumer stays in its group.
        in_flight = self.offsets.unfinished_count() + self.sink.held()
        overloaded = in_flight >= self.settings.admission.max_in_flight
        if overloaded != self._paused:
            (self.source.pause_all if overloaded else self.source.resume_all)()
            self._paused = overloaded
        timeout = POLL_WHILE_GENERATING_S if self._busy() else POLL_INTERVAL_S
        messages = self.source.consume(self.settings.admission.consume_batch, timeout)
        for message in messages:
            metrics.MESSAGES_CONSUMED.labels(message.topic).inc()
        return messages

    def _accept(self, messages: list[SourceMessage]) -> None:
        fresh: list[SourceMessage] = []
        for message in messages:
            key = (message.topic, message.partition)
            if not self.offsets.resumed(key):
                ledger = self.source.committed_ledger(key)
                if ledger.highest >= ledger.position:
                    log.info(
                        "partition_resumed_with_ledger",
                        partition=key,
                        position=ledger.position,
                        answered_beyond=ledger.highest
                        - ledger.position
                        + 1
                        - len(ledger.unfinished),
                    )
                self.offsets.resume(key, ledger)
            self.offsets.track(message.topic, message.partition, message.offset)
            if self.offsets.already_answered(message.topic, message.partition, message.offset):
                # Answered by this partition's previous owner, beyond the offset it could
                # commit: its answer is already on the result topic.
                self._finish(message)
                continue
            fresh.append(message)
        # In chunks, so the engine starts on the first jobs while later ones are embedded.
        for start in range(0, len(fresh), PREPARE_CHUNK):
            self._prepare(fresh[start : start + PREPARE_CHUNK])

    def _prepare(self, messages: list[SourceMessage]) -> None:
        preparer = self.serving.preparer
        staged = preparer.stage_all(messages)  # embedding routes take a while: not locked
        prepared: list[PreparedJob] = []
        with self._routing:
            for message, job in zip(messages, preparer.route_all(staged), strict=True):
                if isinstance(job, JobRejected):
                    self._dead_letter(message, job)
                    continue
                self._submitted[_position_of(message)] = job
                prepared.append(job)
            self.loop.submit(prepared)

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

    # --- answers from the engine loop: write ----------------------------------------------------

    def _collect(self) -> None:
        for outcome in self.loop.outcomes():  # an engine that cannot restart ends the worker
            self._answer(outcome)

    def _answer(self, outcome: Outcome) -> None:
        if isinstance(outcome, Evaluated):
            self._evaluated(outcome)
            return
        source = outcome.job.source
        position = _position_of(source)
        submitted = self._submitted.get(position)
        if submitted is None or submitted.source is not source:
            return  # its partition was revoked meanwhile; the next owner serves it
        del self._submitted[position]
        if isinstance(outcome, Answered):
            self._write_result(outcome.job, outcome.result)
        else:
            self._dead_letter(source, outcome.rejection)

    def _evaluated(self, outcome: Evaluated) -> None:
        """A shadow run's answer: compared with the serving one, never published."""
        serving = outcome.job.shadow_of
        assert serving is not None
        evaluation = evaluation_of(serving, outcome.result, self.settings.worker_id)
        self._shadow_summaries.add(evaluation)
        if self._evaluations is not None:
            self._evaluations.write(evaluation.job_id, evaluation)

    def _report_shadows(self, *, force: bool) -> None:
        if self._report_status is None:
            return
        for status in self._shadow_summaries.due(time.monotonic(), force=force):
            self._report_status(status)

    def _write_result(self, job: PreparedJob, result: Result) -> None:
        try:
            self._write_to_sinks(job, result)
        except (DeliveryFailed, KafkaException):
            raise  # the sink itself is broken, not this job
        except Exception as exc:  # this job's answer alone: dead-letter it, keep serving
            log.exception("result_write_failed", job_id=job.job.job_id, **traced(job.source))
            self._awaiting.pop(_position_of(job.source), None)
            self._dead_letter(job.source, JobRejected.internal(exc))

    def _write_to_sinks(self, job: PreparedJob, result: Result) -> None:
        source = job.source
        position = _position_of(source)
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
        points = self.offsets.committable()
        if not points:
            return True
        if self.sink.commit(points, self.source):
            self.offsets.mark_committed(points)
            self._commit_backoff_s = 0.0
            log.debug(
                "committed", positions={f"{t}[{p}]": c.position for (t, p), c in points.items()}
            )
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
        self.sink.flush(FLUSH_TIMEOUT_S)
        self._flush_parquet(force=True, only=revoked)
        self._commit()
        self._let_go(revoked)

    def _on_lost(self, partitions: list[TopicPartitionKey]) -> None:
        # Already someone else's (our session expired): commit nothing, drop everything.
        self._let_go(set(partitions))

    def _let_go(self, partitions: set[TopicPartitionKey]) -> None:
        for topic, partition in partitions:
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(topic, str(partition))
        self._next_lag_report = 0.0  # readiness follows the new assignment at once
        self.parquet.forget(partitions)
        self.sink.discard(partitions)
        # Their jobs are aborted in the engine rather than computed and dropped.
        self.loop.abort(lambda job: _partition_of(job) in partitions)
        dropped = [p for p in self._submitted if (p[0], p[1]) in partitions]
        for position in dropped:
            del self._submitted[position]
        for position in [p for p in self._awaiting if (p[0], p[1]) in partitions]:
            del self._awaiting[position]
        self.offsets.forget(list(partitions))
        log.info("partitions_released", partitions=sorted(partitions), dropped_jobs=len(dropped))
