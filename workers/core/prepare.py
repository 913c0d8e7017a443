"""Decode, route and tokenize: a consumed message becomes a `PreparedJob` or a `JobRejected`.

This is the stage where a job is routed. Everything that can be known before the engine runs
is checked here, so a bad message is dead-lettered without ever reaching `generate()`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog
from pydantic import ValidationError

from workers.core.config import PipelineConfig, SamplingOutOfBounds
from workers.core.contracts import Job, Result, RouteInfo, validation_details
from workers.core.engine_api import (
    AdapterHandle,
    ChatRenderError,
    ChatTemplateMissing,
    GenerationRequest,
)
from workers.core.errors import JobError, JobRejected
from workers.core.messages import SourceMessage, traced
from workers.core.routing import Router, embedding_route, rule_route
from workers.core.validation import UNREAD, fast_json

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class PreparedJob:
    job: Job
    pipeline: PipelineConfig
    source: SourceMessage
    request: GenerationRequest
    arrived_at: float  # monotonic seconds, for admission and queue time
    received_at_ms: int  # wall clock when routed, for the result's timings
    attempt: int = 0  # retries after an invalid output
    route: RouteInfo | None = None  # None while a classifier pass decides it
    # During the classifier pass (`request` is that pass): the job's own request, its adapter
    # filled in from the label.
    classifying: GenerationRequest | None = None
    shadow_request: GenerationRequest | None = None  # also run on a shadow version, after
    shadow_of: Result | None = None  # a shadow run: the serving answer it is compared with

    # Admission and the engine loop read these many times per job: attributes, set once.
    adapter: AdapterHandle | None = field(init=False, repr=False, compare=False)
    adapter_key: Hashable = field(init=False, repr=False, compare=False)
    tenant: str | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        adapter = self.request.adapter
        object.__setattr__(self, "adapter", adapter)
        object.__setattr__(self, "adapter_key", None if adapter is None else adapter.lora_id)
        object.__setattr__(self, "tenant", self.job.tenant)

    @property
    def holds(self) -> list[Hashable]:
        """The adapter versions this job still needs in the engine (a version leaves the
        engine only when no job holds it)."""
        keys = [self.adapter_key]
        if self.shadow_request is not None and self.shadow_request.adapter is not None:
            keys.append(self.shadow_request.adapter.lora_id)
        return keys

    def routed(
        self, route: RouteInfo, router: Router, received_at_ms: int | None = None
    ) -> PreparedJob:
        """This job on the adapter `route` names, with its shadow run if it has one
        (`received_at_ms`: when the version was picked, if now)."""
        own = self.classifying or self.request
        handle, shadow = router.handles(route, self.job)
        return dataclasses.replace(
            self,
            request=_on_adapter(own, handle),
            route=route,
            classifying=None,
            shadow_request=None if shadow is None else _on_adapter(own, shadow),
            received_at_ms=self.received_at_ms if received_at_ms is None else received_at_ms,
        )

    def as_shadow_run(self, serving: Result) -> PreparedJob | None:
        """The run on the shadow version that follows this job's answer, if it has one."""
        if self.shadow_request is None:
            return None
        return dataclasses.replace(
            self, request=self.shadow_request, shadow_request=None, shadow_of=serving, attempt=0
        )


def _on_adapter(request: GenerationRequest, adapter: AdapterHandle | None) -> GenerationRequest:
    return request if request.adapter is adapter else dataclasses.replace(request, adapter=adapter)


# Deeper JSON is refused: nothing a job needs nests this far, and deep structures exhaust
# recursion in the parsers and serializers after this stage.
MAX_JSON_DEPTH = 64


def decode_job(value: bytes | None) -> Job:
    """The job in a message's value; `JobRejected` for anything that is not one."""
    if value is None:
        raise JobRejected(JobError.INVALID_JSON, "message has no value")
    document = fast_json(value)
    if document is UNREAD:
        document = _standard_json(value)
        _check_structure(document)
    elif value.count(b"[") + value.count(b"{") > MAX_JSON_DEPTH:
        # Only then can it nest past the limit. Its text is valid Unicode: orjson refuses
        # lone surrogates.
        _check_structure(document)
    try:
        return Job.model_validate(document)
    except ValidationError as exc:
        raise JobRejected(
            JobError.INVALID_JOB, f"job does not match the job schema: {validation_details(exc)}"
        ) from exc


