"""Check a generated text against the task's output schema (JSON Schema 2020-12, formats on)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from workers.core.contracts import ErrorInfo, ResultStatus
from workers.core.errors import OutputError

# orjson reads an integer past 64 bits as a float, where `json` keeps it exact: a text with 19
# digits in a row (any such integer has them) is left to `json`.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")
_LONG_DIGITS_TEXT = re.compile(r"[0-9]{19}")
UNREAD = object()


def fast_json(value: bytes | str) -> object:
    """The value as `json.loads` reads it, read by orjson (ten times faster); `UNREAD` where
    orjson refuses it or could read it otherwise (NaN, lone surrogates, encodings other than
    UTF-8, long integers): the standard parser then decides, with its own error messages."""
    pattern = _LONG_DIGITS if isinstance(value, bytes) else _LONG_DIGITS_TEXT
    if pattern.search(value) is not None:  # type: ignore[arg-type]
        return UNREAD
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return UNREAD


@dataclass(frozen=True)
class CheckedOutput:
    status: ResultStatus
    output: Any
    error: ErrorInfo | None = None


class OutputValidator:
    """Parses and validates outputs for one task; a task without a schema returns the text."""

    def __init__(self, schema: dict[str, Any] | None) -> None:
        if schema is not None:
            Draft202012Validator.check_schema(schema)
            self._validator: Draft202012Validator | None = Draft202012Validator(
                schema, format_checker=Draft202012Validator.FORMAT_CHECKER
            )
        else:
            self._validator = None

    def check(self, text: str, finish_reason: str | None) -> CheckedOutput:
        if self._validator is None:
            return CheckedOutput(ResultStatus.OK, text)
        value = fast_json(text)
        if value is UNREAD:
            try:
                value = json.loads(text)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, or a parser limit
                # A JSON answer cut off by max_tokens is the common case; say so, it is actionable.
                code = (
                    OutputError.TRUNCATED if finish_reason == "length" else OutputError.INVALID_JSON
                )
                return CheckedOutput(
                    ResultStatus.INVALID_OUTPUT,
                    text,
                    ErrorInfo(code=code, message=f"not JSON: {exc}"),
                )
        error = best_match(self._validator.iter_errors(value))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            return CheckedOutput(
                ResultStatus.INVALID_OUTPUT,
                value,
                ErrorInfo(code=OutputError.SCHEMA_VIOLATION, message=f"{where}: {error.message}"),
            )
        return CheckedOutput(ResultStatus.OK, value)
