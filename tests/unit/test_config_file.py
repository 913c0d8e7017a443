"""The configuration file, its precedence below the environment and flags, and the one-line
errors for what is misspelled or mistyped."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from workers.core.config import ConfigError, Settings
from workers.core.config.sources import MASK, effective_rows
from workers.scaffold import init_project

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("isolated_settings")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_precedence_is_flags_then_environment_then_file_then_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path / "conf" / "lora.yaml",
        "group_id: from-file\ncommit_interval_ms: 7\nengine:\n  max_loras: 3\n  max_num_seqs: 9\n",
    )
    monkeypatch.setenv("LORA_WORKERS_COMMIT_INTERVAL_MS", "8")
    monkeypatch.setenv("LORA_WORKERS_ENGINE__MAX_LORAS", "4")
    loaded = Settings.load({"group_id": "from-flag"}, config)
    settings = loaded.settings
    assert settings.group_id == "from-flag"
    assert settings.commit_interval_ms == 8
    assert settings.engine.max_loras == 4
    assert settings.engine.max_num_seqs == 9  # the file's, beside the environment's max_loras
    assert settings.unknown_task_dlq == "jobs.dlq"  # the default
    sources = {name: origin for name, _, origin in effective_rows(loaded)}
    assert sources["group_id"] == "flag"
    assert sources["commit_interval_ms"] == "environment LORA_WORKERS_COMMIT_INTERVAL_MS"
    assert sources["engine.max_loras"] == "environment LORA_WORKERS_ENGINE__MAX_LORAS"
    assert sources["engine.max_num_seqs"] == f"file {config}"
    assert sources["unknown_task_dlq"] == "default"


def test_the_file_is_found_by_variable_then_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "lora-workers.yaml", "group_id: local\n")
    assert Settings.load().settings.group_id == "local"
    elsewhere = write(tmp_path / "other" / "x.yaml", "group_id: named\n")
    monkeypatch.setenv("LORA_WORKERS_CONFIG", str(elsewhere))
    assert Settings.load().settings.group_id == "named"
    assert Settings().group_id == "named"  # plain construction reads the same sources


def test_relative_paths_in_the_file_and_relative_defaults_follow_the_file(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "project"
    (folder / "models" / "base").mkdir(parents=True)
    config = write(
        folder / "lora.yaml",
        "catalog: models/catalog.yaml\nengine:\n  model: models/base\n"
        "adapters:\n  allowed_roots: [models, /abs/root]\n",
    )
    settings = Settings.load(config=config).settings
    assert settings.catalog == folder / "models" / "catalog.yaml"
    assert Path(settings.engine.model) == folder / "models" / "base"
    assert settings.allowed_roots == [folder / "models", Path("/abs/root")]
    assert settings.pipelines_dir == folder / "pipelines"  # a default, anchored at the file


def test_a_hub_id_is_not_taken_for_a_path() -> None:
    config = write(Path.cwd() / "c.yaml", "engine:\n  model: Qwen/Qwen2.5-0.5B-Instruct\n")
    assert str(Settings.load(config=config).settings.engine.model) == "Qwen/Qwen2.5-0.5B-Instruct"


def test_allowed_roots_default_to_the_catalogs_folder(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yaml", "catalog: zoo/catalog.yaml\n")
    assert Settings.load(config=config).settings.allowed_roots == [(tmp_path / "zoo").resolve()]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("group_idd: x\n", "group_idd: unknown setting (did you mean group_id?)"),
        (
            "engine:\n  max_lorass: 3\n",
            "engine.max_lorass: unknown setting (did you mean max_loras?)",
        ),
        ("nothing_like_it: 1\n", "nothing_like_it: unknown setting"),
        ("- a\n- b\n", "expected a mapping of settings at the top level"),
        ("engine: [1\n", "line 2: not valid YAML"),
        ("engine:\n  max_loras: many\n", "engine.max_loras: Input should be a valid integer"),
        ("engine:\n  max_loras: 0\n", "engine.max_loras: Input should be greater than or equal"),
        ("1: x\n", "1: unknown setting"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_the_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    config = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as raised:
        Settings.load(config=config)
    message = str(raised.value)
    assert "\n" not in message
    assert str(config) in message
    assert expected in message


def test_a_file_that_is_not_text_or_too_large_is_refused(tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"group_id: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        Settings.load(config=binary)
    huge = write(tmp_path / "huge.yaml", "# " + "x" * 1_100_000 + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        Settings.load(config=huge)


def test_a_missing_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"^--config .*nope.yaml: no such file$"):
        Settings.load(config=tmp_path / "nope.yaml")
    monkeypatch.setenv("LORA_WORKERS_CONFIG", str(tmp_path / "gone.yaml"))
    with pytest.raises(ConfigError, match=r"^LORA_WORKERS_CONFIG .*gone.yaml: no such file$"):
        Settings.load()


@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        ("LORA_WORKERS_GROUPID", "did you mean LORA_WORKERS_GROUP_ID?"),
        ("LORA_WORKERS_ENGINE__MAX_LORA", "did you mean LORA_WORKERS_ENGINE__MAX_LORAS?"),
        ("LORA_WORKERS_GROUP_ID__X", "unknown setting"),
        ("LORA_WORKERS_ZZZZ", "unknown setting"),
    ],
)
def test_an_unknown_variable_is_an_error_with_a_suggestion(
    monkeypatch: pytest.MonkeyPatch, variable: str, expected: str
) -> None:
    monkeypatch.setenv(variable, "1")
    with pytest.raises(ConfigError) as raised:
        Settings.load()
    assert str(raised.value).startswith(f"{variable}: ")
    assert expected in str(raised.value)


def test_keys_inside_a_mapping_setting_are_free(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_WORKERS_KAFKA__SOCKET_TIMEOUT_MS", "1000")
    assert Settings.load().settings.kafka == {"socket_timeout_ms": "1000"}


def test_a_bad_variable_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_WORKERS_ENGINE__MAX_LORAS", "-1")
    with pytest.raises(ConfigError) as raised:
        Settings.load()
    assert str(raised.value).startswith(
        "environment LORA_WORKERS_ENGINE__MAX_LORAS: engine.max_loras: "
    )


def test_config_show_masks_secrets(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.yaml",
        "kafka:\n  sasl.password: hunter2\n  ssl.key.password: hunter3\n"
        "  security.protocol: SASL_SSL\n",
    )
    rows = {name: value for name, value, _ in effective_rows(Settings.load(config=config))}
    assert rows["kafka.sasl.password"] == MASK
    assert rows["kafka.ssl.key.password"] == MASK
    assert rows["kafka.security.protocol"] == "SASL_SSL"
    assert not any("hunter" in value for value in rows.values())


def test_init_makes_a_project_folder_that_loads_as_it_is(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    written = init_project(target)
    assert target / "lora-workers.yaml" in written
    assert (target / "models" / "catalog.yaml").is_file()
    assert list((target / "pipelines").glob("*.yaml"))
    settings = Settings.load(config=target / "lora-workers.yaml").settings
    assert settings.catalog == target / "models" / "catalog.yaml"
    assert Path(settings.engine.model) == target / "models" / "tiny-llama"
    with pytest.raises(ConfigError, match="not an empty folder"):
        init_project(target)


def test_the_package_list_names_every_package_folder() -> None:
    """pyproject.toml lists packages (the project folder's parts are mapped in from outside
    workers/): a new subpackage left off would be missing from a wheel."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        path.parent.relative_to(ROOT).as_posix().replace("/", ".")
        for path in (ROOT / "workers").rglob("__init__.py")
    }
    assert on_disk <= listed, sorted(on_disk - listed)
