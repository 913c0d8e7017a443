"""`lora-workers init DIR`: a project folder of one's own, copied from the one this package
carries (the repository's own: configuration file, pipelines, schemas and the demo zoo).

In a checkout the project folder is the repository; in an installed wheel it is the package's
`workers/project/` (pyproject.toml maps the repository's folders there), so both copy the same
files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from workers.core.config import REPO_ROOT, ConfigError
from workers.core.config.sources import DEFAULT_CONFIG_NAME

# What a project folder holds, as globs relative to it: exactly what the wheel carries.
PROJECT_FILES = (
    DEFAULT_CONFIG_NAME,
    "pipelines/*.yaml",
    "schemas/*.json",
    "models/catalog.yaml",
    "models/tiny-llama/*",
    "models/adapters/*/*",
)


def project_source() -> Path:
    """The folder `init` copies: the installed package's copy, else the checkout."""
    bundled = Path(__file__).resolve().parent / "project"
    return bundled if (bundled / DEFAULT_CONFIG_NAME).is_file() else REPO_ROOT


def project_files(source: Path) -> list[Path]:
    return sorted(
        {path.relative_to(source) for pattern in PROJECT_FILES for path in source.glob(pattern)}
    )


def init_project(target: Path) -> list[Path]:
    """Copy the project folder into `target` (new or empty); the files written."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{target}: exists and is not an empty folder")
    source = project_source()
    files = project_files(source)
    if not files:
        raise ConfigError(f"{source}: no project files to copy (a broken installation?)")
    written = []
    for relative in files:
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / relative, destination)
        written.append(destination)
    return written
