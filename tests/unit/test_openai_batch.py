"""OpenAI batch files: each input line's mapping to a job, an error line for every kind of bad
line, and the output lines' shape (workers/bulk/openai.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.unit.cli_process import run_cli
from workers.bulk.openai import (
    CHAT_TASK,
    COMPLETIONS_TASK,
    LineError,
    Mapped,
    is_jsonl_output,
    map_line,
    output_lines,
    pipelines_for,
    plan_lines,
    read_results,
    schema_task,
    write_atomically,
)
from workers.core.contracts import ChatMessage, Result
from workers.parquet.dataset import ParquetDatasetWriter

ADAPTERS = {"warm-reply", "ticket-label"}
BASE = "tiny-qwen"
SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}


def line(body: dict[str, Any] | None = None, **fields: Any) -> bytes:
    data: dict[str, Any] = {
        "custom_id": "c-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": BASE, "messages": [{"role": "user", "content": "hi"}]},
    }
    if body is not None:
        data["body"] = body
    data.update(fields)
    return json.dumps(data).encode()


def mapped(raw: bytes) -> Mapped:
    return map_line(raw, ADAPTERS, BASE)


def refused(raw: bytes) -> LineError:
    with pytest.raises(LineError) as caught:
        map_line(raw, ADAPTERS, BASE)
    return caught.value


def test_a_chat_line_is_a_messages_job_of_the_chat_pipeline_on_the_base_model() -> None:
    got = mapped(line())
    assert got.custom_id == "c-1" and got.model == BASE and got.schema is None
    assert got.job.job_id == "c-1" and got.job.task == CHAT_TASK
    assert got.job.messages == [ChatMessage(role="user", content="hi")]
    assert got.job.input is None and got.job.adapter is None and got.job.params is None


def test_a_completions_line_is_an_input_job_and_its_model_names_the_adapter() -> None:
    raw = line({"model": "warm-reply", "prompt": "Hello"}, url="/v1/completions")
    got = mapped(raw)
    assert got.job.task == COMPLETIONS_TASK and got.job.input == "Hello"
    assert got.job.adapter == "warm-reply"


def test_sampling_fields_become_params() -> None:
    body = {
        "model": BASE,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 12,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": "\n",
        "seed": 7,
        "min_tokens": 3,
        "n": 1,  # OpenAI fields the project does not use are ignored
    }
    params = mapped(line(body)).job.params
    assert params is not None
    assert (params.max_tokens, params.temperature, params.top_p) == (12, 0.5, 0.9)
    assert (params.stop, params.seed, params.min_tokens) == (["\n"], 7, 3)
    body = {"model": BASE, "prompt": "x", "max_completion_tokens": 5, "stop": ["a", "b"]}
    params = mapped(line(body, url="/v1/completions")).job.params
    assert params is not None and params.max_tokens == 5 and params.stop == ["a", "b"]


def test_a_json_schema_response_format_gets_a_pipeline_constrained_to_that_schema() -> None:
    body = {
        "model": "ticket-label",
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "label", "schema": SCHEMA, "strict": True},
        },
    }
    got = mapped(line(body))
    assert got.schema == SCHEMA and got.job.task == schema_task(CHAT_TASK, SCHEMA)
    pipelines = pipelines_for([got, mapped(line())])
    assert set(pipelines) == {CHAT_TASK, COMPLETIONS_TASK, got.job.task}
    constrained = pipelines[got.job.task]
    assert constrained.output_schema == SCHEMA and constrained.structured_output
    assert constrained.chat is not None and pipelines[CHAT_TASK].output_schema is None
    assert pipelines[COMPLETIONS_TASK].prompt_template == "{input}"
    assert mapped(line(body | {"response_format": {"type": "text"}})).schema is None


@pytest.mark.parametrize(
    ("raw", "code", "custom_id"),
    [
        (b"{not json", "invalid_json", None),
        (b"[1, 2]", "invalid_request", None),
        (line(custom_id=None), "invalid_request", None),
        (line(method="GET"), "invalid_request", "c-1"),
        (
            json.dumps({"custom_id": "c-1", "url": "/v1/completions"}).encode(),
            "invalid_request",
            "c-1",
        ),
        (line({"messages": [{"role": "user", "content": "hi"}]}), "invalid_request", "c-1"),
        (line(url="/v1/embeddings"), "unknown_url", "c-1"),
        (line({"model": "gpt-4o", "messages": []}), "unknown_model", "c-1"),
        (line({"model": BASE, "prompt": "x"}), "invalid_request", "c-1"),  # chat without messages
        (line({"model": BASE}, url="/v1/completions"), "invalid_request", "c-1"),
        (
            line(
                {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "temperature": 5}
            ),
            "invalid_job",
            "c-1",
        ),
        (
            line({"model": BASE, "messages": [{"role": "tool", "content": "x"}]}),
            "invalid_job",
            "c-1",
        ),
        (
            line(
                {"model": BASE, "messages": [{"role": "user", "content": "x"}]}, custom_id="x" * 300
            ),
            "invalid_job",
            "x" * 300,
        ),
        (
            line(
                {
                    "model": BASE,
                    "messages": [{"role": "user", "content": "x"}],
                    "response_format": {"type": "json_schema"},
                }
            ),
            "invalid_request",
            "c-1",
        ),
    ],
)
def test_each_kind_of_bad_line_has_its_own_error(
    raw: bytes, code: str, custom_id: str | None
) -> None:
    error = refused(raw)
    assert (error.code, error.custom_id) == (code, custom_id)
    assert error.message


def test_a_repeated_custom_id_is_an_error_line_and_the_first_runs() -> None:
    plan = plan_lines([line(), b"oops", line(), line(custom_id="c-2")], ADAPTERS, BASE)
    kinds = [line.code if isinstance(line, LineError) else line.custom_id for line in plan.lines]
    assert kinds == ["c-1", "invalid_json", "duplicate_custom_id", "c-2"]
    assert [job.custom_id for job in plan.jobs] == ["c-1", "c-2"]


def _row(job_id: str, status: str = "ok", **extra: Any) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "status": status,
        "raw_output": '{"label": "billing"}',
        "prompt_tokens": 11,
        "completion_tokens": 4,
        "error_code": None,
        "error_message": None,
        "completed_at": datetime(2026, 12, 5, tzinfo=UTC),
    } | extra


def test_output_has_one_line_per_input_line_in_openai_format() -> None:
    raws = [
        line(),
        line(
            {"model": "warm-reply", "prompt": "x", "max_tokens": 4},
            url="/v1/completions",
            custom_id="c-2",
        ),
        b"{bad",
        line(custom_id="c-3"),
    ]
    plan = plan_lines(raws, ADAPTERS, BASE)
    rows = {
        "c-1": _row("c-1"),
        "c-2": _row("c-2"),
        "c-3": _row("c-3", "invalid_output", error_code="schema_mismatch", error_message="no"),
    }
    out = [json.loads(text) for text in output_lines(plan, rows, "run1")]
    assert len(out) == len(raws)
    chat, completion, bad, invalid = out
    assert set(chat) == {"id", "custom_id", "response", "error"}
    assert chat["custom_id"] == "c-1" and chat["error"] is None
    response = chat["response"]
    assert response["status_code"] == 200 and response["request_id"]
    body = response["body"]
    assert body["object"] == "chat.completion" and body["model"] == BASE
    assert body["created"] == int(datetime(2026, 12, 5, tzinfo=UTC).timestamp())
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": '{"label": "billing"}'},
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
    cbody = completion["response"]["body"]
    assert cbody["object"] == "text_completion" and cbody["model"] == "warm-reply"
    # The whole max_tokens budget used: cut short.
    assert cbody["choices"] == [
        {"index": 0, "text": '{"label": "billing"}', "finish_reason": "length"}
    ]
    assert bad["response"] is None and bad["custom_id"] is None
    assert bad["error"]["code"] == "invalid_json"
    assert invalid["response"] is None and invalid["custom_id"] == "c-3"
    assert invalid["error"] == {"code": "schema_mismatch", "message": "no"}
    assert len({entry["id"] for entry in out}) == len(out)
    # A resumed run writes the same ids.
    assert [json.loads(t)["id"] for t in output_lines(plan, rows, "run1")] == [e["id"] for e in out]


def test_results_are_read_back_from_the_staging_dataset(tmp_path: Path) -> None:
    now = 1_796_432_249_000
    result = Result.model_validate(
        {
            "job_id": "c-1",
            "task": CHAT_TASK,
            "status": "ok",
            "output": None,
            "raw_output": "hello",
            "adapter": None,
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
            "timings": {
                "enqueued_at_ms": now,
                "received_at_ms": now,
                "completed_at_ms": now,
                "queue_ms": 0,
                "generate_ms": 1,
            },
        }
    )
    writer = ParquetDatasetWriter(tmp_path / "parts", None)
    writer.write([result], "part-000000000-000000000-run-mine-a1b2c3")
    other = result.model_copy(update={"raw_output": "another file's answer"})
    writer.write([other], "part-000000000-000000000-run-other-d4e5f6")
    rows = read_results(tmp_path / "parts", "mine")
    assert set(rows) == {"c-1"}
    assert rows["c-1"]["raw_output"] == "hello" and rows["c-1"]["completion_tokens"] == 2
    assert read_results(tmp_path / "absent", "mine") == {}


def test_the_output_file_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    write_atomically(path, ["a", "b"])
    assert path.read_text() == "a\nb\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_a_jsonl_output_gets_openai_lines_anything_else_is_a_parquet_dataset() -> None:
    assert is_jsonl_output(Path("out/results.jsonl"))
    assert not is_jsonl_output(Path("out/dataset"))


ROOT = Path(__file__).resolve().parents[2]


def test_cli_a_file_with_no_servable_line_gets_only_error_lines_without_an_engine(
    tmp_path: Path,
) -> None:
    source = tmp_path / "batch.jsonl"
    source.write_bytes(b"{bad\n\n" + line({"model": "gpt-4o", "messages": []}) + b"\n")
    output = tmp_path / "out.jsonl"
    done = run_cli(
        ["bulk", "--format", "openai", "--input", str(source), "--output", str(output)],
        ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    errors = [json.loads(text)["error"]["code"] for text in output.read_text().splitlines()]
    assert errors == ["invalid_json", "unknown_model"]


def test_cli_refuses_a_pipeline_with_the_openai_format(tmp_path: Path) -> None:
    source = tmp_path / "batch.jsonl"
    source.write_bytes(line() + b"\n")
    args = ["bulk", "--format", "openai", "--pipeline", "classify", "--input", str(source)]
    done = run_cli([*args, "--output", str(tmp_path / "o.jsonl")], ROOT, timeout=60)
    assert done.returncode != 0
    assert "built-in pipelines" in done.stderr + done.stdout
