"""Which adapter serves a job: the job's `adapter` > the tenant's adapter > the task's adapter >
the base model. Pure logic, no I/O."""

from __future__ import annotations

from collections.abc import Callable

from workers.core.config import PipelineConfig
from workers.core.contracts import Job
from workers.core.engine_api import AdapterHandle


def adapter_name_for(job: Job, pipeline: PipelineConfig) -> str | None:
    """The adapter name a job asks for, by precedence; None means the base model."""
    if job.adapter is not None:
        return job.adapter
    if job.tenant is not None and job.tenant in pipeline.routing.tenants:
        return pipeline.routing.tenants[job.tenant]
    return pipeline.routing.adapter


AdapterResolver = Callable[[str, Job], AdapterHandle]


def route(job: Job, pipeline: PipelineConfig, resolve: AdapterResolver) -> AdapterHandle | None:
    """The adapter version to run the job on (None: the base model).

    `resolve` picks the version (canary splits) and raises `JobRejected` for an unknown or
    forbidden adapter."""
    name = adapter_name_for(job, pipeline)
    return None if name is None else resolve(name, job)
