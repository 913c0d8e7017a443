"""Generate one micro-batch and turn every output into a checked `Result`, or a retry.

This is the stage where jobs are generated and validated; the Kafka worker and the bulk runner
both use it, so a job is served the same way whichever door it came in by.

Where a task has an output schema, generation is constrained to it (vLLM structured outputs)
and then still validated (jsonschema, formats checked). An output that is invalid or cut off by
`max_tokens` is retried with a larger token budget up to the pipeline's
`invalid_output_retries`; after that it becomes an `invalid_output` result with the reason,
never dropped.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from workers import metrics
from workers.core.config import PipelineConfig
from workers.core.contracts import AdapterRef, Result, ResultStatus, Timings, Usage
from workers.core.crashes import run_isolating_crashes
from workers.core.engine_api import AdapterHandle, Engine, Generation
from workers.core.errors import JobError, JobRejected
from workers.core.messages import traced
from workers.core.prepare import PreparedJob
from workers.core.validation import OutputValidator

log = structlog.get_logger(__name__)


class AdapterLoader(Protocol):
    """Loads a batch's adapters into the engine before `generate` (`workers.adapters.cache`);
    returns those that could not be loaded (LoRA id: reason)."""

    def ensure_loaded(self, adapters: Iterable[AdapterHandle | None]) -> dict[int, str]: ...


@dataclass(frozen=True)
class BatchOutcome:
    results: list[tuple[PreparedJob, Result]]
    retries: list[PreparedJob]  # back to the batcher with a larger token budget
    output_tokens: int
    failed: list[tuple[PreparedJob, Exception]]  # raised while turned into a result
    # Adapter versions whose files could not be loaded again, with the reason.
    unavailable: list[tuple[AdapterHandle, str]] = field(default_factory=list)


@dataclass(frozen=True)
class ServedBatch:
    """A micro-batch after fault isolation: every job is a result, a retry or unserved."""

    results: list[tuple[PreparedJob, Result]]
    retries: list[PreparedJob]
    unserved: list[tuple[PreparedJob, JobRejected]]  # engine_crash, internal_error...
    unavailable: list[tuple[AdapterHandle, str]]  # for the registry to stop routing to
    output_tokens: int
    engine_restarts: int


def _as_rejection(error: Exception) -> JobRejected:
    return error if isinstance(error, JobRejected) else JobRejected.internal(error)


class BatchProcessor:
    def __init__(
        self,
        engine: Engine,
        cache: AdapterLoader,
        pipelines: dict[str, PipelineConfig],
        *,
        restart_engine: Callable[[], None],
        crash_attempts: int,
    ) -> None:
        self._engine = engine
        self._cache = cache
        self._validators = {task: OutputValidator(p.output_schema) for task, p in pipelines.items()}
        self._restart_engine = restart_engine
        self._crash_rejection = JobRejected(
            JobError.ENGINE_CRASH, f"the engine died {crash_attempts} times running this job alone"
        )
        self._crash_attempts = crash_attempts

    def serve(self, batch: list[PreparedJob]) -> ServedBatch:
        """`run`, with a dead engine restarted and the batch bisected (`crashes.py`)."""
        guarded = run_isolating_crashes(batch, self.run, self._restart_engine, self._crash_attempts)
        failed = guarded.failed + [f for outcome in guarded.outcomes for f in outcome.failed]
        return ServedBatch(
            results=[pair for outcome in guarded.outcomes for pair in outcome.results],
            retries=[job for outcome in guarded.outcomes for job in outcome.retries],
            unserved=[(job, self._crash_rejection) for job in guarded.crashed]
            + [(job, _as_rejection(error)) for job, error in failed],
            unavailable=[lost for outcome in guarded.outcomes for lost in outcome.unavailable],
            output_tokens=sum(outcome.output_tokens for outcome in guarded.outcomes),
            engine_restarts=guarded.restarts,
        )

    def run(self, batch: list[PreparedJob]) -> BatchOutcome:
        failed: list[tuple[PreparedJob, Exception]] = []
        unavailable = self._cache.ensure_loaded(job.adapter for job in batch)
        lost: dict[int, AdapterHandle] = {}
        if unavailable:
            for job in batch:
                if job.adapter is not None and job.adapter.lora_id in unavailable:
                    lost[job.adapter.lora_id] = job.adapter
                    reason = unavailable[job.adapter.lora_id]
                    failed.append((job, JobRejected(JobError.ADAPTER_UNAVAILABLE, reason)))
            batch = [job for job in batch if job.adapter_key not in unavailable]
        outcome = self._generate(batch, failed) if batch else BatchOutcome([], [], 0, failed)
        outcome.unavailable.extend((handle, unavailable[i]) for i, handle in lost.items())
        return outcome

    def _generate(
        self, batch: list[PreparedJob], failed: list[tuple[PreparedJob, Exception]]
    ) -> BatchOutcome:
        handed_at = time.monotonic()
        generations = self._engine.generate([job.request for job in batch])
        generate_ms = (time.monotonic() - handed_at) * 1000
        output_tokens = sum(g.completion_tokens for g in generations)
        adapters = len({job.adapter_key for job in batch})
        metrics.GENERATE_SECONDS.observe(generate_ms / 1000)
        metrics.BATCH_JOBS.observe(len(batch))
        metrics.BATCH_ADAPTERS.observe(adapters)
        log.info(
            "batch_done",
            jobs=len(batch),
            adapters=adapters,
            generate_ms=round(generate_ms, 1),
            output_tokens=output_tokens,
        )
        results: list[tuple[PreparedJob, Result]] = []
        retries: list[PreparedJob] = []
        for job, generation in zip(batch, generations, strict=True):
            try:
                result = self._build_result(job, generation, handed_at, generate_ms)
            except Exception as exc:  # this job's answer alone is lost, as internal_error
                log.exception("result_failed", job_id=job.job.job_id, **traced(job.source))
                failed.append((job, exc))
                continue
            retry = self._retry_of(job, result)
            if retry is not None:
                retries.append(retry)
                continue
            if job.pipeline.output_schema is not None:
                labels = metrics.result_labels(result)
                valid = str(result.status is ResultStatus.OK).lower()
                metrics.SCHEMA_COMPLIANCE.labels(*labels, valid).inc()
            results.append((job, result))
        return BatchOutcome(results, retries, output_tokens, failed)

    def _retry_of(self, job: PreparedJob, result: Result) -> PreparedJob | None:
        pipeline = job.pipeline
        if result.status is not ResultStatus.INVALID_OUTPUT:
            return None
        if job.attempt >= pipeline.invalid_output_retries:
            return None
        room = self._engine.max_model_len - len(job.request.prompt_token_ids)
        budget = min(room, int(job.request.max_tokens * pipeline.retry_token_factor))
        if budget <= job.request.max_tokens:
            return None  # no larger budget fits the context; the invalid result stands
        log.info(
            "invalid_output_retry",
            job_id=job.job.job_id,
            **traced(job.source),
            code=result.error.code if result.error else None,
            max_tokens=budget,
        )
        request = dataclasses.replace(job.request, max_tokens=budget)
        return dataclasses.replace(job, request=request, attempt=job.attempt + 1)

    def _build_result(
        self, job: PreparedJob, generation: Generation, handed_at: float, generate_ms: float
    ) -> Result:
        checked = self._validators[job.pipeline.task].check(
            generation.text, generation.finish_reason
        )
        adapter = job.adapter
        return Result(
            job_id=job.job.job_id,
            task=job.pipeline.task,
            status=checked.status,
            output=checked.output,
            raw_output=generation.text,
            adapter=None
            if adapter is None
            else AdapterRef(name=adapter.name, version=adapter.version, sha256=adapter.sha256),
            usage=Usage(
                prompt_tokens=len(job.request.prompt_token_ids),
                completion_tokens=generation.completion_tokens,
            ),
            error=checked.error,
            metadata=job.job.metadata,
            timings=Timings(
                enqueued_at_ms=job.source.timestamp_ms,
                received_at_ms=job.received_at_ms,
                completed_at_ms=int(time.time() * 1000),
                queue_ms=round((handed_at - job.arrived_at) * 1000, 3),
                generate_ms=round(generate_ms, 3),
            ),
        )
