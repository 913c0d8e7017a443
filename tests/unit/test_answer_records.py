"""Answer records (plain data): the job's trace context travels with its answers, and results
too large to write are replaced, not dropped."""

from __future__ import annotations

from tests.unit.results import make_result
from workers.core.config import SizeSettings
from workers.core.contracts import Result
from workers.core.errors import JobError, JobRejected
from workers.core.messages import SourceMessage
from workers.kafka.sinks import dead_letter_record, result_record, undeliverable_record

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SIZES = SizeSettings(max_message_bytes=20_000, max_job_bytes=8_000)


def message(*headers: tuple[str, bytes | None]) -> SourceMessage:
    return SourceMessage("jobs.classify", 1, 42, b"j-1", b"{}", list(headers), 0)


def test_only_a_valid_traceparent_is_recognised() -> None:
    assert message(("traceparent", TRACE.encode())).traceparent == TRACE
    assert message(("Traceparent", TRACE.encode())).traceparent == TRACE
    for bad in (b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", b"garbage", b"", None):
        assert message(("traceparent", bad)).traceparent is None


def test_the_trace_travels_to_the_result_the_dead_letter_and_the_undeliverable() -> None:
    source = message(("traceparent", TRACE.encode()), ("x-other", b"1"))
    record = result_record("results.classify", "jobs.classify.dlq", make_result(), SIZES, TRACE)
    assert dict(record.headers)["traceparent"] == TRACE.encode()
    rejection = JobRejected(JobError.INVALID_JOB, "no input")
    dead = dead_letter_record("jobs.classify.dlq", source, rejection, SIZES)
    assert dict(dead.headers)["traceparent"] == TRACE.encode()
    minimal = undeliverable_record(record, ("jobs.classify", 1, 42), "refused")
    headers = dict(minimal.headers)
    assert minimal.value is None and headers["traceparent"] == TRACE.encode()
    assert headers["dlq.error.code"] == b"undeliverable"
    assert headers["dlq.original.topic"] == b"results.classify"
    untraced = result_record("results.classify", "jobs.classify.dlq", make_result(), SIZES)
    assert "traceparent" not in dict(untraced.headers)


def test_a_result_too_large_to_write_becomes_an_error_result_without_metadata() -> None:
    big = make_result(metadata={"pad": "x" * 30_000})
    record = result_record("results.classify", "jobs.classify.dlq", big, SIZES)
    written = Result.model_validate_json(record.value or b"")
    assert record.size < SIZES.max_message_bytes
    assert (written.status, written.error and written.error.code) == ("error", "result_too_large")
    assert written.metadata is None and written.output is None
    assert written.adapter == big.adapter and written.usage == big.usage
