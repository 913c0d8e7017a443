"""The least-privilege ACL set of the three principals, defined once: `ops/kafka-local start
--secure` and `lora-workers topics create --acls` both apply it (see docs/security.md).

- `worker`: reads job topics, its consumer groups and the adapter updates (and statuses, to
  restore what it served); writes results, dead letters, statuses and evaluations, under its
  transactional ids, idempotently; writes the reply topics jobs name (`replies.`).
- `publisher`: writes job topics; reads results and dead letters (its own answers), and the
  reply topics its jobs name (`reply_to`, docs/client.md).
- `adapter-admin`: reads and writes adapter updates; reads statuses and evaluations.
"""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    ResourcePatternType,
    ResourceType,
)
from pydantic import BaseModel, ConfigDict

from workers.core.config import PipelineConfig, Settings
from workers.kafka.clients import KafkaConnection, admin_client

PRINCIPALS = ("worker", "publisher", "adapter-admin")
JOBS_PREFIX = "jobs."
RESULTS_PREFIX = "results."
# Jobs' `reply_to` topics: the worker writes any topic under it, and no other (docs/client.md).
REPLIES_PREFIX = "replies."
# Whole-topic readers (results, adapters list, the worker's start-up read of statuses) and the
# worker's adapter feed name their throwaway groups so (workers/kafka/topics.py, adapters/feed.py).
READER_GROUP_PREFIX = "lora-workers-reader-"
FEED_GROUP_PREFIX = "lora-workers-adapters-"
CLUSTER = "kafka-cluster"

Pattern = tuple[ResourcePatternType, str]


class Grant(BaseModel):
    """One ACL: `operation` allowed to `User:<principal>` on a resource pattern."""

    model_config = ConfigDict(frozen=True)

    principal: str
    resource: ResourceType
    pattern: ResourcePatternType
    name: str
    operation: AclOperation

    def binding(self) -> AclBinding:
        return AclBinding(
            self.resource,
            self.name,
            self.pattern,
            f"User:{self.principal}",
            "*",
            self.operation,
            AclPermissionType.ALLOW,
        )

    def line(self) -> str:
        kind = "prefix" if self.pattern is ResourcePatternType.PREFIXED else "literal"
        resource = "cluster" if self.resource is ResourceType.BROKER else self.resource.name
        return f"{self.principal:13} {self.operation.name:16} {resource.lower()} {kind} {self.name}"


def _family(topics: Iterable[str], prefix: str) -> list[Pattern]:
    """One prefixed pattern for the topics named by the convention, literal ones for the rest:
    a new pipeline on the convention needs no new ACL, a renamed topic gets exactly itself."""
    patterns: set[Pattern] = set()
    for topic in topics:
        if topic.startswith(prefix):
            patterns.add((ResourcePatternType.PREFIXED, prefix))
        else:
            patterns.add((ResourcePatternType.LITERAL, topic))
    return sorted(patterns, key=lambda p: (p[0].value, p[1]))


def _group_prefixes(group_id: str) -> list[str]:
    """The worker's own group and the throwaway ones, without prefixes another one covers."""
    prefixes = sorted({group_id, READER_GROUP_PREFIX, FEED_GROUP_PREFIX})
    return [p for p in prefixes if not any(p != q and p.startswith(q) for q in prefixes)]


def acl_set(settings: Settings, pipelines: dict[str, PipelineConfig]) -> list[Grant]:
    """Every grant of the three principals for these settings and pipelines."""
    jobs = _family((p.input_topic for p in pipelines.values() if p.input_topic), JOBS_PREFIX)
    results = _family(
        (p.result_topic for p in pipelines.values() if p.result_topic), RESULTS_PREFIX
    )
    literal = ResourcePatternType.LITERAL
    prefixed = ResourcePatternType.PREFIXED
    dead_letters: list[Pattern] = [
        (literal, t)
        for t in sorted({p.dlq_topic for p in pipelines.values()} | {settings.unknown_task_dlq})
    ]
    adapters = settings.adapters
    read, write = AclOperation.READ, AclOperation.WRITE
    topic, group = ResourceType.TOPIC, ResourceType.GROUP

    def topics(principal: str, patterns: list[Pattern], operation: AclOperation) -> list[Grant]:
        return [
            Grant(principal=principal, resource=topic, pattern=kind, name=name, operation=operation)
            for kind, name in patterns
        ]

    def groups(principal: str, prefixes: list[str]) -> list[Grant]:
        return [
            Grant(principal=principal, resource=group, pattern=prefixed, name=name, operation=read)
            for name in prefixes
        ]

    worker = [
        *topics("worker", jobs, read),
        *topics("worker", [(literal, adapters.updates_topic)], read),
        # At start-up the worker reads the statuses back to restore what it served.
        *topics("worker", [(literal, adapters.status_topic)], read),
        *groups("worker", _group_prefixes(settings.group_id)),
        *topics("worker", results, write),
        *topics("worker", [(prefixed, REPLIES_PREFIX)], write),
        *topics("worker", dead_letters, write),
        *topics(
            "worker",
            [(literal, adapters.status_topic), (literal, adapters.evaluations_topic)],
            write,
        ),
        # transactional.id is "<group_id>.<instance>" (Settings.transactional_id).
        Grant(
            principal="worker",
            resource=ResourceType.TRANSACTIONAL_ID,
            pattern=prefixed,
            name=f"{settings.group_id}.",
            operation=write,
        ),
        Grant(
            principal="worker",
            resource=ResourceType.BROKER,
            pattern=literal,
            name=CLUSTER,
            operation=AclOperation.IDEMPOTENT_WRITE,
        ),
    ]
    publisher = [
        *topics("publisher", jobs, write),
        *topics("publisher", results, read),
        *topics("publisher", dead_letters, read),
        *topics("publisher", [(prefixed, REPLIES_PREFIX)], read),
        *groups("publisher", [READER_GROUP_PREFIX]),
    ]
    adapter_admin = [
        # `adapters publish` reads the current state before it writes the next one.
        *topics("adapter-admin", [(literal, adapters.updates_topic)], read),
        *topics("adapter-admin", [(literal, adapters.updates_topic)], write),
        *topics(
            "adapter-admin",
            [(literal, adapters.status_topic), (literal, adapters.evaluations_topic)],
            read,
        ),
        *groups("adapter-admin", [READER_GROUP_PREFIX]),
    ]
    return [*worker, *publisher, *adapter_admin]


def apply_acls(settings: Settings, grants: list[Grant]) -> None:
    """Create every grant (creating one that exists is a no-op); raises on the first refusal."""
    admin = admin_client(KafkaConnection.from_settings(settings))
    by_binding = {grant.binding(): grant for grant in grants}
    futures = admin.create_acls(list(by_binding), request_timeout=30)
    for binding, future in futures.items():
        grant = by_binding[binding]
        try:
            future.result()
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            reason = f"creating the ACL '{' '.join(grant.line().split())}': {error.str()}"
            raise KafkaException(KafkaError(error.code(), reason)) from exc
