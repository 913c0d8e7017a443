import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from tests.unit.results import make_result
from workers.core.contracts import Job, contract_schemas, validation_details

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


@pytest.mark.parametrize("filename", ["job.schema.json", "result.schema.json"])
def test_schema_files_match_the_models(filename: str) -> None:
    on_disk = json.loads((SCHEMAS / filename).read_text())
    assert on_disk == contract_schemas()[filename], "run: lora-workers schemas export"


@pytest.mark.parametrize("path", sorted(SCHEMAS.glob("*.schema.json")), ids=lambda p: p.name)
def test_every_schema_file_is_valid_2020_12(path: Path) -> None:
    Draft202012Validator.check_schema(json.loads(path.read_text()))


def test_model_and_schema_agree_on_a_full_job() -> None:
    document = {
        "job_id": "j-1",
        "task": "classify",
        "input": "my invoice is wrong",
        "tenant": "acme",
        "adapter": "classifier",
        "params": {"max_tokens": 16, "temperature": 0.0, "seed": 7},
        "metadata": {"trace": "abc"},
    }
    Job.model_validate(document)
    schema = json.loads((SCHEMAS / "job.schema.json").read_text())
    assert list(Draft202012Validator(schema).iter_errors(document)) == []


@pytest.mark.parametrize(
    "document",
    [
        {"task": "classify", "input": "x"},  # no job_id
        {"job_id": "1", "task": "classify", "input": "x", "adapter": "../etc/passwd"},
        {"job_id": "1", "task": "classify", "input": "x", "params": {"max_tokens": 0}},
        {"job_id": "1", "task": "classify", "input": "x", "surprise": True},
    ],
)
def test_model_and_schema_both_reject_bad_jobs(document: dict) -> None:
    with pytest.raises(ValidationError):
        Job.model_validate(document)
    schema = json.loads((SCHEMAS / "job.schema.json").read_text())
    assert list(Draft202012Validator(schema).iter_errors(document)) != []


def test_result_round_trips_through_its_schema() -> None:
    result = make_result()
    document = json.loads(result.model_dump_json())
    schema = json.loads((SCHEMAS / "result.schema.json").read_text())
    assert list(Draft202012Validator(schema).iter_errors(document)) == []
    assert document["adapter"] == {"name": "classifier", "version": "1", "sha256": None}


def test_a_messages_job_is_valid_in_model_and_schema() -> None:
    document = {
        "job_id": "c-1",
        "task": "assist",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "My invoice is wrong."},
            {"role": "assistant", "content": "Which one?"},
            {"role": "user", "content": "March."},
        ],
        "params": {
            "top_p": 0.9,
            "top_k": 40,
            "min_p": 0.05,
            "stop": ["\n\n", "###"],
            "repetition_penalty": 1.1,
            "presence_penalty": -0.5,
            "frequency_penalty": 0.5,
            "min_tokens": 2,
            "max_tokens": 8,
        },
    }
    job = Job.model_validate(document)
    assert job.input is None and job.text == "March."  # routes read the last user message
    schema = json.loads((SCHEMAS / "job.schema.json").read_text())
    assert list(Draft202012Validator(schema).iter_errors(document)) == []


BASE = {"job_id": "1", "task": "assist"}
USER = {"role": "user", "content": "hi"}


# Each hostile job and the field its refusal must name.
@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({**BASE}, "input/messages"),  # neither
        ({**BASE, "input": "x", "messages": [USER]}, "input/messages"),  # both
        ({**BASE, "input": None}, "input"),
        ({**BASE, "messages": None}, "messages"),
        ({**BASE, "messages": []}, "messages"),
        ({**BASE, "messages": [USER] * 257}, "messages"),
        ({**BASE, "messages": USER}, "messages"),  # an object, not a list
        ({**BASE, "messages": ["hi"]}, "messages.0"),
        ({**BASE, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({**BASE, "messages": [{"role": "developer", "content": "x"}]}, "messages.0.role"),
        ({**BASE, "messages": [{"role": "user"}]}, "messages.0.content"),
        ({**BASE, "messages": [{"role": "user", "content": None}]}, "messages.0.content"),
        (
            {**BASE, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
            "messages.0.content",
        ),
        ({**BASE, "messages": [{**USER, "name": "eve"}]}, "messages.0.name"),
        ({**BASE, "messages": [{"role": "user", "content": "x" * 1_000_001}]}, "content"),
        ({**BASE, "messages": [{"role": "system", "content": "only rules"}]}, "messages"),
        ({**BASE, "input": "x" * 1_000_001}, "input"),
        ({**BASE, "input": "x", "params": {"top_p": 0}}, "params.top_p"),
        ({**BASE, "input": "x", "params": {"top_p": 1.5}}, "params.top_p"),
        ({**BASE, "input": "x", "params": {"top_k": -1}}, "params.top_k"),
        ({**BASE, "input": "x", "params": {"top_k": 2**40}}, "params.top_k"),
        ({**BASE, "input": "x", "params": {"top_k": 1.5}}, "params.top_k"),
        ({**BASE, "input": "x", "params": {"min_p": 1.01}}, "params.min_p"),
        ({**BASE, "input": "x", "params": {"stop": "###"}}, "params.stop"),
        ({**BASE, "input": "x", "params": {"stop": [""]}}, "params.stop.0"),
        ({**BASE, "input": "x", "params": {"stop": ["x" * 257]}}, "params.stop.0"),
        ({**BASE, "input": "x", "params": {"stop": ["a"] * 17}}, "params.stop"),
        ({**BASE, "input": "x", "params": {"stop": [1]}}, "params.stop.0"),
        ({**BASE, "input": "x", "params": {"repetition_penalty": 0}}, "params.repetition_penalty"),
        ({**BASE, "input": "x", "params": {"presence_penalty": 2.5}}, "params.presence_penalty"),
        (
            {**BASE, "input": "x", "params": {"frequency_penalty": -2.01}},
            "params.frequency_penalty",
        ),
        ({**BASE, "input": "x", "params": {"min_tokens": -1}}, "params.min_tokens"),
        (
            {**BASE, "input": "x", "params": {"min_tokens": 9, "max_tokens": 8}},
            "params.min_tokens",
        ),
    ],
)
def test_hostile_jobs_are_refused_naming_the_field(document: dict, field: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Job.model_validate(document)
    assert field in validation_details(refused.value)


@pytest.mark.parametrize("name", ["top_p", "min_p", "repetition_penalty", "presence_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_sampling_values_are_refused(name: str, value: float) -> None:
    with pytest.raises(ValidationError) as refused:
        Job.model_validate({**BASE, "input": "x", "params": {name: value}})
    assert f"params.{name}" in validation_details(refused.value)


@pytest.mark.parametrize(
    "document",
    [
        {**BASE},
        {**BASE, "input": "x", "messages": [USER]},
        {**BASE, "input": None},
        {**BASE, "messages": [{"role": "tool", "content": "x"}]},
        {**BASE, "input": "x", "params": {"stop": ["a"] * 17}},
    ],
)
def test_the_schema_refuses_what_the_model_refuses(document: dict) -> None:
    schema = json.loads((SCHEMAS / "job.schema.json").read_text())
    assert list(Draft202012Validator(schema).iter_errors(document)) != []
