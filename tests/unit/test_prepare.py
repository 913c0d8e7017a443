import json
from pathlib import Path

import pytest

from tests.unit.engine_fakes import byte_chat, byte_tokens
from workers.core.config import load_pipelines
from workers.core.contracts import Job
from workers.core.engine_api import AdapterHandle
from workers.core.errors import JobRejected
from workers.core.messages import SourceMessage
from workers.core.prepare import JobPreparer
from workers.core.routing import Router

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = load_pipelines(ROOT / "pipelines")
ADAPTERS = {
    name: AdapterHandle(name, "1", f"/a/{name}", i)
    for i, name in enumerate(["classifier", "customer-tone", "partner-tone", "summarizer"], 1)
}


def resolve(name: str, _job: Job) -> AdapterHandle:
    if name not in ADAPTERS:
        raise JobRejected("unknown_adapter", f"adapter {name!r} is not served")
    return ADAPTERS[name]


def preparer(max_model_len: int = 512) -> JobPreparer:
    return JobPreparer(
        pipelines_by_topic={p.input_topic: p for p in PIPELINES.values()},
        known_tasks=set(PIPELINES),
        router=Router(resolve),
        tokenize=byte_tokens,
        render_chat=byte_chat,
        max_model_len=max_model_len,
        max_job_bytes=4096,
    )


def message(value: bytes | None, topic: str = "jobs.classify") -> SourceMessage:
    return SourceMessage(topic, 0, 0, b"k", value, [], 0)


def encoded(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_a_good_job_is_routed_and_tokenized() -> None:
    prepared = preparer().prepare(
        message(encoded(job_id="1", task="classify", input="refund", params={"seed": 3}))
    )
    assert prepared.adapter is ADAPTERS["classifier"]
    assert prepared.request.max_tokens == PIPELINES["classify"].sampling.max_tokens
    assert prepared.request.seed == 3
    rendered = PIPELINES["classify"].render_prompt("refund")
    assert prepared.request.prompt_token_ids == list(rendered.encode())


def test_tenant_routing_on_reply() -> None:
    body = encoded(job_id="1", task="reply", input="hi", tenant="globex")
    prepared = preparer().prepare(message(body, "jobs.reply"))
    assert prepared.adapter is ADAPTERS["partner-tone"]


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (b"\xff not json", "invalid_json"),
        (None, "invalid_json"),
        (encoded(task="classify", input="x"), "invalid_job"),
        (encoded(job_id="1", task="translate", input="x"), "unknown_task"),
        (encoded(job_id="1", task="reply", input="x"), "task_mismatch"),
        (encoded(job_id="1", task="classify", input="x", adapter="ghost"), "unknown_adapter"),
        (encoded(job_id="1", task="classify", input="x" * 600), "context_exceeded"),
    ],
)
def test_poison_is_rejected_with_its_code(value: bytes | None, code: str) -> None:
    with pytest.raises(JobRejected) as rejected:
        preparer().prepare(message(value))
    assert rejected.value.code == code
