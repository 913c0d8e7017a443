"""A valid `Result` for tests, with the fields a test cares about overridden."""

from __future__ import annotations

from typing import Any

from workers.core.contracts import Result


def make_result(**fields: Any) -> Result:
    document: dict[str, Any] = {
        "job_id": "j-1",
        "task": "classify",
        "status": "ok",
        "output": {"label": "billing"},
        "raw_output": '{"label": "billing"}',
        "adapter": {"name": "classifier", "version": "1"},
        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
        "error": None,
        "metadata": None,
        "timings": {
            "enqueued_at_ms": 1,
            "received_at_ms": 2,
            "completed_at_ms": 3,
            "queue_ms": 1.5,
            "generate_ms": 2.5,
        },
    }
    return Result.model_validate({**document, **fields})
