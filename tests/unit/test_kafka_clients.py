"""One Kafka client configuration: settings to each client kind's librdkafka settings, secrets
from files and never shown, librdkafka's log kept off stderr, errors classified and throttled,
and no client built anywhere but `workers/kafka/clients.py`."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from confluent_kafka import KafkaError
from structlog.testing import capture_logs

from workers.core.config import ConfigError, Settings
from workers.core.config.sources import MASK, effective_rows
from workers.kafka import clients
from workers.kafka.clients import (
    Cause,
    ErrorReporter,
    KafkaConnection,
    KafkaUnavailable,
    classify,
    describe,
)

ROOT = Path(__file__).resolve().parents[2]
UNREACHABLE = "127.0.0.1:1"


pytestmark = pytest.mark.usefixtures("isolated_settings")


def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KafkaConnection:
    secret = tmp_path / "kafka-password"
    secret.write_text("hunter2\n")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9093")
    monkeypatch.setenv("LORA_WORKERS_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("LORA_WORKERS_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("LORA_WORKERS_KAFKA__SASL_USERNAME", "worker")
    monkeypatch.setenv("LORA_WORKERS_KAFKA__LOG_LEVEL", "7")
    monkeypatch.setenv("LORA_WORKERS_KAFKA_SECRET_FILES__SASL_PASSWORD", str(secret))
    return KafkaConnection.from_settings(Settings.load().settings)


def test_every_client_kind_gets_the_clusters_settings_and_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What each client kind is built from: consumer, producer, transactional producer, admin,
    # whole-topic reader (each kind's function hands exactly this to confluent-kafka).
    kafka = secured(tmp_path, monkeypatch)
    built = [
        clients.client_config(kafka, {"group.id": "g"}),
        clients.client_config(kafka, {"acks": "all"}),
        clients.client_config(kafka, {"transactional.id": "t"}),
        clients.client_config(kafka, {}),
        clients.client_config(kafka, clients.reader_settings("read_uncommitted")),
    ]
    for config in built:
        assert config["bootstrap.servers"] == "broker:9093"
        assert config["security.protocol"] == "SASL_SSL"  # `_` in the variable stands for `.`
        assert config["sasl.mechanism"] == "SCRAM-SHA-512"
        assert config["log_level"] == "7"  # librdkafka's one key with an underscore
        assert config["sasl.password"] == "hunter2"  # read from the file, newline stripped
        assert config["logger"].name == "lora_workers.librdkafka"
        assert isinstance(config["error_cb"], ErrorReporter)
    consumer, producer, transactional, _admin, reader = built
    assert consumer["group.id"] == "g"
    assert producer["acks"] == "all"
    assert transactional["transactional.id"] == "t"
    assert reader["group.id"].startswith("lora-workers-reader-")
    assert reader["enable.auto.commit"] is False
    assert reader["isolation.level"] == "read_uncommitted"


def test_the_clusters_settings_win_over_a_clients_defaults() -> None:
    kafka = KafkaConnection("b:1", {"linger.ms": "50"})
    config = clients.client_config(kafka, {"linger.ms": 5, "acks": "all"})
    assert config["linger.ms"] == "50"
    assert config["acks"] == "all"


def test_a_transactional_producer_needs_its_id() -> None:
    with pytest.raises(ValueError, match=r"transactional\.id"):
        clients.transactional_producer("b:1", {})


def test_a_secret_file_is_read_when_each_client_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kafka = secured(tmp_path, monkeypatch)
    (tmp_path / "kafka-password").write_text("rotated")
    assert clients.client_config(kafka, {})["sasl.password"] == "rotated"


def test_an_unreadable_secret_file_is_one_line_without_the_secret(tmp_path: Path) -> None:
    kafka = KafkaConnection("b:1", secret_files={"sasl.password": tmp_path / "gone"})
    with pytest.raises(ConfigError) as raised:
        clients.producer(kafka, {})
    assert str(raised.value) == (
        f"kafka_secret_files.sasl.password: cannot read {tmp_path / 'gone'}: "
        "No such file or directory"
    )


def test_secrets_are_never_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_WORKERS_KAFKA__SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("LORA_WORKERS_KAFKA__SSL_KEY_PEM", "-----BEGIN hunter3")
    monkeypatch.setenv("LORA_WORKERS_KAFKA_SECRET_FILES__SASL_OAUTHBEARER_CLIENT_SECRET", "/s")
    loaded = Settings.load()
    rows = {name: value for name, value, _ in effective_rows(loaded)}
    assert rows["kafka.sasl_password"] == MASK
    assert rows["kafka.ssl_key_pem"] == MASK
    assert rows["kafka_secret_files.sasl_oauthbearer_client_secret"] == "/s"  # a path, shown
    kafka = KafkaConnection("b:1", loaded.settings.kafka)
    assert "hunter" not in repr(kafka)


# --- librdkafka's log and errors ---------------------------------------------------------------


def test_librdkafka_never_writes_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on port 1: librdkafka logs a failed connection on every retry.
    with capture_logs() as logged:
        producer = clients.producer(UNREACHABLE, {"reconnect.backoff.ms": 10})
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            producer.poll(0.1)
    assert not re.search(r"%\d\|", capfd.readouterr().err)  # librdkafka's lines: not on stderr
    assert any(e["event"] == "librdkafka" and e["log_level"] == "debug" for e in logged)
    # The failure is reported once, through the error callback.
    reported = [e for e in logged if e["event"] == "kafka_client_error"]
    assert len(reported) == 1 and reported[0]["error"].startswith("connection refused")


def error(code: int, text: str = "", fatal: bool = False) -> KafkaError:
    return KafkaError(code, text, fatal=fatal)


@pytest.mark.parametrize(
    ("raised", "cause"),
    [
        (error(KafkaError._RESOLVE, "Failed to resolve 'nohost:9092'"), Cause.RESOLVE),
        (error(KafkaError._TRANSPORT, "Connect failed: Connection refused"), Cause.REFUSED),
        (error(KafkaError._TRANSPORT, "Disconnected"), Cause.TRANSPORT),
        (error(KafkaError._SSL, "certificate verify failed"), Cause.TLS),
        (error(KafkaError._TRANSPORT, "SSL handshake failed"), Cause.TLS),
        (error(KafkaError._AUTHENTICATION, "SASL authentication error"), Cause.SASL),
        (error(KafkaError.SASL_AUTHENTICATION_FAILED), Cause.SASL),
        (error(KafkaError.TOPIC_AUTHORIZATION_FAILED), Cause.AUTHORIZATION),
        (error(KafkaError.GROUP_AUTHORIZATION_FAILED), Cause.AUTHORIZATION),
        (error(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED), Cause.AUTHORIZATION),
        (error(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"), None),
    ],
)
def test_errors_are_classified_by_cause(raised: KafkaError, cause: Cause | None) -> None:
    assert classify(raised) is cause


def test_an_authorization_error_says_what_was_denied() -> None:
    described = describe(error(KafkaError.GROUP_AUTHORIZATION_FAILED, "denied"))
    assert described == "not authorized (group): denied"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_lost_broker_is_one_warning_per_backoff_period() -> None:
    clock = Clock()
    reporter = ErrorReporter("b:1", period_s=10.0, clock=clock)
    refused = error(KafkaError._TRANSPORT, "Connection refused")
    with capture_logs() as logged:
        for _ in range(50):  # librdkafka retries many times a second
            reporter(refused)
            clock.now += 0.1
        reporter(refused)  # 5 s in: still within the period
        clock.now = 10.5
        reporter(refused)
    assert [(e["log_level"], e["repeated"]) for e in logged] == [("warning", 0), ("warning", 50)]


def test_fatal_errors_are_always_logged() -> None:
    reporter = ErrorReporter("b:1", period_s=10.0, clock=Clock())
    with capture_logs() as logged:
        for _ in range(3):
            reporter(error(KafkaError._FENCED, "fenced", fatal=True))
    assert [e["log_level"] for e in logged] == ["error"] * 3


def test_the_most_telling_error_names_the_cause() -> None:
    reporter = ErrorReporter("b:1", period_s=10.0, quiet=True)
    reporter(error(KafkaError._TRANSPORT, "Connection refused"))
    reporter(error(KafkaError._AUTHENTICATION, "SASL authentication error: invalid credentials"))
    reporter(error(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    reporter(error(KafkaError._TRANSPORT, "Disconnected"))
    assert str(reporter.unavailable("timed out")) == (
        "cannot use Kafka at b:1: SASL authentication failed: "
        "SASL authentication error: invalid credentials"
    )


def test_probing_an_unreachable_cluster_is_one_line_naming_it_and_the_cause() -> None:
    started = time.monotonic()
    with pytest.raises(KafkaUnavailable) as raised:
        clients.probe(UNREACHABLE, timeout_s=2.0)
    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert message.startswith(f"cannot use Kafka at {UNREACHABLE}: connection refused: ")
    assert "\n" not in message


def test_probing_an_unknown_host_names_name_resolution() -> None:
    with pytest.raises(KafkaUnavailable, match="name resolution failed"):
        clients.probe("nohost.invalid:9092", timeout_s=2.0)


# --- one place builds clients ------------------------------------------------------------------


def test_no_kafka_client_is_built_outside_the_builder() -> None:
    built_here = ROOT / "workers" / "kafka" / "clients.py"
    hand_built = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "workers").rglob("*.py"))
        if path != built_here
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\b(Consumer|Producer|AdminClient)\(", line)
    ]
    assert hand_built == []


def test_the_line_drops_librdkafkas_timing_and_falls_back_to_the_request_error() -> None:
    refused = error(
        KafkaError._TRANSPORT, "b:1/bootstrap: Connection refused (after 0ms in state CONNECT)"
    )
    assert describe(refused) == "connection refused: b:1/bootstrap: Connection refused"
    reporter = ErrorReporter("b:1", period_s=10.0, quiet=True)
    failed = error(KafkaError._TRANSPORT, "Failed to get metadata: Local: Broker transport failure")
    assert str(reporter.unavailable(failed)) == (
        "cannot use Kafka at b:1: connection failed: "
        "Failed to get metadata: Local: Broker transport failure"
    )


def test_secret_files_in_the_configuration_file_are_relative_to_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "project" / "secrets").mkdir(parents=True)
    (tmp_path / "project" / "secrets" / "kafka-password").write_text("hunter2\n")
    config = tmp_path / "project" / "lora-workers.yaml"
    config.write_text(
        "bootstrap_servers: broker:9093\n"
        "kafka:\n  sasl.username: worker\n"
        "kafka_secret_files:\n  sasl.password: secrets/kafka-password\n"
    )
    settings = Settings.load(config=config).settings
    built = clients.client_config(KafkaConnection.from_settings(settings), {"group.id": "g"})
    assert built["sasl.password"] == "hunter2"
    assert built["sasl.username"] == "worker"
