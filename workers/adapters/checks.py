"""Checks an adapter version must pass before the engine ever sees it. Pure file inspection.

Each failure has its own code (`AdapterError`), so an operator can tell a typo from an attack
from a mismatch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from workers.core.config import AdapterSettings
from workers.core.errors import AdapterError, AdapterRejected

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
CONFIG_FILE = "adapter_config.json"
# PEFT writes about 1 kB; a config far larger is not one, and is not read whole.
MAX_CONFIG_BYTES = 256 * 1024


class AdapterConfigFile(BaseModel):
    """The fields of PEFT's adapter_config.json the checks rely on, strictly typed: vLLM reads
    the same file, and a rank of "8" or a module list of lists must not reach it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    r: StrictInt = Field(ge=1)
    target_modules: StrictStr | list[StrictStr]
    base_model_name_or_path: StrictStr | None = None
    modules_to_save: StrictStr | list[StrictStr] | None = None


@dataclass(frozen=True)
class AdapterFacts:
    """What the adapter's own files say about it."""

    path: Path  # resolved, inside an allowed root
    rank: int
    target_modules: frozenset[str]
    base_model: str


def adapter_digest(directory: Path) -> str:
    """sha256 over every regular file's relative path and content, in path order (dangling
    links, pipes and devices are not files, and are skipped)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(file.relative_to(directory).as_posix().encode() + b"\0")
        with file.open("rb") as content:  # in chunks: weights can be gigabytes
            digest.update(hashlib.file_digest(content, "sha256").digest())
    return digest.hexdigest()


def resolve_inside_roots(raw_path: str, allowed_roots: Sequence[Path]) -> Path:
    if ".." in PurePath(raw_path).parts:
        raise AdapterRejected(AdapterError.PATH_OUTSIDE_ROOTS, f"{raw_path} contains '..'")
    # resolve() follows symlinks, so a link inside a root that points outside is caught here.
    try:
        resolved = Path(raw_path).resolve()
    except RuntimeError as exc:  # pathlib's word for a symlink loop
        raise AdapterRejected(AdapterError.FILES_UNREADABLE, str(exc)) from exc
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
    """Raise `AdapterRejected` unless the adapter at `raw_path` is safe to hand to the engine.
    Nothing else: whatever the path holds (links, loops, pipes, unreadable files), an update
    naming it is refused, never a reason for the worker to stop."""
    try:
        return _inspect(raw_path, requirements, expected_sha256, claimed_base_model)
    except (OSError, ValueError) as exc:  # ValueError: a path with a NUL byte
        raise AdapterRejected(AdapterError.FILES_UNREADABLE, f"{raw_path}: {exc}") from exc


def _inspect(
    raw_path: str,
    requirements: AdapterRequirements,
    expected_sha256: str | None,
    claimed_base_model: str,
) -> AdapterFacts:
    served_base_model = requirements.base_model
    max_rank = requirements.max_rank
    supported_modules = requirements.supported_modules
    path = resolve_inside_roots(raw_path, requirements.allowed_roots)
    if not path.is_dir():
        raise AdapterRejected(AdapterError.PATH_MISSING, f"{raw_path} is not a directory")
    _check_files(raw_path, path, requirements.allowed_roots)
    if expected_sha256 is not None:
        actual = adapter_digest(path)
        if actual != expected_sha256:
            raise AdapterRejected(
                AdapterError.CHECKSUM_MISMATCH,
                f"{raw_path} has sha256 {actual}, expected {expected_sha256}",
            )
    config = _read_config(path / CONFIG_FILE)
    modules = frozenset(
        [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules
    )
    own_base = config.base_model_name_or_path or ""
    for base in (claimed_base_model, own_base):
        if base and not same_base_model(base, served_base_model):
            raise AdapterRejected(
                AdapterError.BASE_MODEL_MISMATCH,
                f"adapter was trained on {base!r}, this worker serves {served_base_model!r}",
            )
    if config.r > max_rank:
        raise AdapterRejected(
            AdapterError.RANK_TOO_LARGE, f"rank {config.r} exceeds max_lora_rank {max_rank}"
        )
    unsupported = sorted(modules - supported_modules)
    if unsupported or config.modules_to_save:
        raise AdapterRejected(
            AdapterError.TARGET_MODULES_UNSUPPORTED,
            f"unsupported modules {unsupported or config.modules_to_save}",
        )
    return AdapterFacts(path, config.r, modules, own_base or claimed_base_model)


def _check_files(raw_path: str, path: Path, allowed_roots: Sequence[Path]) -> None:
    """The config and weights the engine will read are regular files inside the roots: not a
    dangling link, a folder, or a pipe (reading one blocks forever)."""
    present = [path / name for name in (CONFIG_FILE, *WEIGHT_FILES) if _exists(path / name)]
    names = {file.name for file in present}
    broken = [file.name for file in present if not file.is_file()]
    if CONFIG_FILE not in names or not names.intersection(WEIGHT_FILES) or broken:
        raise AdapterRejected(
            AdapterError.FILES_MISSING,
            f"{raw_path} needs {CONFIG_FILE} and one of {list(WEIGHT_FILES)} as regular files"
            + (f"; not regular files: {broken}" if broken else ""),
        )
    for file in present:
        resolve_inside_roots(str(file), allowed_roots)


def _exists(path: Path) -> bool:
    return path.is_symlink() or path.exists()  # a dangling link is there, and broken


def _read_config(config_path: Path) -> AdapterConfigFile:
    with config_path.open("rb") as file:
        raw = file.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterRejected(
            AdapterError.INVALID_ADAPTER_CONFIG, f"{CONFIG_FILE} is over {MAX_CONFIG_BYTES} bytes"
        )
    try:
        return AdapterConfigFile.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise AdapterRejected(
            AdapterError.INVALID_ADAPTER_CONFIG, f"{CONFIG_FILE}: {where}: {first['msg']}"
        ) from exc
