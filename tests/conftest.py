from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import kafka_broker


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with kafka_broker(tmp_path_factory.mktemp("kafka-local")) as (bootstrap, provider):
        print(f"\nintegration broker: {provider} at {bootstrap}")
        yield bootstrap


def pytest_report_header() -> list[str]:
    return ["integration tests use a real Apache Kafka broker and a real vLLM engine"]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
