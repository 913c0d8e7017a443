"""Every Kafka client the project creates, built from one configuration.

The configuration is `KafkaConnection`: the bootstrap servers, the `kafka:` mapping of
librdkafka settings (file, or `LORA_WORKERS_KAFKA__<KEY>` per key, `_` standing for `.`), and
`kafka_secret_files:` (librdkafka key -> file holding its value, read each time a client is
built, never logged). Build it once with `KafkaConnection.from_settings(settings)`; a plain
bootstrap string is accepted wherever a connection is (an unsecured cluster, e.g. in tests).

One function per client kind; nothing else in `workers/` calls `Consumer(`, `Producer(` or
`AdminClient(` (tests/unit/test_kafka_clients.py checks):

- `consumer(kafka, config)`: a group consumer (`config` holds group.id and the rest).
- `producer(kafka, config)`: a plain or idempotent producer.
- `transactional_producer(kafka, config)`: `config` must hold `transactional.id`.
- `admin_client(kafka)`: topic administration (and ACLs).
- `reader(kafka, isolation=...)`: a short-lived consumer with a throwaway group that never
  commits, for whole-topic reads (`results`, `adapters list`, status reads).
- `probe(kafka, timeout_s=10)`: a metadata request; `KafkaUnavailable` with one line naming
  the bootstrap servers and the cause if the cluster cannot be used.

Errors: `classify(error)` names the cause (`Cause`: SASL, TLS, authorization, name
resolution, connection refused, other transport), `describe(error)` makes it one line, and
`denied_for_good(error)` tells a refused group, transactional id or cluster (the worker stops)
from a refused topic (its answers are dead-lettered).

Precedence inside a client's configuration: the kind's defaults and `config` < the `kafka:`
settings < secrets from files. Every client logs librdkafka's own lines to the structured log
at debug level (never to stderr) and reports its errors through `ErrorReporter`: one warning
per cause per reconnect backoff period (`reconnect.backoff.max.ms`, 10 s by default).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from workers.core.config import ConfigError
from workers.core.config.sources import librdkafka_key
from workers.logs import librdkafka_logger

if TYPE_CHECKING:
    from workers.core.config import Settings

log = structlog.get_logger(__name__)

PROBE_TIMEOUT_S = 10.0
DEFAULT_BACKOFF_MAX_MS = 10_000  # librdkafka's reconnect.backoff.max.ms
MAX_DETAIL_CHARS = 300
# librdkafka's timing suffix: "(after 0ms in state CONNECT, 1 identical error(s) suppressed)".
_STATE_SUFFIX = re.compile(r"\s*\(after \d+ms in state [^)]*\)\s*$")


@dataclass(frozen=True)
class KafkaConnection:
    """Where the cluster is and how to talk to it; secrets never appear in its repr."""

    bootstrap_servers: str
    options: Mapping[str, str] = field(default_factory=dict, repr=False)
    secret_files: Mapping[str, Path] = field(default_factory=dict, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> KafkaConnection:
        return cls(
            settings.require_bootstrap(),
            {librdkafka_key(key): value for key, value in settings.kafka.items()},
            {librdkafka_key(key): path for key, path in settings.kafka_secret_files.items()},
        )

    def secrets(self) -> dict[str, str]:
        """The values of `secret_files`, read now (a rotated secret is picked up by the next
        client); `ConfigError` naming the key and file, never the content."""
        values: dict[str, str] = {}
        for key, path in self.secret_files.items():
            try:
                values[key] = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or type(exc).__name__
                raise ConfigError(
                    f"kafka_secret_files.{key}: cannot read {path}: {reason}"
                ) from exc
        return values

    def backoff_s(self) -> float:
        raw = self.options.get("reconnect.backoff.max.ms", DEFAULT_BACKOFF_MAX_MS)
        return int(raw) / 1000


def connection(kafka: KafkaConnection | str) -> KafkaConnection:
    return kafka if isinstance(kafka, KafkaConnection) else KafkaConnection(kafka)


# --- why a client cannot use the cluster -------------------------------------------------------


class Cause(Enum):
    """What stops a client, most specific first (the order `KafkaUnavailable` picks by)."""

    SASL = "SASL authentication failed"
    TLS = "TLS handshake failed (certificate or hostname)"
    AUTHORIZATION = "not authorized"
    RESOLVE = "name resolution failed"
    REFUSED = "connection refused"
    TRANSPORT = "connection failed"


_AUTHORIZATION = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "topic",
    KafkaError.GROUP_AUTHORIZATION_FAILED: "group",
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: "transactional id",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "cluster",
}


def classify(error: KafkaError) -> Cause | None:
    """The cause an error names, from librdkafka's code (and, for transport errors, text);
    None for errors that say nothing about reaching the cluster."""
    code, text = error.code(), error.str()
    if code in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
        return Cause.SASL
    if code == KafkaError._SSL or (code == KafkaError._TRANSPORT and "SSL" in text):
        return Cause.TLS
    if code in _AUTHORIZATION:
        return Cause.AUTHORIZATION
    if code == KafkaError._RESOLVE:
        return Cause.RESOLVE
    if code == KafkaError._TRANSPORT:
        return Cause.REFUSED if "Connection refused" in text else Cause.TRANSPORT
    return None


def denied_for_good(error: KafkaError) -> bool:
    """Refused the group, the transactional id or the cluster: no answer can route around it
    (unlike a denied topic, whose answers are dead-lettered), so the worker stops."""
    return (
        classify(error) is Cause.AUTHORIZATION
        and error.code() != KafkaError.TOPIC_AUTHORIZATION_FAILED
    )


def describe(error: KafkaError) -> str:
    """One line: the cause, then librdkafka's own words."""
    cause = classify(error)
    text = error.str().splitlines()[0] if error.str() else error.name()
    detail = _STATE_SUFFIX.sub("", text)[:MAX_DETAIL_CHARS]
    if cause is Cause.AUTHORIZATION:
        return f"{cause.value} ({_AUTHORIZATION[error.code()]}): {detail}"
    return f"{cause.value}: {detail}" if cause is not None else detail


