import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.unit.engine_fakes import byte_chat, byte_tokens
from workers.core import prepare
from workers.core.config import (
    ChatRendering,
    PipelineConfig,
    SamplingDefaults,
    SamplingLimits,
    StopLimit,
    load_pipelines,
)
from workers.core.contracts import Job
from workers.core.engine_api import (
    AdapterHandle,
    ChatRenderError,
    ChatTemplateMissing,
    GenerationRequest,
)
from workers.core.errors import JobRejected
from workers.core.messages import SourceMessage
from workers.core.prepare import JobPreparer, decode_job
from workers.core.routing import Router
from workers.core.validation import UNREAD

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


CHAT = PipelineConfig(
    task="assist",
    chat=ChatRendering(system="Be brief."),
    sampling=SamplingDefaults(
        max_tokens=16,
        top_p=0.9,
        limits=SamplingLimits(temperature=(0.0, 1.0), stop=StopLimit(count=2, length=8)),
    ),
)
TEXT = PipelineConfig(task="echo", prompt_template="say {input}")
BOTH = PipelineConfig(
    task="both", prompt_template="Summarize: {input}", chat=ChatRendering(template="T|")
)


def chat_preparer(render_chat: Callable[..., list[int]] = byte_chat) -> JobPreparer:
    pipelines = {p.input_topic: p for p in (CHAT, TEXT, BOTH)}
    return dataclasses.replace(
        preparer(),
        pipelines_by_topic=pipelines,
        known_tasks={p.task for p in pipelines.values()},
        render_chat=render_chat,
    )


def prepared_prompt(pipeline: PipelineConfig, **fields: object) -> str:
    job = chat_preparer().prepare(
        message(encoded(job_id="1", task=pipeline.task, **fields), f"jobs.{pipeline.task}")
    )
    return bytes(job.request.prompt_token_ids).decode()


def turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


def test_chat_jobs_render_with_the_pipeline_system_message_first() -> None:
    messages = turns(("user", "hi"), ("assistant", "hello"), ("user", "refund?"))
    assert prepared_prompt(CHAT, messages=messages) == (
        "<system>Be brief.<user>hi<assistant>hello<user>refund?<assistant>"
    )
    own_system = turns(("system", "Be formal."), ("user", "hi"))
    assert prepared_prompt(CHAT, messages=own_system) == "<system>Be formal.<user>hi<assistant>"
    # An input job on a chat pipeline is one user message.
    assert prepared_prompt(CHAT, input="hi") == "<system>Be brief.<user>hi<assistant>"


def test_a_pipeline_with_both_fills_the_user_message_and_passes_its_template() -> None:
    assert prepared_prompt(BOTH, input="the memo") == "T|<user>Summarize: the memo<assistant>"
    assert prepared_prompt(BOTH, messages=turns(("user", "hi"))) == "T|<user>hi<assistant>"
    assert prepared_prompt(TEXT, input="hi") == "say hi"


def test_a_chat_job_carries_every_sampling_field_to_the_engine() -> None:
    params = {
        "temperature": 0.5,
        "top_k": 40,
        "min_p": 0.1,
        "stop": ["END"],
        "repetition_penalty": 1.2,
        "presence_penalty": 0.3,
        "frequency_penalty": -0.3,
        "min_tokens": 2,
        "seed": 5,
    }
    body = encoded(job_id="1", task="assist", messages=turns(("user", "hi")), params=params)
    request = chat_preparer().prepare(message(body, "jobs.assist")).request
    assert request == GenerationRequest(
        prompt_token_ids=request.prompt_token_ids,
        adapter=None,
        max_tokens=16,  # the pipeline's default
        temperature=0.5,
        seed=5,
        top_p=0.9,  # the pipeline's default
        top_k=40,
        min_p=0.1,
        stop=("END",),
        repetition_penalty=1.2,
        presence_penalty=0.3,
        frequency_penalty=-0.3,
        min_tokens=2,
    )


def rejection(value: bytes, topic: str, render_chat: Callable[..., list[int]] = byte_chat) -> str:
    with pytest.raises(JobRejected) as rejected:
        chat_preparer(render_chat).prepare(message(value, topic))
    return f"{rejected.value.code}: {rejected.value.message}"


def test_chat_and_sampling_refusals_are_dead_letters_naming_the_field() -> None:
    chat_job = {"job_id": "1", "task": "assist", "messages": turns(("user", "hi"))}
    assert rejection(
        encoded(job_id="1", task="echo", messages=turns(("user", "hi"))), "jobs.echo"
    ) == ("invalid_job: pipeline echo takes input, not messages")
    assert rejection(encoded(**chat_job, params={"temperature": 1.5}), "jobs.assist") == (
        "invalid_job: params.temperature: 1.5 is above the pipeline's limit 1.0"
    )
    assert rejection(encoded(**chat_job, params={"stop": ["a", "b", "c"]}), "jobs.assist") == (
        "invalid_job: params.stop: 3 strings are more than the pipeline's limit 2"
    )
    assert rejection(encoded(**chat_job, params={"min_tokens": 20}), "jobs.assist") == (
        "invalid_job: params.min_tokens: 20 is above max_tokens 16"
    )
    assert rejection(encoded(**chat_job, params={"top_p": float("nan")}), "jobs.assist").startswith(
        "invalid_job: job does not match the job schema: params.top_p"
    )
    long_chat = {**chat_job, "messages": turns(("user", "x" * 600))}
    assert rejection(encoded(**long_chat), "jobs.assist").startswith("context_exceeded")


