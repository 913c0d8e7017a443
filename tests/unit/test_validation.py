import pytest

from workers.core import validation
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


NUMBER_SCHEMA = {"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]}


@pytest.mark.parametrize(
    "text",
    [
        '{"n": 123456789012345678901234567890}',  # orjson would read a float
        '{"n": NaN}',  # json reads NaN; orjson refuses it
        '{"n": Infinity}',
        '{"n": 1e400}',
        '{"n": 1, "s": "\\ud800"}',  # a lone surrogate: orjson refuses it
        '{"n": 1, "s": "\ud800"}',  # the same, raw in the text
        '{"n": 0.5, "n": "x"}',
        '{"n": 1',
        '\ufeff{"n": 1}',
    ],
)
def test_outputs_are_read_exactly_as_the_standard_parser_reads_them(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    validator = OutputValidator(NUMBER_SCHEMA)
    checked = validator.check(text, "length")
    with monkeypatch.context() as patched:
        patched.setattr(validation, "fast_json", lambda _value: validation.UNREAD)
        expected = validator.check(text, "length")
    assert (checked.status, checked.error) == (expected.status, expected.error)
    assert repr(checked.output) == repr(expected.output)  # nan != nan; 1 == 1.0


def test_fast_json_leaves_long_integers_to_the_standard_parser() -> None:
    assert validation.fast_json('{"n": 12345678901234567890}') is validation.UNREAD
    assert validation.fast_json(b'{"n": 1234567890123456789}') is validation.UNREAD
    assert validation.fast_json(b'{"n": 123456789012345678}') == {"n": 123456789012345678}
