"""Turn each finished request into a checked `Result`, or a retry.

This is the stage where outputs are validated; the engine loop calls it for every request as it
finishes, so the Kafka worker and the bulk runner serve a job the same way whichever door it
came in by.

Where a task has an output schema, generation is constrained to it (vLLM structured outputs)
and then still validated (jsonschema, formats checked). An output that is invalid or cut off by
`max_tokens` is retried with a larger token budget up to the pipeline's
`invalid_output_retries`; after that it becomes an `invalid_output` result with the reason,
never dropped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from workers import metrics
from workers.core.config import PipelineConfig
from workers.core.contracts import (
    AdapterRef,
    Result,
    ResultStatus,
    ShadowEvaluation,
    Timings,
    Usage,
)
from workers.core.engine_api import AdapterHandle, Generation
from workers.core.errors import JobRejected
from workers.core.messages import traced
from workers.core.prepare import PreparedJob
from workers.core.routing import Router, classifier_route
from workers.core.validation import OutputValidator

log = structlog.get_logger(__name__)

MAX_CACHED_REFS = 4096


class AdapterLoader(Protocol):
    """Loads adapters into the engine before their first job enters it
    (`workers.adapters.cache`); returns those that could not be loaded (LoRA id: reason)."""

    def ensure_loaded(self, adapters: Iterable[AdapterHandle | None]) -> dict[int, str]: ...


@dataclass(frozen=True)
class Answered:
    job: PreparedJob
    result: Result


@dataclass(frozen=True)
class Unserved:
    """A job given up on, to be dead-lettered: engine_crash, adapter_unavailable, internal."""

    job: PreparedJob
    rejection: JobRejected


@dataclass(frozen=True)
class Evaluated:
    """A shadow run finished: its result beside the serving answer (`job.shadow_of`)."""

    job: PreparedJob
    result: Result


Outcome = Answered | Unserved | Evaluated


def same_json(left: object, right: object) -> bool:
    """Equal as JSON values: Python's `==` says `True == 1` and `1 == 1.0`; JSON does not."""
    return json.dumps(left, sort_keys=True) == json.dumps(right, sort_keys=True)


def evaluation_of(serving: Result, shadow: Result, worker: str) -> ShadowEvaluation:
    """How a shadow version's answer compares with the serving version's for one job."""
    assert serving.adapter is not None and shadow.adapter is not None
    return ShadowEvaluation(
        job_id=serving.job_id,
        task=serving.task,
        adapter=serving.adapter.name,
        serving=serving.adapter,
        shadow=shadow.adapter,
        identical_text=serving.raw_output == shadow.raw_output,
        identical_output=same_json(serving.output, shadow.output),
        serving_valid=serving.status is ResultStatus.OK,
        shadow_valid=shadow.status is ResultStatus.OK,
        serving_tokens=serving.usage.completion_tokens,
        shadow_tokens=shadow.usage.completion_tokens,
        serving_latency_ms=serving.timings.generate_ms,
        shadow_latency_ms=shadow.timings.generate_ms,
        serving_output=serving.raw_output,
        shadow_output=shadow.raw_output,
        worker=worker,
        at_ms=int(time.time() * 1000),
    )


class OutputChecker:
    def __init__(
        self, pipelines: dict[str, PipelineConfig], max_model_len: int, router: Router
    ) -> None:
        self._validators = {task: OutputValidator(p.output_schema) for task, p in pipelines.items()}
        self._max_model_len = max_model_len
        self._router = router
        # Per job, these would be looked up (a metric's labels) or built (a contract) again.
        self._compliance: dict[tuple[str, ...], Any] = {}
        self._adapter_refs: dict[AdapterHandle, AdapterRef] = {}

    def check(
        self, job: PreparedJob, generation: Generation, admitted_at: float
    ) -> Result | PreparedJob:
        """The job's result, or the job again: with a larger token budget (a retry), or on the
        adapter its classifier pass chose. Raises `JobRejected` if that adapter cannot serve
        the job."""
        if job.classifying is not None:
            return self._after_classifier(job, generation)
        generate_ms = (time.monotonic() - admitted_at) * 1000
        result = self._build_result(job, generation, admitted_at, generate_ms)
        retry = self._retry_of(job, result)
        if retry is not None:
            return retry
        if job.pipeline.output_schema is not None and job.shadow_of is None:
            labels = (*metrics.result_labels(result), str(result.status is ResultStatus.OK).lower())
            series = self._compliance.get(labels)
            if series is None:
                series = self._compliance[labels] = metrics.SCHEMA_COMPLIANCE.labels(*labels)
            series.inc()
        return result

    def _after_classifier(self, job: PreparedJob, generation: Generation) -> PreparedJob:
        classifier = job.pipeline.routing.classifier
        assert classifier is not None
        usage = Usage(
            prompt_tokens=len(job.request.prompt_token_ids),
            completion_tokens=generation.completion_tokens,
        )
        route = classifier_route(generation.text, classifier, usage)
        if route.fallback:
            log.warning("classifier_no_label", job_id=job.job.job_id, output=generation.text[:200])
        return job.routed(route, self._router)

    def _retry_of(self, job: PreparedJob, result: Result) -> PreparedJob | None:
        pipeline = job.pipeline
        if result.status is not ResultStatus.INVALID_OUTPUT:
            return None
        if job.attempt >= pipeline.invalid_output_retries:
            return None
        room = self._max_model_len - len(job.request.prompt_token_ids)
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

    def _adapter_ref(self, adapter: AdapterHandle | None) -> AdapterRef | None:
        if adapter is None:
            return None
        ref = self._adapter_refs.get(adapter)
        if ref is None:
            if len(self._adapter_refs) >= MAX_CACHED_REFS:  # versions come and go
                self._adapter_refs.clear()
            ref = AdapterRef(name=adapter.name, version=adapter.version, sha256=adapter.sha256)
            self._adapter_refs[adapter] = ref
        return ref

    def _build_result(
        self, job: PreparedJob, generation: Generation, handed_at: float, generate_ms: float
    ) -> Result:
        checked = self._validators[job.pipeline.task].check(
            generation.text, generation.finish_reason
        )
        return Result(
            job_id=job.job.job_id,
            task=job.pipeline.task,
            status=checked.status,
            output=checked.output,
            raw_output=generation.text,
            adapter=self._adapter_ref(job.adapter),
            served_by=generation.served_by,
            usage=Usage(
                prompt_tokens=len(job.request.prompt_token_ids),
                completion_tokens=generation.completion_tokens,
            ),
            route=job.route,
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
