import json
from collections.abc import Sequence

import pytest
from pydantic import ValidationError

from tests.unit.engine_fakes import byte_chat, byte_tokens
from workers.core.config import (
    ChatRendering,
    ClassifierRouting,
    EmbeddingRouting,
    PipelineConfig,
    RoutingConfig,
)
from workers.core.contracts import Job, RouteKind, Usage
from workers.core.engine_api import AdapterHandle
from workers.core.errors import JobRejected
from workers.core.messages import SourceMessage
from workers.core.prepare import JobPreparer
from workers.core.routing import Router, classifier_route, embedding_route, label_of, rule_route

PIPELINE = PipelineConfig(
    task="reply",
    prompt_template="{input}",
    routing=RoutingConfig(adapter="task-default", tenants={"acme": "acme-tone"}),
)
REGISTERED = {
    name: AdapterHandle(name, "1", f"/adapters/{name}", i)
    for i, name in enumerate(
        ["task-default", "acme-tone", "explicit", "classifier", "billing", "tech"], start=1
    )
}
SHADOW = AdapterHandle("billing", "2", "/adapters/billing-2", 99)


def resolve(name: str, _job: Job) -> AdapterHandle:
    if name not in REGISTERED:
        raise JobRejected("unknown_adapter", f"adapter {name!r} is not served")
    return REGISTERED[name]


def job(**fields: str) -> Job:
    return Job(job_id="1", task="reply", input="hi", **fields)


@pytest.mark.parametrize(
    ("fields", "by", "expected"),
    [
        ({"adapter": "explicit", "tenant": "acme"}, RouteKind.JOB, "explicit"),
        ({"tenant": "acme"}, RouteKind.TENANT, "acme-tone"),  # tenant beats task
        ({"tenant": "unmapped"}, RouteKind.TASK, "task-default"),  # unmapped: the task's
        ({}, RouteKind.TASK, "task-default"),
    ],
)
def test_precedence_job_then_tenant_then_task(fields: dict, by: RouteKind, expected: str) -> None:
    route = rule_route(job(**fields), PIPELINE)
    assert route is not None
    assert (route.by, route.adapter) == (by, expected)
    assert Router(resolve).handles(route, job(**fields)) == (REGISTERED[expected], None)


def test_no_adapter_anywhere_means_base_model() -> None:
    bare = PipelineConfig(task="reply", prompt_template="{input}")
    route = rule_route(job(tenant="acme"), bare)
    assert route is not None and route.adapter is None
    assert Router(resolve).handles(route, job()) == (None, None)


def test_unregistered_adapter_is_rejected_with_a_code() -> None:
    route = rule_route(job(adapter="nope"), PIPELINE)
    assert route is not None
    with pytest.raises(JobRejected) as rejected:
        Router(resolve).handles(route, job(adapter="nope"))
    assert rejected.value.code == "unknown_adapter"
    assert "nope" in rejected.value.message


CLASSIFIER = ClassifierRouting(
    adapter="classifier", labels={"billing": "billing", "technical": "tech", "other": "base"}
)
CLASSIFIED = PipelineConfig(
    task="reply",
    prompt_template="reply: {input}",
    routing=RoutingConfig(tenants={"acme": "acme-tone"}, classifier=CLASSIFIER),
)


def test_model_routes_come_after_the_rules() -> None:
    assert rule_route(job(), CLASSIFIED) is None
    tenant = rule_route(job(tenant="acme"), CLASSIFIED)
    assert tenant is not None and tenant.by is RouteKind.TENANT


@pytest.mark.parametrize(
    ("answer", "label", "adapter", "fallback"),
    [
        ('{"label": "billing"}', "billing", "billing", False),
        ('{"label": "technical"}', "technical", "tech", False),
        ('{"label": "other"}', "other", None, False),  # `base`: the base model
        ('{"label": "weather"}', None, None, True),  # not a label
        ('{"label": ', None, None, True),  # cut off
        ('"billing"', None, None, True),  # not the object the classifier answers
    ],
)
def test_a_label_picks_its_adapter_and_anything_else_falls_back(
    answer: str, label: str | None, adapter: str | None, fallback: bool
) -> None:
    usage = Usage(prompt_tokens=12, completion_tokens=5)
    route = classifier_route(answer, CLASSIFIER, usage)
    assert (route.by, route.label, route.adapter, route.fallback) == (
        RouteKind.CLASSIFIER,
        label,
        adapter,
        fallback,
    )
    assert route.usage == usage


def test_a_bare_label_classifier_is_constrained_to_the_labels() -> None:
    bare = CLASSIFIER.model_copy(update={"label_field": None})
    assert bare.output_schema() == {"enum": ["billing", "other", "technical"]}
    assert label_of('"technical"', bare) == "technical"
    schema = CLASSIFIER.output_schema()
    assert schema["properties"]["label"]["enum"] == ["billing", "other", "technical"]
    assert schema["required"] == ["label"]


def test_embedding_route_honours_the_threshold() -> None:
    config = EmbeddingRouting(examples={"billing": ["refund"]}, threshold=0.6, fallback="tech")
    near = embedding_route(("billing", 0.61), config)
    assert (near.adapter, near.similarity, near.fallback) == ("billing", 0.61, False)
    far = embedding_route(("billing", 0.59), config)
    assert (far.adapter, far.fallback) == ("tech", True)


