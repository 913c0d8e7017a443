"""Copies of zoo adapters in a temp root, edited to be broken in one specific way."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ZOO_ADAPTERS = Path(__file__).resolve().parents[2] / "models" / "adapters"


def copy_adapter(root: Path, source: str, target: str | None = None, **config_changes) -> Path:
    """Copy zoo adapter `source` to root/target, overriding adapter_config.json fields."""
    destination = root / (target or source)
    shutil.copytree(ZOO_ADAPTERS / source, destination)
    if config_changes:
        config_path = destination / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config.update(config_changes)
        config_path.write_text(json.dumps(config))
    return destination


def read_as_non_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a file of mode 000 fails as it does for anyone but root (the tests run as root,
    whom chmod 000 does not stop)."""
    real_open = Path.open

    def open_without_root(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.is_file() and stat.S_IMODE(self.stat().st_mode) == 0:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_without_root)


def _dangling_config(path: Path) -> None:
    (path / "adapter_config.json").unlink()
    (path / "adapter_config.json").symlink_to(path / "gone.json")


def _config_is_a_directory(path: Path) -> None:
    (path / "adapter_config.json").unlink()
    (path / "adapter_config.json").mkdir()
    (path / "adapter_config.json" / "inner.json").write_text("{}")


def _weights_are_a_directory(path: Path) -> None:
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.safetensors").mkdir()


def _dangling_weights(path: Path) -> None:
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.safetensors").symlink_to(path / "gone.safetensors")


def _config_is_a_fifo(path: Path) -> None:
    # Reading a named pipe blocks forever: it must be refused without being opened.
    (path / "adapter_config.json").unlink()
    os.mkfifo(path / "adapter_config.json")


def _config_links_outside_the_roots(path: Path) -> None:
    outside = path.parent.parent / "outside.json"
    outside.write_text((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").unlink()
    (path / "adapter_config.json").symlink_to(outside)


def _unreadable_config(path: Path) -> None:
    (path / "adapter_config.json").chmod(0)  # with `read_as_non_root` as root


def _file_instead_of_folder(path: Path) -> None:
    shutil.rmtree(path)
    path.write_text("{}")


def _link_loop(path: Path) -> None:
    shutil.rmtree(path)
    path.symlink_to(path)


def _config_text(text: bytes) -> Callable[[Path], None]:
    return lambda path: (path / "adapter_config.json").write_bytes(text)


def _config_fields(**changes: object) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        config = json.loads((path / "adapter_config.json").read_text())
        config.update(changes)
        (path / "adapter_config.json").write_text(json.dumps(config))

    return edit


# Folders a buggy or hostile publisher can name: each is refused with its code, never an
# exception of another type (which would stop the worker applying the update). Use with
# `read_as_non_root`.
HOSTILE_FOLDERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "version is a file": (_file_instead_of_folder, "path_missing"),
    "version is a link loop": (_link_loop, "files_unreadable"),
    "config is unreadable (chmod 000)": (_unreadable_config, "files_unreadable"),
    "dangling config link": (_dangling_config, "files_missing"),
    "config is a directory": (_config_is_a_directory, "files_missing"),
    "weights are a directory": (_weights_are_a_directory, "files_missing"),
    "dangling weights link": (_dangling_weights, "files_missing"),
    "config is a named pipe": (_config_is_a_fifo, "files_missing"),
    "config links outside the roots": (_config_links_outside_the_roots, "path_outside_roots"),
    "config is a list": (_config_text(b"[1, 2]"), "invalid_adapter_config"),
    "config is a string": (_config_text(b'"r"'), "invalid_adapter_config"),
    "config is not UTF-8": (_config_text(b'{"r": "\xff\xfe"}'), "invalid_adapter_config"),
    "config nested 100000 deep": (
        _config_text(b'{"r": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "invalid_adapter_config",
    ),
    "config of 2 MB": (
        _config_text(b'{"r": 8, "pad": "' + b"x" * 2_000_000 + b'"}'),
        "invalid_adapter_config",
    ),
    "r as a string": (_config_fields(r="8"), "invalid_adapter_config"),
    "r as a bool": (_config_fields(r=True), "invalid_adapter_config"),
    "r as NaN": (
        _config_text(b'{"r": NaN, "target_modules": ["q_proj"]}'),
        "invalid_adapter_config",
    ),
    "r with 5000 digits": (
        _config_text(b'{"r": ' + b"9" * 5000 + b', "target_modules": ["q_proj"]}'),
        "invalid_adapter_config",
    ),
    "r of 10**30": (_config_fields(r=10**30), "rank_too_large"),
    "r of 0": (_config_fields(r=0), "invalid_adapter_config"),
    "modules as an object": (
        _config_fields(target_modules={"q_proj": 1}),
        "invalid_adapter_config",
    ),
    "modules as numbers": (_config_fields(target_modules=[1, 2]), "invalid_adapter_config"),
    "modules nested": (_config_fields(target_modules=[["q_proj"]]), "invalid_adapter_config"),
    "base model as a list": (
        _config_fields(base_model_name_or_path=["tiny-llama"]),
        "invalid_adapter_config",
    ),
}