def _standard_json(value: bytes) -> object:
    try:
        return json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JobRejected(JobError.INVALID_JSON, f"value is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise JobRejected(JobError.INVALID_JSON, "value nests too deeply to parse") from exc
    except ValueError as exc:  # e.g. an integer literal past Python's digit limit
        raise JobRejected(JobError.INVALID_JSON, f"value is not usable JSON: {exc}") from exc


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
    router: Router
    tokenize: Callable[[str], list[int]]
    # Engine.render_chat: a conversation and a template override (None: the tokenizer's own).
    render_chat: Callable[[Sequence[Mapping[str, str]], str | None], list[int]]
    max_model_len: int
    max_job_bytes: int

    def prepare(self, message: SourceMessage) -> PreparedJob:
        """Raise `JobRejected` for anything that cannot be served as asked, and for anything
        else this one message makes go wrong (`internal_error`): never another exception."""
        prepared = self.prepare_many([message])[0]
        if isinstance(prepared, JobRejected):
            raise prepared
        return prepared

    def prepare_many(self, messages: list[SourceMessage]) -> list[PreparedJob | JobRejected]:
        """Each message's job or the reason it is refused."""
        return self.route_all(self.stage_all(messages))

    def stage_all(self, messages: list[SourceMessage]) -> list[PreparedJob | JobRejected]:
        """Decode, check and tokenize each message, and decide its route (inputs routed by
        embedding are embedded together, one call for the batch); no adapter version is
        picked yet (`route_all`), so this can run while adapters change."""
        staged: list[PreparedJob | JobRejected] = []
        for message in messages:
            try:
                staged.append(self._stage(message))
            except JobRejected as rejection:
                staged.append(rejection)
            except Exception as exc:
                staged.append(self._internal(message, exc))
        self._route_by_embedding(staged)
        return staged

    def route_all(self, staged: list[PreparedJob | JobRejected]) -> list[PreparedJob | JobRejected]:
        """Pick the adapter versions each staged job runs on (canary and shadow shares)."""
        return [job if isinstance(job, JobRejected) else self._routed(job) for job in staged]

    def _routed(self, job: PreparedJob) -> PreparedJob | JobRejected:
        try:
            # The version is picked now: a job received before an adapter update is served
            # by the version before it, one received after by the new one.
            now_ms = int(time.time() * 1000)
            if job.route is not None:
                return job.routed(job.route, self.router, received_at_ms=now_ms)
            classifier = job.pipeline.routing.classifier
            assert classifier is not None and job.classifying is not None
            handle = self.router.resolve(classifier.adapter, job.job)
            return dataclasses.replace(
                job, request=_on_adapter(job.request, handle), received_at_ms=now_ms
            )
        except JobRejected as rejection:
            return rejection
        except Exception as exc:
            return self._internal(job.source, exc)

    def _internal(self, message: SourceMessage, exc: Exception) -> JobRejected:
        log.exception(
            "prepare_failed", topic=message.topic, offset=message.offset, **traced(message)
        )
        return JobRejected.internal(exc)

    def _route_by_embedding(self, staged: list[PreparedJob | JobRejected]) -> None:
        waiting: dict[str, list[tuple[int, PreparedJob]]] = {}
        for index, job in enumerate(staged):
            if isinstance(job, PreparedJob) and job.route is None and job.classifying is None:
                waiting.setdefault(job.pipeline.task, []).append((index, job))
        for task, jobs in waiting.items():
            try:
                if self.router.nearest is None:
                    raise RuntimeError("no embedding router is configured")
                nearest = self.router.nearest(task, [job.job.text for _, job in jobs])
                embedding = jobs[0][1].pipeline.routing.embedding
                if embedding is None:
                    raise RuntimeError(f"pipeline {task!r} has no embedding routing")
            except Exception as exc:  # the embedding model failed: these jobs, not the worker
                for index, job in jobs:
                    staged[index] = self._internal(job.source, exc)
                continue
            for (index, job), found in zip(jobs, nearest, strict=True):
                staged[index] = dataclasses.replace(job, route=embedding_route(found, embedding))

    def _stage(self, message: SourceMessage) -> PreparedJob:
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
        try:
            sampling = pipeline.sampling.for_job(job.params)
        except SamplingOutOfBounds as exc:
            raise JobRejected(JobError.INVALID_JOB, str(exc)) from exc
        request = GenerationRequest(
            prompt_token_ids=self._within_context(
                self._prompt_ids(job, pipeline), sampling.max_tokens
            ),
            adapter=None,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            seed=sampling.seed,
            json_schema=pipeline.output_schema if pipeline.structured_output else None,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            stop=tuple(sampling.stop),
            repetition_penalty=sampling.repetition_penalty,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            min_tokens=sampling.min_tokens,
        )
        arrived_at, received_at_ms = time.monotonic(), int(time.time() * 1000)
        route = rule_route(job, pipeline)
        classifier = pipeline.routing.classifier
        if route is not None or classifier is None:
            return PreparedJob(  # route None: routed by embedding
                job, pipeline, message, request, arrived_at, received_at_ms, route=route
            )
        template = classifier.prompt_template or pipeline.prompt_template
        assert template is not None  # PipelineConfig requires one where a classifier routes
        classifying = GenerationRequest(
            prompt_token_ids=self._within_context(
                self.tokenize(template.replace("{input}", job.text)), classifier.max_tokens
            ),
            adapter=None,  # the classifier's version, picked in route_all
            max_tokens=classifier.max_tokens,
            temperature=0.0,
            seed=None,
            json_schema=classifier.output_schema(),
        )
        return PreparedJob(
            job, pipeline, message, classifying, arrived_at, received_at_ms, classifying=request
        )

    def _prompt_ids(self, job: Job, pipeline: PipelineConfig) -> list[int]:
        """The job's prompt as token ids: its pipeline's chat rendering, else its text template."""
        if pipeline.chat is None:
            if job.input is None:
                raise JobRejected(
                    JobError.INVALID_JOB, f"pipeline {pipeline.task} takes input, not messages"
                )
            return self.tokenize(pipeline.render_prompt(job.input))
        try:
            return self.render_chat(pipeline.conversation(job), pipeline.chat.template)
        except ChatTemplateMissing as exc:
            raise JobRejected(
                JobError.CHAT_TEMPLATE_MISSING,
                f"pipeline {pipeline.task} renders chats, but the model has no chat template and "
                "the pipeline sets no chat.template",
            ) from exc
        except ChatRenderError as exc:
            raise JobRejected(
                JobError.INVALID_JOB,
                f"messages: {exc}",  # the engine says the template refused
            ) from exc

    def _within_context(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise JobRejected(
                JobError.CONTEXT_EXCEEDED,
                f"prompt of {len(prompt_ids)} tokens plus max_tokens {max_tokens} exceeds the "
                f"model's context of {self.max_model_len} tokens",
            )
        return prompt_ids