def test_routing_takes_one_default_route() -> None:
    with pytest.raises(ValidationError, match="one of adapter, classifier, embedding"):
        RoutingConfig(adapter="x", classifier=CLASSIFIER)
    with pytest.raises(ValidationError, match="without example texts"):
        EmbeddingRouting(examples={"billing": []})
    assert CLASSIFIED.routing.targets() == {"acme-tone", "classifier", "billing", "tech", None}


def message(value: dict, topic: str = "jobs.reply") -> SourceMessage:
    return SourceMessage(topic, 0, 0, b"k", json.dumps(value).encode(), [], 0)


def preparer(pipeline: PipelineConfig, router: Router) -> JobPreparer:
    return JobPreparer(
        pipelines_by_topic={pipeline.input_topic: pipeline},
        known_tasks={pipeline.task},
        router=router,
        tokenize=byte_tokens,
        render_chat=byte_chat,
        max_model_len=512,
        max_job_bytes=4096,
    )


def test_a_classified_job_enters_on_the_classifier_then_runs_on_its_label() -> None:
    body = {"job_id": "7", "task": "reply", "input": "my refund"}
    first = preparer(CLASSIFIED, Router(resolve)).prepare(message(body))
    assert first.adapter is REGISTERED["classifier"]
    assert first.request.prompt_token_ids == list(b"reply: my refund")
    assert first.request.json_schema == CLASSIFIER.output_schema()
    assert first.classifying is not None and first.route is None
    routed = first.routed(
        classifier_route(
            '{"label": "billing"}', CLASSIFIER, Usage(prompt_tokens=1, completion_tokens=2)
        ),
        Router(resolve),
    )
    assert routed.adapter is REGISTERED["billing"]
    assert routed.request.prompt_token_ids == list(b"reply: my refund")
    assert routed.request.json_schema is None and routed.classifying is None
    assert routed.route is not None and routed.route.label == "billing"


def test_embedding_routes_a_batch_in_one_call_and_shadows_by_share() -> None:
    pipeline = PipelineConfig(
        task="reply",
        prompt_template="{input}",
        routing=RoutingConfig(
            embedding=EmbeddingRouting(
                examples={"billing": ["refund"], "tech": ["crash"]}, threshold=0.5
            )
        ),
    )
    calls: list[list[str]] = []

    def nearest(task: str, texts: Sequence[str]) -> list[tuple[str, float]]:
        calls.append(list(texts))
        return [("billing", 0.9) if "refund" in t else ("tech", 0.2) for t in texts]

    def shadow_for(handle: AdapterHandle, job: Job) -> AdapterHandle | None:
        return SHADOW if handle.name == "billing" else None

    router = Router(resolve, shadow_for=shadow_for, nearest=nearest)
    jobs = preparer(pipeline, router).prepare_many(
        [
            message({"job_id": "1", "task": "reply", "input": "a refund please"}),
            message({"job_id": "2", "task": "reply", "input": "it rains"}),
            message({"job_id": "3", "task": "nope", "input": "x"}),
        ]
    )
    assert calls == [["a refund please", "it rains"]]
    first, second, third = jobs
    assert not isinstance(first, JobRejected) and not isinstance(second, JobRejected)
    assert first.adapter is REGISTERED["billing"] and first.route is not None
    assert first.route.similarity == 0.9
    assert first.shadow_request is not None and first.shadow_request.adapter is SHADOW
    assert first.holds == [REGISTERED["billing"].lora_id, SHADOW.lora_id]
    assert second.adapter is None and second.route is not None and second.route.fallback
    assert isinstance(third, JobRejected) and third.code == "unknown_task"


def test_an_embedding_failure_rejects_the_batch_not_the_worker() -> None:
    pipeline = PipelineConfig(
        task="reply",
        prompt_template="{input}",
        routing=RoutingConfig(embedding=EmbeddingRouting(examples={"billing": ["refund"]})),
    )

    def broken(task: str, texts: Sequence[str]) -> list[tuple[str, float]]:
        raise RuntimeError("model gone")

    jobs = preparer(pipeline, Router(resolve, nearest=broken)).prepare_many(
        [message({"job_id": "1", "task": "reply", "input": "refund"})]
    )
    assert isinstance(jobs[0], JobRejected) and jobs[0].code == "internal_error"


def test_model_routes_read_a_chat_jobs_last_user_message() -> None:
    conversation = [
        {"role": "user", "content": "it rains"},
        {"role": "assistant", "content": "sorry?"},
        {"role": "user", "content": "a refund please"},
    ]
    texts: list[str] = []

    def nearest(task: str, inputs: Sequence[str]) -> list[tuple[str, float]]:
        texts.extend(inputs)
        return [("billing", 0.9) for _ in inputs]

    by_embedding = PipelineConfig(
        task="reply",
        chat=ChatRendering(),
        routing=RoutingConfig(embedding=EmbeddingRouting(examples={"billing": ["refund"]})),
    )
    body = {"job_id": "1", "task": "reply", "messages": conversation}
    routed = preparer(by_embedding, Router(resolve, nearest=nearest)).prepare(message(body))
    assert texts == ["a refund please"] and routed.adapter is REGISTERED["billing"]

    by_classifier = PipelineConfig(
        task="reply",
        chat=ChatRendering(),
        routing=RoutingConfig(
            classifier=CLASSIFIER.model_copy(update={"prompt_template": "c: {input}"})
        ),
    )
    first = preparer(by_classifier, Router(resolve)).prepare(message(body))
    assert first.request.prompt_token_ids == list(b"c: a refund please")
    assert first.classifying is not None  # the job's own request: the rendered chat
    assert bytes(first.classifying.prompt_token_ids).startswith(b"<user>it rains")
