"""Decode, route and tokenize: a consumed message becomes a `PreparedJob` or a `JobRejected`.

This is the stage where a job is routed. Everything that can be known before the engine runs
is checked here, so a bad message is dead-lettered without ever reaching `generate()`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import structlog
from pydantic import ValidationError

from workers.core.config import PipelineConfig
from workers.core.contracts import Job
from workers.core.engine_api import AdapterHandle, GenerationRequest
from workers.core.errors import JobError, JobRejected
from workers.core.messages import SourceMessage, traced
from workers.core.routing import AdapterResolver, route

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class PreparedJob:
    job: Job
    pipeline: PipelineConfig
    source: SourceMessage
    request: GenerationRequest
    arrived_at: float  # monotonic seconds, for admission and queue time
    received_at_ms: int  # wall clock, for the result's timings
    attempt: int = 0  # retries after an invalid output

    @property
    def adapter(self) -> AdapterHandle | None:
        return self.request.adapter

    @property
    def adapter_key(self) -> Hashable:
        return None if self.adapter is None else self.adapter.lora_id

    @property
    def tenant(self) -> str | None:
        return self.job.tenant


# Deeper JSON is refused: nothing a job needs nests this far, and deep structures exhaust
# recursion in the parsers and serializers after this stage.
MAX_JSON_DEPTH = 64


def decode_job(value: bytes | None) -> Job:
    """The job in a message's value; `JobRejected` for anything that is not one."""
    if value is None:
        raise JobRejected(JobError.INVALID_JSON, "message has no value")
    try:
        document = json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JobRejected(JobError.INVALID_JSON, f"value is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise JobRejected(JobError.INVALID_JSON, "value nests too deeply to parse") from exc
    except ValueError as exc:  # e.g. an integer literal past Python's digit limit
        raise JobRejected(JobError.INVALID_JSON, f"value is not usable JSON: {exc}") from exc
    _check_structure(document)
    try:
        return Job.model_validate(document)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        )
        raise JobRejected(
            JobError.INVALID_JOB, f"job does not match the job schema: {details}"
        ) from exc


def _check_structure(document: object) -> None:
    """Refuse nesting past MAX_JSON_DEPTH and text that is not valid Unicode (JSON escapes can
    carry lone surrogates, which no UTF-8 writer after this stage could encode)."""
    stack: list[tuple[object, int]] = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _check_text(node)
            continue
        if not isinstance(node, dict | list):
            continue
        if depth > MAX_JSON_DEPTH:
            raise JobRejected(JobError.INVALID_JOB, f"value nests deeper than {MAX_JSON_DEPTH}")
        if isinstance(node, dict):
            for key in node:
                _check_text(key)
            stack.extend((child, depth + 1) for child in node.values())
        else:
            stack.extend((child, depth + 1) for child in node)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise JobRejected(
            JobError.INVALID_JOB, f"text holds invalid Unicode at {exc.start}: {exc.reason}"
        ) from exc


@dataclass
class JobPreparer:
    pipelines_by_topic: dict[str, PipelineConfig]
    known_tasks: set[str]
    resolve_adapter: AdapterResolver
    tokenize: Callable[[str], list[int]]
    max_model_len: int
    max_job_bytes: int

    def prepare(self, message: SourceMessage) -> PreparedJob:
        """Raise `JobRejected` for anything that cannot be served as asked, and for anything
        else this one message makes go wrong (`internal_error`): never another exception."""
        try:
            return self._prepare(message)
        except JobRejected:
            raise
        except Exception as exc:
            log.exception(
                "prepare_failed", topic=message.topic, offset=message.offset, **traced(message)
            )
            raise JobRejected.internal(exc) from exc

    def _prepare(self, message: SourceMessage) -> PreparedJob:
        if message.value is not None and len(message.value) > self.max_job_bytes:
            raise JobRejected(
                JobError.JOB_TOO_LARGE,
                f"value of {len(message.value)} bytes exceeds max_job_bytes {self.max_job_bytes}",
            )
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
