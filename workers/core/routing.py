"""Which adapter serves a job. Pure logic, no I/O.

Precedence (docs/routing.md): the job's `adapter` > the tenant's adapter > the pipeline's
default route, which is one of: a classifier adapter's label for the input, the input's nearest
adapter by example embeddings, or the task's adapter (none: the base model).

Rules decide when a job is prepared. A classifier route needs an engine pass first: the job
enters the engine on the classifier adapter, constrained to the label set, and comes back
through `Router.after_classifier` to run on the adapter its label names. An embedding route
needs the input's embedding, computed for a whole consumed batch at once (`Router.nearest`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from workers.core.config import BASE_TARGET, ClassifierRouting, EmbeddingRouting, PipelineConfig
from workers.core.contracts import Job, RouteInfo, RouteKind, Usage
from workers.core.engine_api import AdapterHandle

AdapterResolver = Callable[[str, Job], AdapterHandle]
"""Picks the version of a named adapter for a job (canary splits); raises `JobRejected` for an
unknown or forbidden adapter."""

ShadowPicker = Callable[[AdapterHandle, Job], AdapterHandle | None]
"""The shadow version a job also runs on (after its answer), if its adapter has one and the
job falls in the shadow's share."""

NearestAdapters = Callable[[str, Sequence[str]], list[tuple[str, float]]]
"""For a task and a batch of inputs: each input's nearest example set and its similarity."""


def rule_route(job: Job, pipeline: PipelineConfig) -> RouteInfo | None:
    """The route rules give; None when the pipeline routes this job by a model."""
    if job.adapter is not None:
        return RouteInfo(by=RouteKind.JOB, adapter=job.adapter)
    routing = pipeline.routing
    if job.tenant is not None and job.tenant in routing.tenants:
        return RouteInfo(by=RouteKind.TENANT, adapter=routing.tenants[job.tenant])
    if routing.classifier is not None or routing.embedding is not None:
        return None
    return RouteInfo(by=RouteKind.TASK, adapter=routing.adapter)


def _target(name: str) -> str | None:
    return None if name == BASE_TARGET else name


def label_of(text: str, classifier: ClassifierRouting) -> str | None:
    """The label in a classifier's answer, or None when it names no known label."""
    try:
        answer = json.loads(text)
    except ValueError:
        return None
    if classifier.label_field is not None:
        answer = answer.get(classifier.label_field) if isinstance(answer, dict) else None
    return answer if isinstance(answer, str) and answer in classifier.labels else None


def classifier_route(text: str, classifier: ClassifierRouting, usage: Usage) -> RouteInfo:
    label = label_of(text, classifier)
    if label is None:
        return RouteInfo(
            by=RouteKind.CLASSIFIER,
            adapter=_target(classifier.fallback),
            fallback=True,
            usage=usage,
        )
    return RouteInfo(
        by=RouteKind.CLASSIFIER,
        adapter=_target(classifier.labels[label]),
        label=label,
        usage=usage,
    )


def embedding_route(nearest: tuple[str, float], embedding: EmbeddingRouting) -> RouteInfo:
    name, similarity = nearest
    if similarity >= embedding.threshold:
        return RouteInfo(by=RouteKind.EMBEDDING, adapter=_target(name), similarity=similarity)
    return RouteInfo(
        by=RouteKind.EMBEDDING,
        adapter=_target(embedding.fallback),
        similarity=similarity,
        fallback=True,
    )


@dataclass(frozen=True)
class Router:
    """Turns a route into the adapter versions a job runs on."""

    resolve: AdapterResolver
    shadow_for: ShadowPicker | None = None  # None: no shadow runs (bulk mode)
    nearest: NearestAdapters | None = None  # None: no pipeline routes by embedding

    def handles(
        self, route: RouteInfo, job: Job
    ) -> tuple[AdapterHandle | None, AdapterHandle | None]:
        """The version that serves the job (None: the base model) and its shadow, if any."""
        if route.adapter is None:
            return None, None
        handle = self.resolve(route.adapter, job)
        shadow = None if self.shadow_for is None else self.shadow_for(handle, job)
        return handle, shadow
