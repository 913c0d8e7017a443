"""Transient metadata errors (a partition the client has not cached yet, a leader being
elected) are asked again within a bound; anything else raises at once."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from workers.kafka.topics import with_metadata_retries


class Flaky:
    def __init__(self, failures: list[int]) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise KafkaException(KafkaError(self.failures.pop(0)))
        return "metadata"


def test_a_transient_unknown_partition_is_asked_again() -> None:
    sleeps: list[float] = []
    call = Flaky([KafkaError._UNKNOWN_PARTITION, KafkaError.LEADER_NOT_AVAILABLE])
    assert with_metadata_retries(call, sleep=sleeps.append) == "metadata"
    assert call.calls == 3
    assert sleeps == [0.25, 0.5]


def test_retries_are_bounded_and_the_last_error_raises() -> None:
    sleeps: list[float] = []
    call = Flaky([KafkaError._UNKNOWN_PARTITION] * 10)
    with pytest.raises(KafkaException) as raised:
        with_metadata_retries(call, attempts=4, sleep=sleeps.append)
    assert raised.value.args[0].code() == KafkaError._UNKNOWN_PARTITION
    assert call.calls == 4
    assert len(sleeps) == 3 and max(sleeps) <= 5.0


def test_a_lasting_error_raises_at_once() -> None:
    call = Flaky([KafkaError.TOPIC_AUTHORIZATION_FAILED])
    with pytest.raises(KafkaException):
        with_metadata_retries(call, sleep=lambda _s: None)
    assert call.calls == 1
