import pytest

from workers.core.config import PipelineConfig, RoutingConfig
from workers.core.contracts import Job
from workers.core.engine_api import AdapterHandle
from workers.core.errors import JobRejected
from workers.core.routing import adapter_name_for, route

PIPELINE = PipelineConfig(
    task="reply",
    prompt_template="{input}",
    routing=RoutingConfig(adapter="task-default", tenants={"acme": "acme-tone"}),
)
REGISTERED = {
    name: AdapterHandle(name, "1", f"/adapters/{name}", i)
    for i, name in enumerate(["task-default", "acme-tone", "explicit"], start=1)
}


def resolve(name: str, _job: Job) -> AdapterHandle:
    if name not in REGISTERED:
        raise JobRejected("unknown_adapter", f"adapter {name!r} is not served")
    return REGISTERED[name]


def job(**fields: str) -> Job:
    return Job(job_id="1", task="reply", input="hi", **fields)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"adapter": "explicit", "tenant": "acme"}, "explicit"),  # job beats tenant
        ({"tenant": "acme"}, "acme-tone"),  # tenant beats task
        ({"tenant": "unmapped"}, "task-default"),  # unmapped tenant falls to task
        ({}, "task-default"),
    ],
)
def test_precedence_job_then_tenant_then_task(fields: dict, expected: str) -> None:
    assert adapter_name_for(job(**fields), PIPELINE) == expected
    assert route(job(**fields), PIPELINE, resolve) is REGISTERED[expected]


def test_no_adapter_anywhere_means_base_model() -> None:
    bare = PipelineConfig(task="reply", prompt_template="{input}")
    assert route(job(tenant="acme"), bare, resolve) is None


def test_unregistered_adapter_is_rejected_with_a_code() -> None:
    with pytest.raises(JobRejected) as rejected:
        route(job(adapter="nope"), PIPELINE, resolve)
    assert rejected.value.code == "unknown_adapter"
    assert "nope" in rejected.value.message