class KafkaUnavailable(Exception):
    """The cluster cannot be used; the message is the one line to show."""


class ErrorReporter:
    """librdkafka's `error_cb`: keeps the most telling error seen, and logs at most one warning
    per cause per `period_s` (a lost broker is retried many times a second), with how many were
    left out. Fatal errors are always logged. `quiet` logs at debug (the CLI probe, whose
    outcome is the one line)."""

    def __init__(
        self,
        bootstrap_servers: str,
        period_s: float,
        *,
        quiet: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bootstrap = bootstrap_servers
        self._period_s = period_s
        self._quiet = quiet
        self._clock = clock
        self._last_logged: dict[str, float] = {}
        self._left_out: dict[str, int] = {}
        self.worst: KafkaError | None = None

    def __call__(self, error: KafkaError) -> None:
        cause = classify(error)
        if cause is not None and (
            self.worst is None or _rank(cause) <= _rank(classify(self.worst))
        ):
            self.worst = error
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            log.debug("kafka_all_brokers_down", bootstrap_servers=self._bootstrap)
            return  # what the transport errors before it already said
        key = cause.name if cause is not None else error.name()
        now = self._clock()
        last = self._last_logged.get(key)
        if not error.fatal() and last is not None and now - last < self._period_s:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return
        self._last_logged[key] = now
        left_out = self._left_out.pop(key, 0)
        emit = log.debug if self._quiet else (log.error if error.fatal() else log.warning)
        emit(
            "kafka_client_error",
            bootstrap_servers=self._bootstrap,
            error=describe(error),
            fatal=error.fatal(),
            repeated=left_out,
        )

    def unavailable(self, fallback: KafkaError | str) -> KafkaUnavailable:
        """The one line: the most telling error seen, else what the request itself raised."""
        worst = self.worst if self.worst is not None else fallback
        why = describe(worst) if isinstance(worst, KafkaError) else worst
        return KafkaUnavailable(f"cannot use Kafka at {self._bootstrap}: {why}")


def _rank(cause: Cause | None) -> int:
    return list(Cause).index(cause) if cause is not None else len(Cause)


# --- the clients -------------------------------------------------------------------------------


def client_config(
    kafka: KafkaConnection | str, config: Mapping[str, Any], *, quiet: bool = False
) -> dict[str, Any]:
    """A client's whole configuration: `config` under the cluster's settings and secrets, with
    librdkafka's log and errors routed to the structured log."""
    conn = connection(kafka)
    return {
        "bootstrap.servers": conn.bootstrap_servers,
        **config,
        **conn.options,
        **conn.secrets(),
        "logger": librdkafka_logger(),
        "error_cb": ErrorReporter(conn.bootstrap_servers, conn.backoff_s(), quiet=quiet),
    }


def consumer(kafka: KafkaConnection | str, config: Mapping[str, Any]) -> Consumer:
    return Consumer(client_config(kafka, config))


def producer(kafka: KafkaConnection | str, config: Mapping[str, Any]) -> Producer:
    return Producer(client_config(kafka, config))


def transactional_producer(kafka: KafkaConnection | str, config: Mapping[str, Any]) -> Producer:
    if "transactional.id" not in config:
        raise ValueError("a transactional producer needs transactional.id")
    return Producer(client_config(kafka, config))


def admin_client(kafka: KafkaConnection | str) -> AdminClient:
    return AdminClient(client_config(kafka, {}))


def reader_settings(isolation: str) -> dict[str, Any]:
    """What a whole-topic reader adds to the cluster's settings: a throwaway group, never
    committed."""
    return {
        "group.id": f"lora-workers-reader-{uuid.uuid4()}",
        "enable.auto.commit": False,
        "isolation.level": isolation,
    }


def reader(kafka: KafkaConnection | str, *, isolation: str = "read_committed") -> Consumer:
    """A consumer for reading topics whole."""
    return consumer(kafka, reader_settings(isolation))


def probe(kafka: KafkaConnection | str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Ask the cluster for its metadata; `KafkaUnavailable` (one line: the bootstrap servers and
    the cause) if no answer comes within `timeout_s`, sooner when authentication or TLS fails,
    which retrying does not cure."""
    conn = connection(kafka)
    config = client_config(conn, {}, quiet=True)
    reporter: ErrorReporter = config["error_cb"]
    admin = AdminClient(config)
    deadline = time.monotonic() + timeout_s
    last: KafkaError | str = f"no answer within {timeout_s:.0f} s"
    while True:
        try:
            admin.list_topics(timeout=min(1.0, max(deadline - time.monotonic(), 0.1)))
            return
        except KafkaException as exc:
            last = exc.args[0]
        admin.poll(0)  # serves error_cb
        final = reporter.worst is not None and classify(reporter.worst) in (Cause.SASL, Cause.TLS)
        if final or time.monotonic() >= deadline:
            raise reporter.unavailable(last)
