"""Checks an adapter version must pass before the engine ever sees it. Pure file inspection.

Each failure has its own code (`AdapterError`), so an operator can tell a typo from an attack
from a mismatch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from workers.core.config import AdapterSettings
from workers.core.errors import AdapterError, AdapterRejected

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
CONFIG_FILE = "adapter_config.json"


@dataclass(frozen=True)
class AdapterFacts:
    """What the adapter's own files say about it."""

    path: Path  # resolved, inside an allowed root
    rank: int
    target_modules: frozenset[str]
    base_model: str


def adapter_digest(directory: Path) -> str:
    """sha256 over every file's relative path and content, in path order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(file.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def resolve_inside_roots(raw_path: str, allowed_roots: Sequence[Path]) -> Path:
    if ".." in PurePath(raw_path).parts:
        raise AdapterRejected(AdapterError.PATH_OUTSIDE_ROOTS, f"{raw_path} contains '..'")
    # resolve() follows symlinks, so a link inside a root that points outside is caught here.
    resolved = Path(raw_path).resolve()
    for root in allowed_roots:
        if resolved.is_relative_to(root.resolve()):
            return resolved
    raise AdapterRejected(
        AdapterError.PATH_OUTSIDE_ROOTS,
        f"{raw_path} resolves to {resolved}, outside the allowed roots "
        f"{[str(r) for r in allowed_roots]}",
    )


def same_base_model(claimed: str, served: str) -> bool:
    # Adapter configs name their base by hub id or local path; compare the last component.
    return PurePath(claimed.rstrip("/")).name == PurePath(served.rstrip("/")).name


@dataclass(frozen=True)
class AdapterRequirements:
    """What this deployment can serve: adapters for its base model, within its engine's rank
    limit and LoRA modules, from directories under its allowed roots."""

    base_model: str
    max_rank: int
    supported_modules: frozenset[str]
    allowed_roots: tuple[Path, ...]

    @classmethod
    def of(cls, settings: AdapterSettings, base_model: str, max_rank: int) -> AdapterRequirements:
        return cls(
            base_model, max_rank, settings.supported_target_modules, tuple(settings.allowed_roots)
        )


def inspect_adapter(
    raw_path: str,
    requirements: AdapterRequirements,
    *,
    expected_sha256: str | None,
    claimed_base_model: str,
) -> AdapterFacts:
    """Raise `AdapterRejected` unless the adapter at `raw_path` is safe to hand to the engine."""
    served_base_model = requirements.base_model
    max_rank = requirements.max_rank
    supported_modules = requirements.supported_modules
    path = resolve_inside_roots(raw_path, requirements.allowed_roots)
    if not path.is_dir():
        raise AdapterRejected(AdapterError.PATH_MISSING, f"{raw_path} is not a directory")
    present = {p.name for p in path.iterdir()}
    if CONFIG_FILE not in present or not present.intersection(WEIGHT_FILES):
        raise AdapterRejected(
            AdapterError.FILES_MISSING,
            f"{raw_path} needs {CONFIG_FILE} and one of {list(WEIGHT_FILES)}",
        )
    if expected_sha256 is not None:
        actual = adapter_digest(path)
        if actual != expected_sha256:
            raise AdapterRejected(
                AdapterError.CHECKSUM_MISMATCH,
                f"{raw_path} has sha256 {actual}, expected {expected_sha256}",
            )
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        rank = int(config["r"])
        modules = config["target_modules"]
        modules = frozenset([modules] if isinstance(modules, str) else modules)
        own_base = str(config.get("base_model_name_or_path") or "")
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterRejected(AdapterError.INVALID_ADAPTER_CONFIG, f"{CONFIG_FILE}: {exc}") from exc
    for base in (claimed_base_model, own_base):
        if base and not same_base_model(base, served_base_model):
            raise AdapterRejected(
                AdapterError.BASE_MODEL_MISMATCH,
                f"adapter was trained on {base!r}, this worker serves {served_base_model!r}",
            )
    if rank > max_rank:
        raise AdapterRejected(
            AdapterError.RANK_TOO_LARGE, f"rank {rank} exceeds max_lora_rank {max_rank}"
        )
    unsupported = sorted(modules - supported_modules)
    if unsupported or config.get("modules_to_save"):
        raise AdapterRejected(
            AdapterError.TARGET_MODULES_UNSUPPORTED,
            f"unsupported modules {unsupported or config.get('modules_to_save')}",
        )
    return AdapterFacts(path, rank, modules, own_base or claimed_base_model)
