"""Checks an adapter version must pass before the engine ever sees it. Pure file inspection.

Each failure has its own code (`AdapterError`), so an operator can tell a typo from an attack
from a mismatch.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from workers.core.config import AdapterSettings
from workers.core.errors import AdapterError, AdapterRejected

if TYPE_CHECKING:  # the engine's model reader does I/O this module must not import
    from workers.engine.model import ModelInfo

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
CONFIG_FILE = "adapter_config.json"
# PEFT writes about 1 kB; a config far larger is not one, and is not read whole.
MAX_CONFIG_BYTES = 256 * 1024
# A safetensors header lists names, dtypes and shapes: a few MB even for large models.
MAX_HEADER_BYTES = 100 * 2**20
PEFT_PREFIX = "base_model.model."


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


def _no_identity(_name: str) -> ModelInfo | None:
    return None


@dataclass(frozen=True)
class AdapterRequirements:
    """What this deployment can serve: adapters for its base model, within its engine's rank
    limit and LoRA modules, from directories under its allowed roots.

    `model`: the served model's identity and weight shapes, which an adapter's must fit;
    `identify` resolves a base model an adapter names to its identity where it is local (a
    directory or the Hugging Face cache), None where only the name is known."""

    base_model: str
    max_rank: int
    supported_modules: frozenset[str]
    allowed_roots: tuple[Path, ...]
    model: ModelInfo | None = None
    identify: Callable[[str], ModelInfo | None] = _no_identity

    @classmethod
    def of(
        cls,
        settings: AdapterSettings,
        model: ModelInfo,
        max_rank: int,
        identify: Callable[[str], ModelInfo | None] = _no_identity,
    ) -> AdapterRequirements:
        # adapters.supported_target_modules narrows the model's modules only when set.
        modules = model.lora_modules or settings.supported_target_modules
        if "supported_target_modules" in settings.model_fields_set:
            modules = modules & settings.supported_target_modules
        return cls(model.name, max_rank, modules, tuple(settings.allowed_roots), model, identify)


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
    config = read_adapter_config(path / CONFIG_FILE)
    modules = frozenset(
        [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules
    )
    own_base = config.base_model_name_or_path or ""
    _check_same_base(raw_path, path, (own_base, claimed_base_model), requirements)
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


def _check_same_base(
    raw_path: str, path: Path, names: Sequence[str], requirements: AdapterRequirements
) -> None:
    """The adapter was trained on the served model: every base it names resolves to the same
    identity (architecture, hidden size, vocabulary) or, where it resolves nowhere, has the
    same name; and its weights' shapes fit the model's, module by module."""
    served = requirements.model
    served_side = served.describe() if served is not None else repr(requirements.base_model)
    for name in dict.fromkeys(n for n in names if n):
        known = requirements.identify(name)
        if known is not None and served is not None:
            if _identity(known) != _identity(served):
                _mismatch(raw_path, known.describe(), served_side)
        elif not same_base_model(name, requirements.base_model):
            _mismatch(raw_path, repr(name), served_side)
    weights = path / WEIGHT_FILES[0]
    if served is None or not served.weight_shapes or not weights.is_file():
        return  # a .bin adapter's shapes need torch to read; the engine checks them
    try:
        shapes = weight_shapes(weights)
    except ValueError as exc:
        raise AdapterRejected(AdapterError.FILES_UNREADABLE, f"{raw_path}: {exc}") from exc
    misfit = _misfit(shapes, served.weight_shapes)
    if misfit is not None:
        trained_on = next((n for n in names if n), "another model")
        _mismatch(raw_path, f"{trained_on!r} ({misfit})", served_side)


def _identity(model: ModelInfo) -> tuple[str, int, int]:
    return (model.architecture, model.hidden_size, model.vocab_size)


def _mismatch(raw_path: str, trained_on: str, serves: str) -> None:
    raise AdapterRejected(
        AdapterError.BASE_MODEL_MISMATCH,
        f"adapter {raw_path} was trained on {trained_on}; this worker serves {serves}",
    )


def _misfit(
    adapter: Mapping[str, tuple[int, ...]], model: Mapping[str, tuple[int, ...]]
) -> str | None:
    """Why the adapter's LoRA matrices cannot apply to the model's weights (None: they fit).
    A linear weight is (out, in): lora_A must be (r, in), lora_B (out, r); an embedding is
    (vocab, hidden): lora_embedding_A (r, vocab), lora_embedding_B (hidden, r)."""
    for key, shape in sorted(adapter.items()):
        parts = key.removeprefix(PEFT_PREFIX).split(".")
        kinds = [p for p in parts if p in _LORA_AXES]
        if len(shape) != 2 or len(kinds) != 1:
            continue  # not a LoRA matrix (a bias, a DoRA magnitude)
        kind = kinds[0]
        module = ".".join(parts[: parts.index(kind)])
        weight = model.get(f"{module}.weight")
        if weight is None and module.endswith("lm_head"):  # tied to the input embeddings
            weight = next((v for k, v in model.items() if k.endswith("embed_tokens.weight")), None)
        if weight is None:
            return f"it adapts {module}, which the model does not have"
        axis, model_axis = _LORA_AXES[kind]
        if len(weight) == 2 and shape[axis] != weight[model_axis]:
            return (
                f"its {module}.{kind} is {shape[0]}x{shape[1]}, "
                f"the model's {module} weight is {weight[0]}x{weight[1]}"
            )
    return None


# Which axis of each LoRA matrix must equal which axis of the adapted weight.
_LORA_AXES = {
    "lora_A": (1, 1),
    "lora_B": (0, 0),
    "lora_embedding_A": (1, 0),
    "lora_embedding_B": (0, 1),
}


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header; no tensor is read.
    ValueError if the header is not one."""
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path.name} is not a safetensors file")
        (size,) = struct.unpack("<Q", prefix)
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"{path.name}: a safetensors header of {size} bytes")
        try:
            header = json.loads(file.read(size))
            return {
                name: tuple(int(n) for n in entry["shape"])
                for name, entry in header.items()
                if name != "__metadata__"
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path.name}: unreadable safetensors header ({exc})") from exc


def read_adapter_config(config_path: Path) -> AdapterConfigFile:
    """adapter_config.json, checked; `AdapterRejected` if it is not a valid one."""
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
