"""Operator side of the adapter lifecycle: announce versions, list what the topic holds."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Producer

from workers.adapters.checks import AdapterRequirements, adapter_digest, inspect_adapter
from workers.adapters.registry import update_from_catalog
from workers.adapters.updates import decode_update
from workers.core.config import Settings, load_catalog
from workers.core.contracts import AdapterStatus, AdapterUpdate, AdapterVersionSpec
from workers.kafka.status import read_statuses
from workers.kafka.topics import read_to_end


def current_updates(settings: Settings) -> dict[str, AdapterUpdate]:
    """The latest valid state per adapter name on the updates topic (tombstones drop it)."""
    states: dict[str, AdapterUpdate] = {}
    for message in read_to_end(settings.require_bootstrap(), [settings.adapters.updates_topic]):
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
    return AdapterUpdate(
        name=name,
        base_model=base_model,
        versions=versions,
        tenants=tenants if tenants is not None else (current.tenants if current else None),
        hot=hot,
        published_at_ms=int(time.time() * 1000),
    )


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
    max_lora_rank: int,
) -> AdapterUpdate:
    """Check the adapter locally (the same checks a worker runs before loading), then write the
    adapter's new state to the updates topic. Raises `AdapterRejected` for a bad adapter."""
    requirements = AdapterRequirements.of(settings.adapters, base_model, max_lora_rank)
    inspect_adapter(str(path), requirements, expected_sha256=None, claimed_base_model=base_model)
    spec = AdapterVersionSpec(
        version=version, path=str(path.resolve()), sha256=adapter_digest(path), weight=weight
    )
    # Versions announced on the topic win; before any announcement the catalog's version serves.
    current = current_updates(settings).get(name)
    catalog = load_catalog(settings.catalog)
    if current is None and name in catalog.by_name:
        current = update_from_catalog(catalog, catalog.by_name[name])
    state = next_state(current, name, spec, base_model, tenants, hot)
    producer = Producer({"bootstrap.servers": settings.require_bootstrap(), "acks": "all"})
    producer.produce(
        settings.adapters.updates_topic, key=name.encode(), value=state.model_dump_json().encode()
    )
    if producer.flush(30):
        raise TimeoutError("the adapter update was not acknowledged within 30 s")
    return state


@dataclass(frozen=True)
class AdapterListing:
    state: AdapterUpdate
    statuses: dict[str, AdapterStatus]  # latest status per version


def list_adapters(settings: Settings) -> list[AdapterListing]:
    latest: dict[tuple[str, str | None], AdapterStatus] = {}
    for status in read_statuses(settings.require_bootstrap(), settings.adapters.status_topic):
        latest[(status.name, status.version)] = status
    return [
        AdapterListing(
            state,
            {
                v.version: latest[(name, v.version)]
                for v in state.versions
                if (name, v.version) in latest
            },
        )
        for name, state in sorted(current_updates(settings).items())
    ]
