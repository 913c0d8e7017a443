"""A real Apache Kafka broker for integration tests, found in this order:

1. `KAFKA_BOOTSTRAP_SERVERS`, if set (CI or a developer's own broker);
2. an apache/kafka container through testcontainers, if a Docker engine answers and the
   container starts (an engine without a reachable registry cannot pull the image);
3. `ops/kafka-local` (Apache Kafka jars from Maven Central, run with the machine's Java).

Never an in-memory or mock broker.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KAFKA_IMAGE = "apache/kafka:4.1.1"


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def _container_broker() -> Iterator[str]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    port = _free_port()
    # A fixed host port, because the broker must advertise the address clients dial.
    container = (
        DockerContainer(KAFKA_IMAGE)
        .with_bind_ports(9092, port)
        .with_env("KAFKA_NODE_ID", "1")
        .with_env("KAFKA_PROCESS_ROLES", "broker,controller")
        .with_env("KAFKA_LISTENERS", "PLAINTEXT://:9092,CONTROLLER://:9093")
        .with_env("KAFKA_ADVERTISED_LISTENERS", f"PLAINTEXT://127.0.0.1:{port}")
        .with_env("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER")
        .with_env(
            "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
        )
        .with_env("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093")
        .with_env("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
        .with_env("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
        .with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false")
    )
    with container:
        wait_for_logs(container, "Kafka Server started", timeout=120)
        yield f"127.0.0.1:{port}"


@contextmanager
def _local_broker(state_dir: Path) -> Iterator[str]:
    script = ROOT / "ops" / "kafka-local"
    env = {**os.environ, "KAFKA_LOCAL_STATE": str(state_dir)}
    started = subprocess.run(
        [str(script), "start"], env=env, capture_output=True, text=True, timeout=300
    )
    if started.returncode != 0:
        raise RuntimeError(f"ops/kafka-local start failed: {started.stderr.strip()}")
    line = started.stdout.strip().splitlines()[-1]
    try:
        yield line.removeprefix("KAFKA_BOOTSTRAP_SERVERS=")
    finally:
        subprocess.run([str(script), "stop"], env=env, capture_output=True, timeout=120)


@dataclass(frozen=True)
class SecureBroker:
    """A broker from `ops/kafka-local start --secure`: TLS + SCRAM-SHA-512 + ACLs, with the
    `admin` super user and the worker, publisher and adapter-admin principals."""

    bootstrap: str
    state_dir: Path

    @property
    def ca(self) -> Path:
        return self.state_dir / "tls" / "ca.pem"

    def env(self, principal: str) -> dict[str, str]:
        """The principal's settings as `lora-workers` reads them from the environment."""
        lines = (self.state_dir / f"{principal}.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def librdkafka(self, principal: str) -> dict[str, str]:
        """The same settings as a librdkafka configuration, bootstrap servers included."""
        prefix = "LORA_WORKERS_KAFKA__"
        return {"bootstrap.servers": self.bootstrap} | {
            key.removeprefix(prefix).lower().replace("_", "."): value
            for key, value in self.env(principal).items()
            if key.startswith(prefix)
        }


@contextmanager
def secure_local_broker(state_dir: Path) -> Iterator[SecureBroker]:
    """Its own secured broker (the shared one stays plaintext), stopped afterwards."""
    script = ROOT / "ops" / "kafka-local"
    env = {**os.environ, "KAFKA_LOCAL_STATE": str(state_dir)}
    started = subprocess.run(
        [str(script), "start", "--secure"], env=env, capture_output=True, text=True, timeout=300
    )
    try:
        if started.returncode != 0:
            raise RuntimeError(f"ops/kafka-local start --secure failed: {started.stderr.strip()}")
        line = started.stdout.strip().splitlines()[-1]
        yield SecureBroker(line.removeprefix("KAFKA_BOOTSTRAP_SERVERS="), state_dir)
    finally:
        subprocess.run([str(script), "stop"], env=env, capture_output=True, timeout=120)


@contextmanager
def kafka_broker(state_dir: Path) -> Iterator[tuple[str, str]]:
    """Yields (bootstrap servers, how the broker was provided)."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"], "KAFKA_BOOTSTRAP_SERVERS"
        return
    with ExitStack() as stack:
        how = f"testcontainers {KAFKA_IMAGE}"
        try:
            if not _docker_answers():
                raise RuntimeError("no Docker engine answers")
            bootstrap = stack.enter_context(_container_broker())
        except Exception as exc:  # no engine, no image, no registry: the local broker then
            how = f"ops/kafka-local (container: {type(exc).__name__}: {str(exc)[:120]})"
            bootstrap = stack.enter_context(_local_broker(state_dir))
        yield bootstrap, how
