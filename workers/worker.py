"""The worker loop: consume → prepare (decode, route, tokenize) → submit to the engine loop
(admission by adapter and tenant, generation, validation) → write → commit. Data flows one way;
each stage is a small unit in `workers/stream/` (intake, answers, commits, adapter maintenance)
with fast tests on fakes; this module runs them and owns the lifecycle: start, the rebalance
callbacks, readiness and shutdown.

The engine loop (`workers.engine.loop`) owns the engine on its own thread and hands back each
job as soon as its request finishes; this thread keeps polling Kafka (group membership,
rebalances, fetching the next jobs) and writing answers however busy the engine is, so nothing
exceeds max.poll.interval.ms. Adapter updates are applied on the engine loop's thread, between
engine steps (`workers/stream/maintenance.py`).

A message is answered once its answer (result or dead letter) is written or held by the sink.
Commits never pass an unanswered offset, and carry a ledger of the offsets answered beyond it,
skipped when the partition is read again (`offsets.py`). Exactly-once by default: the answers a
commit covers and the commit are one transaction (`transactions.py`).
"""

from __future__ import annotations

import contextlib
import gc
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import structlog

from workers import metrics
from workers.adapters.feed import AdapterUpdateFeed
from workers.core.config import PipelineConfig, Settings
from workers.core.contracts import AdapterStatus
from workers.core.evaluation import ShadowSummaries
from workers.core.offsets import OffsetTracker, TopicPartitionKey
from workers.core.prepare import PreparedJob
from workers.core.processing import Evaluated, evaluation_of
from workers.health import Readiness
from workers.kafka.sinks import ResultSink
from workers.kafka.source import KafkaJobSource, RebalanceHandlers
from workers.kafka.status import NoticeWriter
from workers.serving import Serving
from workers.stream.answers import AnswerWriter, RunSummary
from workers.stream.commits import FLUSH_TIMEOUT_S, CommitCoordinator
from workers.stream.intake import POLL_WHILE_BUSY_S, Intake, Submitted
from workers.stream.maintenance import AdapterMaintenance

log = structlog.get_logger(__name__)

LAG_REPORT_INTERVAL_S = 2.0
LOOP_JOIN_TIMEOUT_S = 30.0

__all__ = ["RunLimits", "RunSummary", "Worker"]


