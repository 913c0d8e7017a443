"""Copies of zoo adapters in a temp root, edited to be broken in one specific way."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
