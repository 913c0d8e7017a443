"""Records of the adapter-update topic decoded into plain data. No Kafka client here.

Anything can be written to the topic, so decoding never raises: a record that is not a valid
update becomes an `UpdateRecord` with an `error`, which the registry reports and skips.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from workers.core.contracts import AdapterUpdate

# A whole state (at most 8 versions, a shadow, a tenant list) is a few kB. Bounded before
# parsing, and kept under Kafka's default 1 MB message size so the `serving` status that
# carries the state can be written.
MAX_UPDATE_BYTES = 256 * 1024
# Names are at most 64 characters (`ADAPTER_NAME_PATTERN`); a longer key is quoted this far.
MAX_KEY_CHARS = 200


@dataclass(frozen=True)
class UpdateRecord:
    """One record of the updates topic: an update, a retirement (tombstone) or garbage."""

    name: str
    update: AdapterUpdate | None  # None: retire the adapter
    error: str | None = None


def decode_update(key: bytes | None, value: bytes | None) -> UpdateRecord:
    name = key.decode(errors="replace") if key else ""
    if len(name) > MAX_KEY_CHARS:
        return UpdateRecord(name[:MAX_KEY_CHARS] + "...", None, f"key of {len(key or b'')} bytes")
    if value is None:
        return UpdateRecord(name, None, None if name else "tombstone without a key")
    if len(value) > MAX_UPDATE_BYTES:
        return UpdateRecord(
            name, None, f"update of {len(value)} bytes, over the {MAX_UPDATE_BYTES} allowed"
        )
    try:
        update = AdapterUpdate.model_validate_json(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        return UpdateRecord(
            name, None, f"update does not match its schema: {where}: {first['msg']}"
        )
    except Exception as exc:  # the parser's own limits (recursion, memory): garbage all the same
        return UpdateRecord(name, None, f"update unreadable: {type(exc).__name__}: {exc}")
    if update.name != name:
        return UpdateRecord(name, None, f"key {name!r} differs from the update's name")
    return UpdateRecord(name, update)
