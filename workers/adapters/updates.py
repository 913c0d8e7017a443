"""Records of the adapter-update topic decoded into plain data. No Kafka client here."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from workers.core.contracts import AdapterUpdate


@dataclass(frozen=True)
class UpdateRecord:
    """One record of the updates topic: an update, a retirement (tombstone) or garbage."""

    name: str
    update: AdapterUpdate | None  # None: retire the adapter
    error: str | None = None


def decode_update(key: bytes | None, value: bytes | None) -> UpdateRecord:
    name = key.decode(errors="replace") if key else ""
    if value is None:
        return UpdateRecord(name, None, None if name else "tombstone without a key")
    try:
        update = AdapterUpdate.model_validate_json(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        return UpdateRecord(
            name, None, f"update does not match its schema: {where}: {first['msg']}"
        )
    if update.name != name:
        return UpdateRecord(name, None, f"key {name!r} differs from the update's name")
    return UpdateRecord(name, update)
