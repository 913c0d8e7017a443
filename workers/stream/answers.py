"""Answers: each outcome of the engine loop, matched to the job submitted at its position, is
written to the pipeline's sinks (the Kafka sink, Parquet files) as a result, or as a dead
letter; a message is answered once every sink has its answer, and only then is its offset
finished for commits."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import structlog
from confluent_kafka import KafkaException

from workers import metrics
from workers.core.config import PipelineConfig, Settings
from workers.core.contracts import Result, adapter_label
from workers.core.errors import JobError, JobRejected
from workers.core.messages import SourceMessage, traced
from workers.core.offsets import OffsetTracker, TopicPartitionKey
from workers.core.prepare import PreparedJob
from workers.core.processing import Answered, Evaluated, Outcome
from workers.kafka.sinks import (
    DeliveryFailed,
    ResultSink,
    dead_letter_record,
    reply_topic_of,
    result_record,
)
from workers.parquet.kafka_results import ParquetResults
from workers.stream.intake import Position, Submitted, position_of

log = structlog.get_logger(__name__)


@dataclass
class RunSummary:
    answered: int = 0
    results: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    dead_letters: Counter[tuple[str, str]] = field(default_factory=Counter)
    output_tokens: int = 0
    engine_restarts: int = 0


@dataclass
class _AwaitingSinks:
    job: PreparedJob
    result: Result
    sinks_left: int


class AnswerWriter:
    def __init__(
        self,
        settings: Settings,
        pipelines: dict[str, PipelineConfig],
        sink: ResultSink,
        offsets: OffsetTracker,
        submitted: Submitted,
        summary: RunSummary,
        evaluated: Callable[[Evaluated], None],
    ) -> None:
        self._settings = settings
        self._pipelines_by_topic = {p.input_topic: p for p in pipelines.values()}
        self._sink = sink
        self._offsets = offsets
        self._submitted = submitted
        self._summary = summary
        self._evaluated = evaluated
        self.parquet = ParquetResults(pipelines)
        self._awaiting: dict[Position, _AwaitingSinks] = {}

    def outcome(self, outcome: Outcome) -> None:
        if isinstance(outcome, Evaluated):
            self._evaluated(outcome)  # a shadow run's answer: compared, never published
            return
        if not self._submitted.take(outcome.job):
            return  # its partition was revoked meanwhile; the next owner serves it
        if isinstance(outcome, Answered):
            self._result(outcome.job, outcome.result)
        else:
            self.dead_letter(outcome.job.source, outcome.rejection)

    def dead_letter(self, message: SourceMessage, rejection: JobRejected) -> None:
        pipeline = self._pipelines_by_topic[message.topic]
        topic = (
            self._settings.unknown_task_dlq
            if rejection.code is JobError.UNKNOWN_TASK
            else pipeline.dlq_topic
        )
        log.warning(
            "dead_letter",
            code=rejection.code,
            reason=rejection.message,
            source=f"{message.topic}[{message.partition}]@{message.offset}",
            **traced(message),
        )

        def written() -> None:
            self.answered(message)
            self._summary.dead_letters[(pipeline.task, rejection.code)] += 1
            metrics.DEAD_LETTERS.labels(pipeline.task, rejection.code).inc()

        record = dead_letter_record(
            topic, message, rejection, self._settings.sizes, reply_topic_of(message, rejection)
        )
        self._sink.write(position_of(message), record, written)

    def answered(self, message: SourceMessage) -> None:
        """Its answer is written or held for the commit: the offset may be committed."""
        self._offsets.mark_answered(message.topic, message.partition, message.offset)
        self._summary.answered += 1

    def _result(self, job: PreparedJob, result: Result) -> None:
        try:
            self._write_to_sinks(job, result)
        except (DeliveryFailed, KafkaException):
            raise  # the sink itself is broken, not this job
        except Exception as exc:  # this job's answer alone: dead-letter it, keep serving
            log.exception("result_write_failed", job_id=job.job.job_id, **traced(job.source))
            self._awaiting.pop(position_of(job.source), None)
            self.dead_letter(job.source, JobRejected.internal(exc))

    def _write_to_sinks(self, job: PreparedJob, result: Result) -> None:
        source = job.source
        position = position_of(source)
        sinks = job.pipeline.sinks
        self._awaiting[position] = _AwaitingSinks(job, result, len(sinks))
        if "kafka" in sinks:
            record = result_record(
                job.pipeline.result_topic,
                job.pipeline.dlq_topic,
                result,
                self._settings.sizes,
                source.traceparent,
                job.job.reply_to,
            )
            self._sink.write(position, record, partial(self.sink_done, position))
        if "parquet" in sinks:
            self.parquet.add(source.topic, source.partition, source.offset, result)

    def sink_done(self, position: Position) -> None:
        """One sink has the result at `position`; answered once every sink has it."""
        awaiting = self._awaiting.get(position)
        if awaiting is None:
            return  # a partition revoked meanwhile
        awaiting.sinks_left -= 1
        if awaiting.sinks_left > 0:
            return
        del self._awaiting[position]
        result = awaiting.result
        adapter = adapter_label(
            result.adapter and result.adapter.name, result.adapter and result.adapter.version
        )
        self.answered(awaiting.job.source)
        self._summary.results[(result.task, result.status.value, adapter)] += 1
        self._summary.output_tokens += result.usage.completion_tokens
        metrics.record_result(result, int(time.time() * 1000))

    def forget(self, partitions: set[TopicPartitionKey]) -> None:
        """Partitions let go: their unwritten answers are the next owner's to give."""
        self.parquet.forget(partitions)
        for position in [p for p in self._awaiting if (p[0], p[1]) in partitions]:
            del self._awaiting[position]
