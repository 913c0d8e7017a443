"""Where settings come from, and the checks that keep each mistake to one line.

Precedence: command-line flags > `LORA_WORKERS_*` environment variables > the configuration file
> defaults. The file is `--config FILE`, else `$LORA_WORKERS_CONFIG`, else `lora-workers.yaml` in
the current directory if there is one. Relative paths in the file (and relative path defaults)
resolve against the file's folder; relative paths in flags and variables against the current
directory, as a shell would.

Unknown keys in the file and unknown `LORA_WORKERS_*` variables are errors with a did-you-mean:
a misspelled setting silently ignored is a worker running on the wrong configuration.
"""

from __future__ import annotations

import difflib
import json
import os
import types
import typing
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource

from workers.core.config.base import ConfigError

ENV_PREFIX = "LORA_WORKERS_"
CONFIG_ENV = "LORA_WORKERS_CONFIG"
DEFAULT_CONFIG_NAME = "lora-workers.yaml"
MAX_CONFIG_BYTES = 1_000_000
MASK = "********"
# Keys whose values are never printed (librdkafka's passwords, keys and tokens among them).
SECRET_WORDS = ("password", "secret", "token", "credential", "private", "key.pem", "sasl.jaas")

Location = tuple[str, ...]
# Settings holding a path or a name (a Hugging Face hub id): a relative value that names
# something next to the configuration file is that path.
PATH_OR_NAME: frozenset[Location] = frozenset({("engine", "model")})

# librdkafka's only string-valued key with an underscore: every other `_` stands for a `.`.
LIBRDKAFKA_UNDERSCORED = frozenset({"log_level"})

# Set by `load_settings` while it builds a `Settings`: the file to read (None: none at all).
_CHOSEN_FILE: ContextVar[Path | bool | None] = ContextVar("chosen_config_file", default=False)


def find_config_file(explicit: Path | None, environ: Mapping[str, str]) -> Path | None:
    """The configuration file in effect, or None."""
    chosen = explicit or (Path(environ[CONFIG_ENV]) if environ.get(CONFIG_ENV) else None)
    if chosen is not None:
        if not chosen.is_file():
            origin = "--config" if explicit else CONFIG_ENV
            raise ConfigError(f"{origin} {chosen}: no such file")
        return chosen
    local = Path.cwd() / DEFAULT_CONFIG_NAME
    return local if local.is_file() else None


# --- the model's shape -------------------------------------------------------------------------


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (through `X | None`), if it holds one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _holds_paths(annotation: Any) -> bool:
    if annotation is Path:
        return True
    return any(_holds_paths(arg) for arg in typing.get_args(annotation))


def _is_mapping(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (dict, Mapping):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_mapping(arg) for arg in typing.get_args(annotation))
    return False


def _leaf_names(model: type[BaseModel], prefix: Location = ()) -> Iterator[Location]:
    """Every settable location: sections and the settings inside them."""
    for name, field in model.model_fields.items():
        yield (*prefix, name)
        inner = _model_of(field.annotation)
        if inner is not None:
            yield from _leaf_names(inner, (*prefix, name))


