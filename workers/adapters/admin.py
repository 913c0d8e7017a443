"""Operator side of the adapter lifecycle: announce versions (serving, canary or shadow),
promote one, compose one from others, list what the topics hold."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Message

from workers.adapters.checks import AdapterRequirements, adapter_digest, inspect_adapter
from workers.adapters.registry import update_from_catalog
from workers.adapters.updates import MAX_UPDATE_BYTES, decode_update
from workers.core.config import ConfigError, Settings, load_catalog
from workers.core.contracts import (
    AdapterState,
    AdapterStatus,
    AdapterUpdate,
    AdapterVersionSpec,
    ShadowSpec,
)
from workers.engine.model import catalog_ranks, identify, lora_rank, read_model_info
from workers.kafka.clients import KafkaConnection, KafkaUnavailable, describe, producer
from workers.kafka.status import read_statuses
from workers.kafka.topics import read_to_end


def current_updates(settings: Settings) -> dict[str, AdapterUpdate]:
    """The latest valid state per adapter name on the updates topic (tombstones drop it)."""
    states: dict[str, AdapterUpdate] = {}
    kafka = KafkaConnection.from_settings(settings)
    for message in read_to_end(kafka, [settings.adapters.updates_topic]):
        record = decode_update(message.key(), message.value())
        if record.update is not None:
            states[record.name] = record.update
        elif record.error is None:
            states.pop(record.name, None)
    return states


def next_state(
    current: AdapterUpdate | None,
    name: str,
    new_version: AdapterVersionSpec,
    base_model: str,
    tenants: list[str] | None,
    hot: bool,
) -> AdapterUpdate:
    """The adapter's new whole state: the new version takes `weight` of the traffic and the
    versions already serving share the rest in their current proportions."""
    others = (
        [] if current is None else [v for v in current.versions if v.version != new_version.version]
    )
    remaining = 1.0 - new_version.weight
    if remaining <= 1e-9 or not others:
        versions = [new_version.model_copy(update={"weight": 1.0})]
    else:
        share = sum(v.weight for v in others)
        versions = [v.model_copy(update={"weight": v.weight / share * remaining}) for v in others]
        versions.append(new_version)
    shadow = current.shadow if current is not None else None
    return AdapterUpdate(
        name=name,
        base_model=base_model,
        versions=versions,
        tenants=tenants if tenants is not None else (current.tenants if current else None),
        hot=hot,
        shadow=None if shadow is None or shadow.version == new_version.version else shadow,
        published_at_ms=int(time.time() * 1000),
    )


def with_shadow(current: AdapterUpdate | None, name: str, shadow: ShadowSpec) -> AdapterUpdate:
    """The adapter's state with `shadow` evaluated beside the versions serving now."""
    if current is None:
        raise ConfigError(f"{name} serves no version yet: publish one before a shadow")
    if shadow.version in {v.version for v in current.versions}:
        raise ConfigError(f"{name}@{shadow.version} already serves; a shadow is a new version")
    return current.model_copy(update={"shadow": shadow, "published_at_ms": int(time.time() * 1000)})


def promoted(
    current: AdapterUpdate | None, name: str, version: str, weight: float
) -> AdapterUpdate:
    """The adapter's state with `version` (its shadow, or a canary) serving `weight` of the
    traffic; the other serving versions share the rest."""
    if current is None:
        raise ConfigError(f"no adapter {name!r} on the updates topic")
    if current.shadow is not None and current.shadow.version == version:
        spec = AdapterVersionSpec(
            version=version,
            path=current.shadow.path,
            sha256=current.shadow.sha256,
            weight=weight,
        )
    else:
        serving = {v.version: v for v in current.versions}
        if version not in serving:
            known = sorted(serving) + ([current.shadow.version] if current.shadow else [])
            raise ConfigError(f"{name} has no version {version!r}; it has {known}")
        spec = serving[version].model_copy(update={"weight": weight})
    return next_state(current, name, spec, current.base_model, current.tenants, current.hot)


def encoded(state: AdapterUpdate) -> bytes:
    """The record's value; `ConfigError` if workers would refuse it for its size."""
    value = state.model_dump_json().encode()
    if len(value) > MAX_UPDATE_BYTES:
        raise ConfigError(
            f"the state of {state.name} is {len(value)} bytes; workers take at most "
            f"{MAX_UPDATE_BYTES} (a tenant list that long belongs elsewhere)"
        )
    return value


