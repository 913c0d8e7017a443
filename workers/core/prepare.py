"""Decode, route and tokenize: a consumed message becomes a `PreparedJob` or a `JobRejected`.

This is the stage where a job is routed. Everything that can be known before the engine runs
is checked here, so a bad message is dead-lettered without ever reaching `generate()`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from pydantic import ValidationError

from workers.core.config import PipelineConfig
from workers.core.contracts import Job
from workers.core.engine_api import AdapterHandle, GenerationRequest
from workers.core.errors import JobError, JobRejected
from workers.core.messages import SourceMessage
from workers.core.routing import AdapterResolver, route


@dataclass(frozen=True)
class PreparedJob:
    job: Job
    pipeline: PipelineConfig
    source: SourceMessage
    request: GenerationRequest
    arrived_at: float  # monotonic seconds, for linger and queue time
    received_at_ms: int  # wall clock, for the result's timings
    attempt: int = 0  # retries after an invalid output

    @property
    def adapter(self) -> AdapterHandle | None:
        return self.request.adapter

    @property
    def adapter_key(self) -> Hashable:
        return None if self.adapter is None else self.adapter.lora_id


def decode_job(value: bytes | None) -> Job:
    if value is None:
        raise JobRejected(JobError.INVALID_JSON, "message has no value")
    try:
        document = json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JobRejected(JobError.INVALID_JSON, f"value is not JSON: {exc}") from exc
    try:
        return Job.model_validate(document)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        )
        raise JobRejected(
            JobError.INVALID_JOB, f"job does not match the job schema: {details}"
        ) from exc


@dataclass
class JobPreparer:
    pipelines_by_topic: dict[str, PipelineConfig]
    known_tasks: set[str]
    resolve_adapter: AdapterResolver
    tokenize: Callable[[str], list[int]]
    max_model_len: int

    def prepare(self, message: SourceMessage) -> PreparedJob:
        """Raise `JobRejected` for anything that cannot be served as asked."""
        pipeline = self.pipelines_by_topic[message.topic]
        job = decode_job(message.value)
        if job.task != pipeline.task:
            if job.task not in self.known_tasks:
                raise JobRejected(JobError.UNKNOWN_TASK, f"no pipeline serves task {job.task!r}")
            raise JobRejected(
                JobError.TASK_MISMATCH,
                f"job for task {job.task!r} arrived on {message.topic}, "
                f"the topic of task {pipeline.task!r}",
            )
        adapter = route(job, pipeline, self.resolve_adapter)
        params = job.params
        defaults = pipeline.sampling
        max_tokens = params.max_tokens if params and params.max_tokens else defaults.max_tokens
        prompt_ids = self.tokenize(pipeline.render_prompt(job.input))
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise JobRejected(
                JobError.CONTEXT_EXCEEDED,
                f"prompt of {len(prompt_ids)} tokens plus max_tokens {max_tokens} exceeds the "
                f"model's context of {self.max_model_len} tokens",
            )
        request = GenerationRequest(
            prompt_token_ids=prompt_ids,
            adapter=adapter,
            max_tokens=max_tokens,
            temperature=(
                params.temperature
                if params and params.temperature is not None
                else defaults.temperature
            ),
            seed=params.seed if params and params.seed is not None else defaults.seed,
            json_schema=pipeline.output_schema if pipeline.structured_output else None,
        )
        return PreparedJob(
            job=job,
            pipeline=pipeline,
            source=message,
            request=request,
            arrived_at=time.monotonic(),
            received_at_ms=int(time.time() * 1000),
        )
