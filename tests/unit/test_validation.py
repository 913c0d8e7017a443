import pytest

from workers.core.contracts import ResultStatus
from workers.core.validation import OutputValidator

LABEL_SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["billing", "technical"]}, "when": {"format": "date"}},
    "required": ["label"],
    "additionalProperties": False,
}


def test_valid_json_is_parsed() -> None:
    checked = OutputValidator(LABEL_SCHEMA).check('{"label": "billing"}', "stop")
    assert checked.status is ResultStatus.OK
    assert checked.output == {"label": "billing"}
    assert checked.error is None


@pytest.mark.parametrize(
    ("text", "finish", "code"),
    [
        ('{"label": "bill', "length", "truncated"),
        ("label: billing", "stop", "invalid_json"),
        ('{"label": "refund"}', "stop", "schema_violation"),
        ('{"label": "billing", "extra": 1}', "stop", "schema_violation"),
        ('{"label": "billing", "when": "not-a-date"}', "stop", "schema_violation"),
    ],
)
def test_bad_outputs_are_invalid_with_a_reason(text: str, finish: str, code: str) -> None:
    checked = OutputValidator(LABEL_SCHEMA).check(text, finish)
    assert checked.status is ResultStatus.INVALID_OUTPUT
    assert checked.error is not None and checked.error.code == code


def test_without_a_schema_the_text_is_the_output() -> None:
    checked = OutputValidator(None).check("Hello there", "stop")
    assert (checked.status, checked.output) == (ResultStatus.OK, "Hello there")
