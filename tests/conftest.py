import os
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


@pytest.fixture(scope="session", autouse=True)
def own_merged_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Bulk runs plan from the costs earlier runs stored; tests must not read (or write) the
    machine's own, so every worker and bulk command they start gets a cache of the session's."""
    saved = os.environ.get("LORA_WORKERS_MERGE__CACHE_DIR")
    os.environ["LORA_WORKERS_MERGE__CACHE_DIR"] = str(tmp_path_factory.mktemp("merged-cache"))
    yield
    if saved is None:
        os.environ.pop("LORA_WORKERS_MERGE__CACHE_DIR", None)
    else:
        os.environ["LORA_WORKERS_MERGE__CACHE_DIR"] = saved


@pytest.fixture
def isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings as on a clean machine: no LORA_WORKERS_* variables or broker address from the
    caller, and a current directory without a configuration file."""
    for name in list(os.environ):
        if name.startswith("LORA_WORKERS_") or name == "KAFKA_BOOTSTRAP_SERVERS":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
