import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from tests.unit.results import make_result
from workers.core.contracts import Job, contract_schemas

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
