"""Property-based tests of the intake: whatever bytes arrive, exactly one answer comes out (a
prepared job, or a rejection that becomes a writable dead letter), never another exception."""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_prepare import message, preparer
from workers.core.config import SizeSettings
from workers.core.contracts import MAX_SEED
from workers.core.errors import JobRejected
from workers.core.messages import SourceMessage
from workers.core.prepare import MAX_JSON_DEPTH, PreparedJob
from workers.kafka.sinks import dead_letter_record

SIZES = SizeSettings(max_message_bytes=20_000, max_job_bytes=4096, dead_letter_prefix_bytes=64)
# Any code point, lone surrogates often: JSON escapes can carry them.
ANY_TEXT = st.lists(
    st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr)), max_size=40
).map("".join)
JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    ANY_TEXT,
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(ANY_TEXT, children, max_size=4)
    ),
    max_leaves=30,
)
NUMBERS = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    ANY_TEXT,
)
JOBS = st.fixed_dictionaries(
    {
        "job_id": st.one_of(ANY_TEXT, st.integers(), st.none()),
        "task": st.sampled_from(["classify", "reply", "summarize", "translate", "", "classify\0"]),
        "input": st.one_of(ANY_TEXT, JSON_VALUES),
    },
    optional={
        "tenant": st.one_of(ANY_TEXT, st.sampled_from(["acme", "globex"])),
        "adapter": st.one_of(ANY_TEXT, st.sampled_from(["classifier", "../etc", "summarizer"])),
        "params": st.one_of(
            st.fixed_dictionaries(
                {},
                optional={"max_tokens": NUMBERS, "temperature": NUMBERS, "seed": NUMBERS},
            ),
            JSON_VALUES,
        ),
        "metadata": JSON_VALUES,
        "extra": JSON_VALUES,
    },
)
DEPTH = st.integers(min_value=MAX_JSON_DEPTH, max_value=20_000)  # past the depth limit
HOSTILE_TEXT = st.one_of(
    DEPTH.map(lambda n: "[" * n + "]" * n),
    DEPTH.map(
        lambda n: (
            '{"job_id": "d", "task": "classify", "input": "x", "metadata": '
            + '{"a": ' * n
            + "1"
            + "}" * n
            + "}"
        )
    ),
    st.integers(min_value=20, max_value=20_000).map(  # past 64 bits, up to past the digit limit
        lambda n: (
            '{"job_id": "n", "task": "classify", "input": "x", "params": {"seed": ' + "9" * n + "}}"
        )
    ),
    st.sampled_from(
        [
            '{"job_id": "\\ud800", "task": "classify", "input": "x"}',
            '{"job_id": "s", "task": "classify", "input": "\\udfff tail"}',
            '{"job_id": "m", "task": "classify", "input": "x", "metadata": {"\\ud83d": 1}}',
            '{"job_id": "f", "task": "classify", "input": "x", "params": {"temperature": NaN}}',
            '{"job_id": "i", "task": "classify", "input": "x", "params": {"temperature": 1e999}}',
            '{"job_id": "b", "task": "classify", "input": "x", "params": {"seed": 1e30}}',
            '{"job_id": "neg", "task": "classify", "input": "x", "params": {"seed": -1}}',
        ]
    ),
)


def answer_once(value: bytes | None, topic: str = "jobs.classify") -> PreparedJob | JobRejected:
    source = SourceMessage(topic, 0, 7, b"key", value, [("trace", b"t")], 0)
    try:
        prepared = preparer().prepare(source)
    except JobRejected as rejection:
        record = dead_letter_record("jobs.classify.dlq", source, rejection, SIZES)
        assert all(isinstance(v, bytes) for _, v in record.headers)
        assert record.size <= SIZES.max_message_bytes
        return rejection
    request = prepared.request
    assert 1 <= request.max_tokens <= 4096
    assert math.isfinite(request.temperature) and 0 <= request.temperature <= 2
    assert request.seed is None or 0 <= request.seed <= MAX_SEED
    prepared.job.model_dump_json()  # its fields are written back in its result
    return prepared


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.binary(max_size=6000))
def test_arbitrary_bytes(value: bytes) -> None:
    answer_once(value)


@PROPERTY
@given(JOBS)
def test_hostile_field_values(job: dict) -> None:
    answer_once(json.dumps(job).encode())


@PROPERTY
@given(HOSTILE_TEXT)
def test_hostile_structure(text: str) -> None:
    answer = answer_once(text.encode())
    assert isinstance(answer, JobRejected), text[:200]


def test_a_job_past_max_job_bytes_keeps_only_a_prefix_in_its_dead_letter() -> None:
    value = json.dumps({"job_id": "big", "task": "classify", "input": "x" * 10_000}).encode()
    source = message(value)
    rejection = answer_once(value)
    assert isinstance(rejection, JobRejected) and rejection.code == "job_too_large"
    record = dead_letter_record("dlq", source, rejection, SIZES)
    headers = dict(record.headers)
    assert record.value == value[: SIZES.dead_letter_prefix_bytes]
    assert headers["dlq.original.size"] == str(source.size).encode()
    assert len(headers["dlq.original.sha256"]) == 64
