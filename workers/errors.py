"""Errors that send a message to the dead-letter topic, each with a stable code."""

from __future__ import annotations


class JobRejected(Exception):
    """The message cannot be served; it goes to the dead-letter topic with `code`.

    Codes: invalid_json, invalid_job, unknown_task, task_mismatch, unknown_adapter,
    context_exceeded, engine_error.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
