"""The product on a secured Kafka: `ops/kafka-local start --secure` (TLS, SASL/SCRAM-SHA-512, the
StandardAuthorizer denying what no ACL allows), each client as the principal docs/security.md
gives it, with exactly the ACLs `topics create --acls` applies (workers/kafka/acls.py).

One broker for the module (its own, not the shared plaintext one); one engine-using test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import ROOT, SecureBroker, secure_local_broker
from tests.integration.harness import Deployment, deploy, job_records, mixed_jobs, wait_for_event
from tests.integration.processes import kill_9_leaving_no_orphans
from workers.core.config import Settings, load_pipelines
from workers.kafka.acls import acl_set
from workers.kafka.clients import KafkaConnection, producer
from workers.kafka.topics import read_to_end

pytestmark = pytest.mark.integration

FAIL_FAST_S = 20.0
SECURE_COMPOSE = ("docker", "compose", "-f", "compose.yaml", "-f", "compose.secure.yaml")
# What librdkafka writes when it logs on its own: "%3|1700000000.123|FAIL|rdkafka#...".
LIBRDKAFKA_MARKS = ("rdkafka", "%3|", "%4|", "%6|", "%7|")


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    with secure_local_broker(tmp_path_factory.mktemp("kafka-secure")) as broker:
        yield broker


def connection(broker: SecureBroker, principal: str) -> KafkaConnection:
    options = broker.librdkafka(principal)
    return KafkaConnection(options.pop("bootstrap.servers"), options)


def as_principal(monkeypatch: pytest.MonkeyPatch, broker: SecureBroker, principal: str) -> None:
    """Every CLI process the harness starts from now on connects as `principal`."""
    for key in [k for k in os.environ if k.startswith("LORA_WORKERS_KAFKA")]:
        monkeypatch.delenv(key)
    for key, value in broker.env(principal).items():
        monkeypatch.setenv(key, value)


def secure_deploy(
    broker: SecureBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Deployment:
    """The harness's topics for this test, made by `admin` with the three principals' ACLs."""
    as_principal(monkeypatch, broker, "admin")
    deployment = deploy(broker.bootstrap, tmp_path)
    granted = deployment.cli("topics", "create", "--acls")
    assert granted.returncode == 0, granted.stderr
    assert "acl      worker" in granted.stdout
    return deployment


def publish_as_publisher(broker: SecureBroker, records: list) -> None:
    client = producer(connection(broker, "publisher"), {"enable.idempotence": True})
    failures: list[str] = []

    def delivered(error, _message) -> None:  # type: ignore[no-untyped-def]
        if error is not None:
            failures.append(str(error))

    for topic, key, value, headers in records:
        client.produce(topic, key=key, value=value, headers=headers, on_delivery=delivered)
        client.poll(0)
    assert client.flush(60) == 0
    assert not failures, failures


def test_jobs_are_answered_exactly_once_across_a_kill_9_over_tls_and_scram(
    secure: SecureBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = secure_deploy(secure, tmp_path, monkeypatch)
    jobs = mixed_jobs(90, seed=21, prefix="tls")
    poison = (deployment.pipelines["classify"].input_topic, b"poison", b"{not json", [])
    publish_as_publisher(secure, [*job_records(deployment, jobs), poison])

    # The worker holds only the worker principal's ACLs: consume, transactions, results,
    # dead letters, statuses. The same replica twice, as a restarted pod.
    worker_env = {**secure.env("worker"), "LORA_WORKERS_INSTANCE_ID": "replica-0"}
    fast = {"LORA_WORKERS_KAFKA__SESSION_TIMEOUT_MS": "6000"}
    try:
        log_path = tmp_path / "killed.log"
        worker = deployment.start_worker(log_path=log_path, **worker_env, **fast)
        wait_for_event(worker, log_path, "transaction_committed", 1)
        kill_9_leaving_no_orphans(worker, log_path)
        last_log = tmp_path / "last.log"
        code = deployment.run_worker(
            "--idle-exit", "20", log_path=last_log, settings={**worker_env, **fast}
        )
        assert code == 0, last_log.read_text(errors="replace")[-3000:]
    finally:
        deployment.kill_workers()
    # The worker's ACLs are enough: nothing it did was refused.
    for log in (log_path, last_log):
        text = log.read_text(errors="replace").lower()
        assert "not authorized" not in text and "authorization failed" not in text, log

    # Read back as the publisher: its own answers and dead letters.
    reader = connection(secure, "publisher")
    results = [p.result_topic for p in deployment.pipelines.values()]
    committed = Counter(json.loads(m.value())["job_id"] for m in read_to_end(reader, results))
    assert set(committed) == {job["job_id"] for job in jobs}
    assert max(committed.values()) == 1, [j for j, n in committed.items() if n > 1][:10]
    dead = list(read_to_end(reader, [deployment.pipelines["classify"].dlq_topic]))
    assert [m.key() for m in dead] == [b"poison"]


def test_the_publisher_is_refused_on_adapter_updates_in_one_line(
    secure: SecureBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = secure_deploy(secure, tmp_path, monkeypatch)
    as_principal(monkeypatch, secure, "publisher")
    path = ROOT / "models" / "adapters" / "classifier"
    refused = deployment.cli(
        "adapters", "publish", "classifier", "--version", "9", "--path", str(path)
    )
    assert refused.returncode != 0, refused.stdout
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "not authorized" in lines[0], lines[0]
    # The adapter-admin may: the refusal is the principal's, not the command's.
    as_principal(monkeypatch, secure, "adapter-admin")
    allowed = deployment.cli(
        "adapters", "publish", "classifier", "--version", "9", "--path", str(path)
    )
    assert allowed.returncode == 0, allowed.stderr


class Relay:
    """A TCP relay on another loopback address (127.0.0.2): the same broker, reached by a name
    its certificate does not carry."""

    def __init__(self, target_port: int) -> None:
        self._server = socket.create_server(("127.0.0.2", 0))
        self.port = self._server.getsockname()[1]
        self._target = ("127.0.0.1", target_port)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()

    def close(self) -> None:
        self._server.close()


@pytest.mark.parametrize(
    ("fault", "says"),
    [
        ("wrong password", "SASL authentication failed"),
        ("unknown CA", "TLS handshake failed"),
        ("wrong hostname", "TLS handshake failed"),
    ],
)
def test_a_misconfigured_client_fails_fast_in_one_line(
    secure: SecureBroker, tmp_path: Path, fault: str, says: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_WORKERS_KAFKA")}
    env |= secure.env("publisher")
    relay = None
    if fault == "wrong password":
        env["LORA_WORKERS_KAFKA__SASL_PASSWORD"] = "not-the-password"
    elif fault == "unknown CA":
        other_ca = tmp_path / "other-ca"
        subprocess.run([str(ROOT / "ops" / "kafka-tls"), str(other_ca), "localhost"], check=True)
        env["LORA_WORKERS_KAFKA__SSL_CA_LOCATION"] = str(other_ca / "ca.pem")
    else:
        relay = Relay(int(secure.bootstrap.rsplit(":", 1)[1]))
        env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.2:{relay.port}"
    started = time.monotonic()
    try:
        outcome = subprocess.run(
            [sys.executable, "-m", "workers", "results"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        if relay is not None:
            relay.close()
    elapsed = time.monotonic() - started
    assert outcome.returncode != 0, outcome.stdout
    assert elapsed < FAIL_FAST_S, f"{fault}: {elapsed:.1f} s"
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1, outcome.stderr[-3000:]
    assert says in lines[0], lines[0]
    assert env["KAFKA_BOOTSTRAP_SERVERS"] in lines[0], lines[0]
    assert not any(mark in lines[0] for mark in LIBRDKAFKA_MARKS), lines[0]


def test_the_secure_compose_stack_gives_each_service_its_principal() -> None:
    """`docker compose config` accepts the override, and every Kafka client in the stack
    connects over TLS + SCRAM as its own principal, its password from a file on a volume no
    other client mounts."""
    # A fresh machine may have no Compose plugin (or no docker CLI): the same script as the
    # compose stack test provides them (building Compose from its Go module takes minutes once).
    subprocess.run([str(ROOT / "ops" / "compose-cli")], check=True, timeout=1200)
    rendered = subprocess.run(
        [*SECURE_COMPOSE, "config", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rendered.returncode == 0, rendered.stderr
    services = json.loads(rendered.stdout)["services"]
    assert services["kafka"]["entrypoint"] == ["/ops/secure/kafka-start"]
    assert "kafka-secrets" in services["kafka"]["depends_on"]
    clients = [("topics", "admin"), ("worker", "worker"), ("publisher", "publisher")]
    for service, principal in clients:
        env = services[service]["environment"]
        assert env["LORA_WORKERS_KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL", service
        assert env["LORA_WORKERS_KAFKA__SASL_MECHANISM"] == "SCRAM-SHA-512", service
        assert env["LORA_WORKERS_KAFKA__SASL_USERNAME"] == principal, service
        assert env["LORA_WORKERS_KAFKA_SECRET_FILES__SASL_PASSWORD"] == "/secrets/password"
        assert not any(key.endswith("SASL_PASSWORD") and "FILES" not in key for key in env)
        volumes = [v["source"] for v in services[service]["volumes"]]
        assert volumes == [f"{principal}-secrets"], (service, volumes)
    assert "--acls" in services["topics"]["command"]


# docs/security.md's table, for the shipped pipelines and default settings.
TASKS = ("classify", "reply", "summarize")
DOCUMENTED_ACLS = {
    ("worker", "READ", "topic", "prefix", "jobs."),
    ("worker", "READ", "topic", "literal", "adapters.updates"),
    ("worker", "READ", "topic", "literal", "adapters.status"),
    ("worker", "READ", "group", "prefix", "lora-workers"),
    ("worker", "WRITE", "topic", "prefix", "results."),
    *(("worker", "WRITE", "topic", "literal", f"jobs.{task}.dlq") for task in TASKS),
    ("worker", "WRITE", "topic", "literal", "jobs.dlq"),
    ("worker", "WRITE", "topic", "literal", "adapters.status"),
    ("worker", "WRITE", "topic", "literal", "adapters.evaluations"),
    ("worker", "WRITE", "transactional_id", "prefix", "lora-workers."),
    ("worker", "IDEMPOTENT_WRITE", "cluster", "literal", "kafka-cluster"),
    ("publisher", "WRITE", "topic", "prefix", "jobs."),
    ("publisher", "READ", "topic", "prefix", "results."),
    *(("publisher", "READ", "topic", "literal", f"jobs.{task}.dlq") for task in TASKS),
    ("publisher", "READ", "topic", "literal", "jobs.dlq"),
    ("publisher", "READ", "group", "prefix", "lora-workers-reader-"),
    ("adapter-admin", "READ", "topic", "literal", "adapters.updates"),
    ("adapter-admin", "WRITE", "topic", "literal", "adapters.updates"),
    ("adapter-admin", "READ", "topic", "literal", "adapters.status"),
    ("adapter-admin", "READ", "topic", "literal", "adapters.evaluations"),
    ("adapter-admin", "READ", "group", "prefix", "lora-workers-reader-"),
    ("worker", "WRITE", "topic", "prefix", "replies."),
    ("publisher", "READ", "topic", "prefix", "replies."),
}


def test_the_acl_set_is_the_documented_one_and_follows_the_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in [k for k in os.environ if k.startswith("LORA_WORKERS_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(ROOT)
    settings = Settings.load({}).settings
    pipelines = load_pipelines(ROOT / "pipelines")
    lines = {tuple(grant.line().split()) for grant in acl_set(settings, pipelines)}
    assert lines == DOCUMENTED_ACLS

    # Another group, and a pipeline off the naming convention: exactly its topics, literally.
    team = Settings.load({"group_id": "team-a"}).settings
    pipelines["classify"] = pipelines["classify"].model_copy(update={"input_topic": "orders-in"})
    lines = {tuple(grant.line().split()) for grant in acl_set(team, pipelines)}
    assert ("worker", "READ", "topic", "literal", "orders-in") in lines
    assert ("worker", "WRITE", "topic", "literal", "orders-in.dlq") in lines
    assert ("publisher", "WRITE", "topic", "literal", "orders-in") in lines
    assert ("worker", "WRITE", "transactional_id", "prefix", "team-a.") in lines
    worker_groups = {line[4] for line in lines if line[0] == "worker" and line[2] == "group"}
    assert worker_groups == {"team-a", "lora-workers-reader-", "lora-workers-adapters-"}