def _suggest(wrong: str, known: list[str]) -> str:
    close = difflib.get_close_matches(wrong, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _dotted(location: Location) -> str:
    return ".".join(location)


# --- the file ----------------------------------------------------------------------------------


def read_config_file(path: Path, model: type[BaseModel]) -> dict[str, Any]:
    """The file's settings, keys checked against `model`, relative paths made absolute."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        document = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: {where}not valid YAML: {problem}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: nests too deeply") from exc
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return _checked_section(document, model, (), path)


def _checked_section(
    section: dict[Any, Any], model: type[BaseModel], location: Location, path: Path
) -> dict[str, Any]:
    checked: dict[str, Any] = {}
    known = list(model.model_fields)
    for key, value in section.items():
        here = (*location, str(key))
        if not isinstance(key, str) or key not in model.model_fields:
            hint = _suggest(str(key), known)
            raise ConfigError(f"{path}: {_dotted(here)}: unknown setting{hint}")
        annotation = model.model_fields[key].annotation
        inner = _model_of(annotation)
        if inner is not None and isinstance(value, dict):
            value = _checked_section(value, inner, here, path)
        elif _holds_paths(annotation):
            value = _relative_to(path.parent, value)
        elif here in PATH_OR_NAME and isinstance(value, str) and (path.parent / value).exists():
            value = str(path.parent / value)  # a folder next to the file, not a hub id
        checked[key] = value
    return checked


def _relative_to(folder: Path, value: Any) -> Any:
    if isinstance(value, str) and value:
        return str(folder / value) if not Path(value).is_absolute() else value
    if isinstance(value, list):
        return [_relative_to(folder, item) for item in value]
    if isinstance(value, dict):
        return {key: _relative_to(folder, item) for key, item in value.items()}
    return value


def _relative_defaults(
    model: type[BaseModel], folder: Path, prefix: Location = ()
) -> dict[str, Any]:
    """Relative path defaults, anchored at the file's folder (absolute ones stay)."""
    anchored: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        inner = _model_of(field.annotation)
        if inner is not None:
            nested = _relative_defaults(inner, folder, (*prefix, name))
            if nested:
                anchored[name] = nested
        elif isinstance(field.default, Path) and not field.default.is_absolute():
            anchored[name] = str(folder / field.default)
        elif (*prefix, name) in PATH_OR_NAME and (folder / str(field.default)).exists():
            anchored[name] = str(folder / str(field.default))
    return anchored


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class ConfigFileSource(PydanticBaseSettingsSource):
    """The configuration file, below the environment and above the defaults."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        chosen = _CHOSEN_FILE.get()
        self.path = find_config_file(None, _environ()) if chosen is False else chosen
        self.values: dict[str, Any] = {}
        if isinstance(self.path, Path):
            self.values = read_config_file(self.path, settings_cls)

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False  # unused: __call__ gives all

    def __call__(self) -> dict[str, Any]:
        if not isinstance(self.path, Path):
            return {}
        return _deep_merge(_relative_defaults(self.settings_cls, self.path.parent), self.values)


# --- the environment ---------------------------------------------------------------------------


def _environ() -> Mapping[str, str]:
    return os.environ  # the one place settings read the process environment


def known_variables(model: type[BaseModel]) -> list[str]:
    return [ENV_PREFIX + "__".join(loc).upper() for loc in _leaf_names(model)]


def librdkafka_key(name: str) -> str:
    """`sasl_password` (from LORA_WORKERS_KAFKA__SASL_PASSWORD) -> `sasl.password`: shell
    variable names cannot hold dots, and librdkafka's keys (but one) have no underscores."""
    return name if name in LIBRDKAFKA_UNDERSCORED else name.replace("_", ".")


def check_environment(model: type[BaseModel], environ: Mapping[str, str]) -> None:
    """Every `LORA_WORKERS_*` variable names a setting (or a key inside a mapping setting)."""
    known = known_variables(model)
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or variable == CONFIG_ENV:
            continue
        if not _names_a_setting(model, variable[len(ENV_PREFIX) :].lower().split("__")):
            raise ConfigError(f"{variable}: unknown setting{_suggest(variable, known)}")


def _names_a_setting(model: type[BaseModel], parts: list[str]) -> bool:
    field = model.model_fields.get(parts[0])
    if field is None:
        return False
    if len(parts) == 1:
        return True
    inner = _model_of(field.annotation)
    if inner is not None:
        return _names_a_setting(inner, parts[1:])
    return _is_mapping(field.annotation)  # e.g. LORA_WORKERS_KAFKA__<librdkafka key>


class CheckedEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, refusing variables that name no setting."""

    def __call__(self) -> dict[str, Any]:
        check_environment(self.settings_cls, _environ())
        return super().__call__()


# --- loading, provenance and errors ------------------------------------------------------------


class LoadedSettings(typing.NamedTuple):
    settings: Any  # a `Settings`
    config_file: Path | None
    origins: dict[Location, str]  # where each explicitly set location came from


def _locations(values: Mapping[str, Any], prefix: Location = ()) -> Iterator[Location]:
    """The leaves a source sets (an empty mapping is a leaf too)."""
    for key, value in values.items():
        here = (*prefix, key)
        if isinstance(value, Mapping) and value:
            yield from _locations(value, here)
        else:
            yield here


def load_settings(
    settings_cls: type[BaseSettings], overrides: Mapping[str, Any], config: Path | None
) -> LoadedSettings:
    """Settings from every source, every error one line naming its origin and field."""
    environ = _environ()
    path = find_config_file(config, environ)
    token = _CHOSEN_FILE.set(path)
    try:
        file_values = read_config_file(path, settings_cls) if path is not None else {}
        check_environment(settings_cls, environ)
        env_values = EnvSettingsSource(settings_cls)()
        origins: dict[Location, str] = {}
        for location in _locations(file_values):
            origins[location] = f"file {path}"
        for location in _locations(env_values):
            origins[location] = "environment " + _variable_for(location, environ)
        for location in _locations(dict(overrides)):
            origins[location] = "flag"
        try:
            settings = settings_cls(**overrides)
        except ValidationError as exc:
            raise ConfigError(_one_line(exc, origins)) from exc
    finally:
        _CHOSEN_FILE.reset(token)
    return LoadedSettings(settings, path, origins)


def _variable_for(location: Location, environ: Mapping[str, str]) -> str:
    """The variable that set `location` (a whole section may come from one JSON variable)."""
    for length in range(len(location), 0, -1):
        name = ENV_PREFIX + "__".join(location[:length]).upper()
        if name in environ:
            return name
    if location[0] == "bootstrap_servers":
        return "KAFKA_BOOTSTRAP_SERVERS"
    return ENV_PREFIX + "__".join(location).upper()


def _one_line(error: ValidationError, origins: Mapping[Location, str]) -> str:
    first = error.errors()[0]
    location = tuple(str(part) for part in first["loc"])
    origin = _origin_of(location, origins)
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{origin}: {_dotted(location) or 'settings'}: {first['msg']}{more}"


def _origin_of(location: Location, origins: Mapping[Location, str]) -> str:
    """Who set `location`, or the setting inside it that an error at a section points to."""
    for length in range(len(location), 0, -1):
        if location[:length] in origins:
            return origins[location[:length]]
    inside = [origin for where, origin in origins.items() if where[: len(location)] == location]
    return inside[0] if inside else "default"


def is_secret(location: Location) -> bool:
    if location[0] == "kafka_secret_files":
        return False  # where a secret is, not the secret
    name = librdkafka_key(location[-1].lower())  # sasl_password from a variable too
    return any(word in name for word in SECRET_WORDS)


def effective_rows(loaded: LoadedSettings) -> list[tuple[str, str, str]]:
    """(setting, value, where it came from) for every setting, secrets masked."""
    rows: list[tuple[str, str, str]] = []
    origins = loaded.origins
    dumped = loaded.settings.model_dump(mode="json")

    def walk(values: Mapping[str, Any], prefix: Location) -> None:
        for key, value in values.items():
            here = (*prefix, key)
            if isinstance(value, dict) and value:  # a section, or a mapping such as kafka
                walk(value, here)
                continue
            origin = origins.get(here, "default")
            shown = MASK if is_secret(here) and value else _shown(value)
            rows.append((_dotted(here), shown, origin))

    walk(dumped, ())
    return rows


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