def test_a_model_without_a_chat_template_and_a_refusing_template_are_dead_letters() -> None:
    def no_template(messages: object, chat_template: str | None) -> list[int]:
        raise ChatTemplateMissing("no chat template")

    def alternating(messages: object, chat_template: str | None) -> list[int]:
        raise ChatRenderError(
            "the chat template refused these messages: roles must alternate user/assistant"
        )

    body = encoded(job_id="1", task="assist", input="hi")
    assert rejection(body, "jobs.assist", no_template).startswith(
        "chat_template_missing: pipeline assist renders chats, but the model has no chat template"
    )
    assert rejection(body, "jobs.assist", alternating) == (
        "invalid_job: messages: the chat template refused these messages: roles must "
        "alternate user/assistant"
    )


# Values orjson refuses or would read otherwise than `json`: each must still be decided as the
# standard parser decides it (the fast path must not change a job, a code or a message).
def _decoded(value: bytes) -> object:
    try:
        return decode_job(value)
    except JobRejected as rejection:
        return (rejection.code, rejection.message)


def _standard_outcome(value: bytes, monkeypatch: pytest.MonkeyPatch) -> object:
    """What the job decoder gave before orjson: the standard parser on every value."""
    with monkeypatch.context() as patched:
        patched.setattr(prepare, "fast_json", lambda _value: UNREAD)
        return _decoded(value)


def _job(**extra: str) -> bytes:
    fields = "".join(f', "{key}": {value}' for key, value in extra.items())
    return ('{"job_id": "1", "task": "classify", "input": "x"' + fields + "}").encode()


@pytest.mark.parametrize(
    "value",
    [
        _job(metadata='{"n": 123456789012345678901234567890}'),  # orjson: a float
        _job(metadata='{"n": -9223372036854775809}'),
        _job(metadata='{"n": 18446744073709551615}'),
        _job(metadata='{"x": 0.1000000000000000055511151231257827}'),
        _job(metadata='{"x": NaN}'),  # json reads NaN; orjson refuses it
        _job(metadata='{"x": 1e400}'),  # json: inf; orjson refuses it
        _job(metadata='{"x": -0.0, "y": 1E2, "z": 1e-400, "t": true}'),
        _job(metadata='{"k": "a", "k": "b"}'),
        _job(metadata='{"s": "\\u00e9\\ud83d\\ude00 \\u0000"}'),
        _job(metadata='{"d": ' + "[" * 62 + "]" * 62 + "}"),
        _job(metadata='{"a": "' + "[" * 70 + '"}'),  # brackets in text only
        _job(metadata='"\\ud800 alone"'),  # a lone surrogate: orjson refuses it
        _job(metadata='{"d": ' + "[" * 70 + "]" * 70 + "}"),
        b'\xef\xbb\xbf{"job_id": "1", "task": "classify", "input": "x"}',  # a BOM
        '{"job_id": "1", "task": "classify", "input": "x"}'.encode("utf-16"),
        _job(metadata="1" * 5000),  # past Python's digit limit
        _job(metadata="[1,]"),
        b'{"job_id": "1", "task": "classify", "input": "\x01"}',  # a raw control character
    ],
)
def test_jobs_decode_exactly_as_the_standard_parser_reads_them(
    value: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = _decoded(value)
    expected = _standard_outcome(value, monkeypatch)
    assert decoded == expected
    if isinstance(expected, Job):  # == says 1 == 1.0 == True: compare the JSON too
        assert isinstance(decoded, Job)
        assert json.dumps(decoded.metadata) == json.dumps(expected.metadata)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (_job(metadata='"\\ud800 alone"'), "text holds invalid Unicode at 0"),
        (_job(metadata='{"d": ' + "[" * 70 + "]" * 70 + "}"), "value nests deeper than 64"),
    ],
)
def test_what_orjson_refuses_keeps_its_reason(value: bytes, reason: str) -> None:
    with pytest.raises(JobRejected) as rejected:
        decode_job(value)
    assert rejected.value.code == "invalid_job"
    assert rejected.value.message.startswith(reason)


def test_long_integers_stay_exact() -> None:
    job = decode_job(_job(metadata='{"n": 123456789012345678901234567890}'))
    assert job.metadata == {"n": 123456789012345678901234567890}