@dataclass(frozen=True)
class RunLimits:
    max_jobs: int | None = None  # exit after this many messages are answered
    idle_exit_s: float | None = None  # exit after this long with nothing to do


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
        evaluations: NoticeWriter | None = None,
        report_status: Callable[[AdapterStatus], None] | None = None,
    ) -> None:
        self.settings = settings
        self.serving = serving
        self.loop = serving.loop
        self.sink = sink
        self.offsets = OffsetTracker()
        self.summary = RunSummary()
        self.source = source_factory(
            RebalanceHandlers(revoked=self._on_revoked, lost=self._on_lost)
        )
        self.submitted = Submitted()
        # Routing jobs and submitting them happen under this lock, and so does unloading
        # unused adapter versions.
        routing = threading.Lock()
        self.answers = AnswerWriter(
            settings, pipelines, sink, self.offsets, self.submitted, self.summary, self._evaluated
        )
        self.intake = Intake(
            self.source,
            self.offsets,
            serving.preparer,
            self.loop.submit,
            self.submitted,
            routing,
            consume_batch=settings.admission.consume_batch,
            max_in_flight=settings.admission.max_in_flight,
            in_flight=lambda: self.offsets.unanswered_count() + self.sink.held(),
            answered_before=self.answers.answered,
            reject=self.answers.dead_letter,
        )
        self.commits = CommitCoordinator(
            self.offsets,
            sink,
            self.source,
            interval_s=settings.commit_interval_ms / 1000,
            backoff_max_s=settings.delivery.retry_backoff_max_s,
        )
        self.maintenance = AdapterMaintenance(
            updates, serving.registry, serving.cache, self.loop, routing
        )
        self._topics = sorted(p.input_topic for p in pipelines.values())
        self._stop_requested = False
        self._readiness = readiness or Readiness()
        self._next_lag_report = 0.0
        self._evaluations = evaluations
        self._report_status = report_status
        self._shadow_summaries = ShadowSummaries(
            settings.shadow.summary_window, settings.shadow.status_interval_s, settings.worker_id
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        self._stop_requested = True

    def run(self, limits: RunLimits) -> RunSummary:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        last_activity = time.monotonic()
        log.info("worker_started", topics=self._topics, delivery=self.settings.delivery.mode)
        self.loop.start(between_steps=self.maintenance.between_steps)
        # What start-up made (the engine's and its libraries' objects, hundreds of thousands)
        # lives as long as the worker: kept out of the collector's passes, which otherwise
        # rescan it all, 40 of every 160 µs of CPU a job costs (bench/overhead.py). The cost:
        # should any of it become cyclic garbage (an engine restart's old client), it stays.
        gc.freeze()
        try:
            while not self._should_stop(limits):
                messages = self.intake.consume(busy=self._busy())
                # Waiting for a partition's committed offset is not idleness: its jobs are
                # still to come.
                active = bool(messages) or self._busy() or self.source.fetch_pending()
                self.intake.accept(messages)
                self._collect()
                self._report_shadows(force=False)
                self.sink.poll()
                self._flush_parquet()
                self.commits.commit_if_due()
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
        self._readiness.update(joined=self.source.joined())
        for (topic, partition), behind in self.source.lag().items():
            metrics.CONSUMER_LAG.labels(topic, str(partition)).set(behind)

    def _busy(self) -> bool:
        return bool(
            len(self.submitted)
            or self.offsets.unanswered_count()
            or self.sink.held()
            or self.loop.shadow_runs()
        )

    def _should_stop(self, limits: RunLimits) -> bool:
        if self._stop_requested:
            return True
        return limits.max_jobs is not None and self.summary.answered >= limits.max_jobs

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
            not_started = len(self.submitted) - abandoned
            self.sink.flush(FLUSH_TIMEOUT_S)
            self._flush_parquet(force=True)
            self.commits.commit()
            self._report_shadows(force=True)
        finally:
            self.loop.stop(LOOP_JOIN_TIMEOUT_S)  # aborts what is still in the engine
            self.source.close()  # leaves the group; partitions move at once
            self.sink.close()
            self.maintenance.close()
            self.summary.engine_restarts = self.loop.stats.engine_restarts
            log.info(
                "worker_stopped",
                answered=self.summary.answered,
                output_tokens=self.summary.output_tokens,
                abandoned=abandoned,
                not_started=not_started,
                engine_restarts=self.summary.engine_restarts,
                adapter_cache=vars(self.serving.cache.stats),
            )

    def _await_engine(self, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        while self.loop.in_engine() and time.monotonic() < deadline:
            self.source.consume(1, POLL_WHILE_BUSY_S)  # paused: serves callbacks only
            self._collect()
            self.sink.poll()
        self._collect()
        if self.loop.running():
            log.warning("jobs_abandoned", jobs=self.loop.running(), deadline_s=deadline_s)

    # --- answers -------------------------------------------------------------------------------

    def _collect(self) -> None:
        for outcome in self.loop.outcomes():  # an engine that cannot restart ends the worker
            self.answers.outcome(outcome)

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

    # --- Parquet files ---------------------------------------------------------------------------

    def _flush_parquet(
        self, *, force: bool = False, only: set[TopicPartitionKey] | None = None
    ) -> None:
        parquet = self.answers.parquet
        # The consumer says which partitions are ours to publish files for, and from where.
        parquet.flush(
            parquet.owner(self.source, self.offsets.resumed),
            self.offsets.first_unanswered_outside,
            self._parquet_written,
            self._commit_parquet_file,
            force=force,
            only=only,
        )

    def _parquet_written(self, key: TopicPartitionKey, offsets: list[int]) -> None:
        for offset in offsets:
            self.answers.sink_done((*key, offset))

    def _commit_parquet_file(self) -> bool:
        # Commit before the partition's next file: at most one file is beyond the committed
        # position, named after it, which the next owner deletes before it replays from there.
        return self.commits.commit_before_publishing()

    # --- rebalances ----------------------------------------------------------------------------

    def _on_revoked(self, partitions: list[TopicPartitionKey]) -> None:
        # Still ours for the length of this call: commit what is answered (bounded by the
        # sink's call timeouts), then let go; the next owner starts from that commit.
        revoked = set(partitions)
        # What is not answered yet is not in this commit whatever happens: stop computing it
        # now (the engine applies the abort at its next step), not after a commit that may
        # take seconds when the transaction coordinator is busy with the rebalance.
        self.loop.abort(lambda job: _partition_of(job) in revoked)
        self.sink.flush(FLUSH_TIMEOUT_S)
        self._flush_parquet(force=True, only=revoked)
        self.commits.commit()
        self._let_go(revoked)

    def _on_lost(self, partitions: list[TopicPartitionKey]) -> None:
        # Already someone else's (our session expired): commit nothing, drop everything.
        self._let_go(set(partitions))

    def _let_go(self, partitions: set[TopicPartitionKey]) -> None:
        for topic, partition in partitions:
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(topic, str(partition))
        self._next_lag_report = 0.0  # readiness follows the new assignment at once
        self.answers.forget(partitions)
        self.sink.discard(partitions)
        # Their jobs are aborted in the engine rather than computed and dropped.
        self.loop.abort(lambda job: _partition_of(job) in partitions)
        dropped = self.submitted.drop(partitions)
        self.offsets.forget(list(partitions))
        log.info("partitions_released", partitions=sorted(partitions), dropped_jobs=dropped)
