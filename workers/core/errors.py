"""Every code the workers can give for a job or adapter they did not serve normally, and the
two rejections that carry them.

Two rejection types because they go two ways: a `JobRejected` answers one message (a dead letter
or an `error` row), an `AdapterRejected` refuses one adapter version (an `adapters.status`
record) while the previous version keeps serving. Both take their code from the enums below, so
a code that is not listed here cannot be produced.
"""

from __future__ import annotations

from enum import StrEnum


class JobError(StrEnum):
    """Why a message got no normal result: the `dlq.error.code` header of its dead letter, or
    the `error.code` of an `error` result (bulk rows, or a result too large to write)."""

    JOB_TOO_LARGE = "job_too_large"  # value above max_job_bytes; the dead letter keeps a prefix
    INVALID_JSON = "invalid_json"  # no value, or not UTF-8 JSON
    INVALID_JOB = "invalid_job"  # JSON, but not a job (schema, types, bounds)
    UNKNOWN_TASK = "unknown_task"  # no pipeline serves the job's task
    TASK_MISMATCH = "task_mismatch"  # a known task on another task's topic
    UNKNOWN_ADAPTER = "unknown_adapter"  # routed to an adapter this worker does not serve
    ADAPTER_FORBIDDEN = "adapter_forbidden"  # the adapter's tenant list excludes the job's tenant
    ADAPTER_UNAVAILABLE = "adapter_unavailable"  # its files failed the checks on a reload
    CONTEXT_EXCEEDED = "context_exceeded"  # prompt plus max_tokens exceed the model's context
    CHAT_TEMPLATE_MISSING = "chat_template_missing"  # a chat job; no template in model or pipeline
    ENGINE_CRASH = "engine_crash"  # the engine died `crash_attempts` times on this job alone
    INTERNAL_ERROR = "internal_error"  # anything else this message alone raised (a bug or a limit)
    RESULT_TOO_LARGE = "result_too_large"  # an error result in place of one too large to write
    UNDELIVERABLE = "undeliverable"  # its answer could not be written; this minimal one was


# Outcomes of the moment, not of the job (an engine death, a bug, files briefly unreadable): a
# replay may decide otherwise, so bulk resume serves such rows again.
TRANSIENT_JOB_ERRORS = frozenset(
    {JobError.ENGINE_CRASH, JobError.INTERNAL_ERROR, JobError.ADAPTER_UNAVAILABLE}
)


class OutputError(StrEnum):
    """Why a generated output is not valid: `error.code` of an `invalid_output` result."""

    TRUNCATED = "truncated"  # not JSON because max_tokens cut it off
    INVALID_JSON = "invalid_json"  # not JSON although generation ended by itself
    SCHEMA_VIOLATION = "schema_violation"  # JSON, but not valid against the task's schema


class AdapterError(StrEnum):
    """Why an adapter version was refused: `code` of its `rejected` status record."""

    MALFORMED_UPDATE = "malformed_update"  # the update record is not a valid update
    PATH_OUTSIDE_ROOTS = "path_outside_roots"  # resolves outside adapters.allowed_roots
    PATH_MISSING = "path_missing"  # not a directory
    FILES_MISSING = "files_missing"  # no adapter_config.json or no weights file
    FILES_UNREADABLE = "files_unreadable"  # reading the path or files failed (permissions, I/O)
    CHECKSUM_MISMATCH = "checksum_mismatch"  # the files are not the ones announced
    INVALID_ADAPTER_CONFIG = "invalid_adapter_config"  # adapter_config.json unreadable
    BASE_MODEL_MISMATCH = "base_model_mismatch"  # trained on another base model
    RANK_TOO_LARGE = "rank_too_large"  # rank above engine.max_lora_rank
    TARGET_MODULES_UNSUPPORTED = "target_modules_unsupported"  # modules vLLM cannot serve
    VERSION_CONFLICT = "version_conflict"  # a served version number republished with other files
    LOAD_FAILED = "load_failed"  # the engine refused it (add_lora)
    MERGED_ONE_VERSION = "merged_one_version"  # a merged worker serves one version, no canary
    UPDATE_FAILED = "update_failed"  # anything else applying the update raised (a bug or a limit)


# A reason travels in a header or a row; it quotes input at most this far.
MAX_REASON_CHARS = 1000


class Rejection(Exception):
    code: StrEnum

    def __init__(self, code: StrEnum, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class JobRejected(Rejection):
    """The message cannot be served; it is answered with `code` and `message` instead."""

    code: JobError

    def __init__(self, code: JobError, message: str, exception: str | None = None) -> None:
        super().__init__(JobError(code), message)
        self.exception = exception  # the exception's type, for internal_error

    @classmethod
    def internal(cls, error: BaseException) -> JobRejected:
        """What one message raised, as its answer; the traceback goes to the log."""
        text = str(error)
        if len(text) > MAX_REASON_CHARS:
            text = text[:MAX_REASON_CHARS] + "..."
        name = type(error).__name__
        return cls(JobError.INTERNAL_ERROR, f"{name}: {text}", exception=name)


class AdapterRejected(Rejection):
    """The adapter version is refused; the adapter's previous state keeps serving."""

    code: AdapterError

    def __init__(self, code: AdapterError, message: str) -> None:
        super().__init__(AdapterError(code), message)