def _publish(
    settings: Settings,
    state: AdapterUpdate,
    producer_factory: Callable[[KafkaConnection, dict[str, Any]], Any] = producer,
) -> None:
    """Write the state; `KafkaUnavailable` (one line) if the broker refuses it, e.g. a
    principal not allowed to write the updates topic."""
    value = encoded(state)
    kafka = KafkaConnection.from_settings(settings)
    topic = settings.adapters.updates_topic
    refused: list[KafkaError] = []

    def delivered(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            refused.append(error)

    writer = producer_factory(kafka, {"acks": "all"})
    writer.produce(topic, key=state.name.encode(), value=value, on_delivery=delivered)
    if writer.flush(30):
        raise TimeoutError("the adapter update was not acknowledged within 30 s")
    if refused:
        raise KafkaUnavailable(
            f"cannot publish to {topic} at {kafka.bootstrap_servers}: {describe(refused[0])}"
        )


def current_state(
    settings: Settings, name: str, announced: dict[str, AdapterUpdate] | None = None
) -> AdapterUpdate | None:
    """Versions announced on the topic win; before any announcement the catalog's serves.
    `announced`: the topic's states, when the caller has read them already."""
    current = (current_updates(settings) if announced is None else announced).get(name)
    catalog = load_catalog(settings.catalog)
    if current is None and name in catalog.by_name:
        current = update_from_catalog(catalog, catalog.by_name[name])
    return current


def promote_version(settings: Settings, *, name: str, version: str, weight: float) -> AdapterUpdate:
    state = promoted(current_state(settings, name), name, version, weight)
    _publish(settings, state)
    return state


def publish_version(
    settings: Settings,
    *,
    name: str,
    version: str,
    path: Path,
    base_model: str,
    weight: float,
    tenants: list[str] | None,
    hot: bool,
    max_lora_rank: int | None,
    shadow: float | None = None,
) -> AdapterUpdate:
    """Check the adapter locally (the same checks a worker runs before loading), then write the
    adapter's new state to the updates topic: serving `weight` of its traffic, or as a shadow
    run on `shadow` of its jobs. Raises `AdapterRejected` for a bad adapter. `max_lora_rank`
    None: the workers' (engine.max_lora_rank, else the catalog's largest)."""
    if max_lora_rank is None:
        max_lora_rank = lora_rank(settings.engine, catalog_ranks(load_catalog(settings.catalog)))
    model = read_model_info(settings.engine.model)
    requirements = AdapterRequirements.of(settings.adapters, model, max_lora_rank, identify)
    inspect_adapter(str(path), requirements, expected_sha256=None, claimed_base_model=base_model)
    current = current_state(settings, name)
    sha256 = adapter_digest(path)
    if shadow is not None:
        spec = ShadowSpec(version=version, path=str(path.resolve()), sha256=sha256, share=shadow)
        state = with_shadow(current, name, spec)
    else:
        spec = AdapterVersionSpec(
            version=version, path=str(path.resolve()), sha256=sha256, weight=weight
        )
        state = next_state(current, name, spec, base_model, tenants, hot)
    _publish(settings, state)
    return state


def source_paths(settings: Settings, sources: list[tuple[str, float]]) -> list[tuple[Path, float]]:
    """`NAME` or `NAME@VERSION` with weights, as adapter directories: the version given, else
    the one serving most of the adapter's traffic now."""
    paths: list[tuple[Path, float]] = []
    announced = current_updates(settings)
    for source, weight in sources:
        name, _, version = source.partition("@")
        state = current_state(settings, name, announced)
        if state is None:
            raise ConfigError(f"no adapter {name!r} on the updates topic or in the catalog")
        specs = sorted(state.versions, key=lambda v: -v.weight)
        if version:
            specs = [v for v in state.versions if v.version == version]
            if not specs:
                raise ConfigError(f"{name} has no serving version {version!r}")
        paths.append((Path(specs[0].path), weight))
    return paths


@dataclass(frozen=True)
class AdapterListing:
    state: AdapterUpdate
    statuses: dict[str, AdapterStatus]  # latest status per version
    shadow_status: AdapterStatus | None = None  # the latest with a rolling evaluation


def list_adapters(settings: Settings) -> list[AdapterListing]:
    latest: dict[tuple[str, str | None], AdapterStatus] = {}
    evaluated: dict[tuple[str, str | None], AdapterStatus] = {}
    kafka = KafkaConnection.from_settings(settings)
    for status in read_statuses(kafka, settings.adapters.status_topic):
        latest[(status.name, status.version)] = status
        if status.state is AdapterState.SHADOW and status.evaluation is not None:
            evaluated[(status.name, status.version)] = status
    listings = []
    for name, state in sorted(current_updates(settings).items()):
        shadow = None if state.shadow is None else (name, state.shadow.version)
        statuses = {
            v.version: latest[(name, v.version)]
            for v in state.versions
            if (name, v.version) in latest
        }
        if shadow is not None and shadow in latest:
            statuses[shadow[1]] = latest[shadow]
        listings.append(
            AdapterListing(state, statuses, None if shadow is None else evaluated.get(shadow))
        )
    return listings
