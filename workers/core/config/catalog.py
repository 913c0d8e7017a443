"""The adapter catalog: the adapters a worker may serve (`catalog.yaml`)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from workers.core.config.base import ConfigError, _Strict
from workers.core.contracts import (
    ADAPTER_NAME_PATTERN,
    VERSION_PATTERN,
    one_line,
    validation_details,
)

# --- adapters --------------------------------------------------------------------------------


class AdapterEntry(_Strict):
    name: str = Field(pattern=ADAPTER_NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    path: Path
    tenants: list[str] | None = None
    hot: bool = False


class AdapterCatalog(_Strict):
    base_model: str
    adapters: list[AdapterEntry]

    @model_validator(mode="after")
    def _unique_names(self) -> AdapterCatalog:
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError("an adapter name appears twice; one version per name is served")
        return self

    @cached_property
    def by_name(self) -> dict[str, AdapterEntry]:
        return {a.name: a for a in self.adapters}


def load_catalog(path: Path) -> AdapterCatalog:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the catalog: {exc.strerror or exc}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {one_line(str(exc))}") from exc
    try:
        catalog = AdapterCatalog.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {validation_details(exc)}") from exc
    # Paths in the catalog are relative to the catalog file, so the zoo can move as one folder.
    resolved = [
        a.model_copy(update={"path": (path.parent / a.path).resolve()}) for a in catalog.adapters
    ]
    return catalog.model_copy(update={"adapters": resolved})
