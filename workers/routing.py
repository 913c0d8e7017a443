"""Which adapter serves a job: the job's `adapter` > the tenant's adapter > the task's adapter >
the base model. Pure logic, no I/O."""

from __future__ import annotations

from collections.abc import Callable

from workers.config import PipelineConfig
from workers.contracts import Job
from workers.engine import AdapterHandle
from workers.errors import JobRejected


def adapter_name_for(job: Job, pipeline: PipelineConfig) -> str | None:
    """The adapter name a job asks for, by precedence; None means the base model."""
    if job.adapter is not None:
        return job.adapter
    if job.tenant is not None and job.tenant in pipeline.routing.tenants:
        return pipeline.routing.tenants[job.tenant]
    return pipeline.routing.adapter


def route(
    job: Job, pipeline: PipelineConfig, lookup: Callable[[str], AdapterHandle | None]
) -> AdapterHandle | None:
    """Resolve the adapter version to run the job on, or raise `JobRejected`."""
    name = adapter_name_for(job, pipeline)
    if name is None:
        return None
    handle = lookup(name)
    if handle is None:
        raise JobRejected("unknown_adapter", f"adapter {name!r} is not registered on this worker")
    return handle
