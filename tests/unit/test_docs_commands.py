"""Every `lora-workers` line in the README and docs/ runs as written.

- Every documented line parses: its command and flags exist and its values are accepted.
- Folders and files it names in the repository exist; adapter paths lie inside the allowed
  roots of the repository's own configuration.
- The lines that need no broker and no engine (`--version`, `config show`, `check`, `init`,
  `schemas export`, `bulk --dry-run`) are run, from the repository root, and must exit 0.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.unit.cli_process import run_cli
from workers.cli import _build_parser
from workers.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")
RUN_WITHOUT_A_BROKER = (("config",), ("check",), ("init",), ("schemas",), ("--version",))


def documented_lines() -> list[tuple[str, int, str]]:
    """(file, line number, command) for every `lora-workers ...` line in a fenced block."""
    found = []
    for path in DOCS:
        fenced = False
        lines = path.read_text().splitlines()
        number = 0
        while number < len(lines):
            text = lines[number].strip()
            number += 1
            if text.startswith("```"):
                fenced = not fenced
                continue
            while fenced and text.endswith("\\") and number < len(lines):
                text = text[:-1] + " " + lines[number].strip()
                number += 1
            command = text.removeprefix("$ ")
            words = command.split()
            while words and ASSIGNMENT.match(words[0]):
                words = words[1:]
            if fenced and words and words[0] == "lora-workers":
                found.append((path.name, number, command))
    return found


def split(command: str) -> tuple[dict[str, str], list[str]]:
    """The variables a line sets and its arguments after `lora-workers` (comments dropped)."""
    words = shlex.split(command, comments=True)
    env = {}
    while ASSIGNMENT.match(words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words[1:]


LINES = documented_lines()


def test_the_docs_have_commands_to_check() -> None:
    assert len(LINES) >= 30


@pytest.mark.parametrize(("doc", "line", "command"), LINES, ids=[f"{d}:{n}" for d, n, _ in LINES])
def test_each_documented_line_parses_and_names_what_exists(
    doc: str, line: int, command: str
) -> None:
    env, argv = split(command)
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as exit_:  # --version and --help exit 0 once parsed
        if exit_.code != 0:
            pytest.fail(f"{doc}:{line}: {command!r} does not parse (exit {exit_.code})")
        return
    for variable, value in env.items():
        if variable == "LORA_WORKERS_PIPELINES_DIR":
            assert (ROOT / value).is_dir(), f"{doc}:{line}: no folder {value}"
    if getattr(args, "pipelines", None) is not None:
        assert (ROOT / args.pipelines).is_dir(), f"{doc}:{line}: no folder {args.pipelines}"
    path = getattr(args, "path", None)
    if isinstance(path, Path):
        roots = Settings.load(config=ROOT / "lora-workers.yaml").settings.allowed_roots
        inside = (ROOT / path).resolve()
        assert any(inside.is_relative_to(root) for root in roots), (
            f"{doc}:{line}: --path {path} is outside the allowed roots {roots}"
        )


def command_of(command: str) -> str | None:
    """The subcommand a line runs (None for --version and --help)."""
    try:
        return _build_parser().parse_args(split(command)[1]).command
    except SystemExit:
        return None


RUNNABLE = [
    (doc, line, command)
    for doc, line, command in LINES
    if command_of(command) in ("config", "check", "init", "schemas")
    or "--dry-run" in split(command)[1]
    or split(command)[1] == ["--version"]
]


def run_line(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env, argv = split(command)
    return run_cli(argv, cwd, **env)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that looks like the repository (its entries linked in) where the documented
    `init` lines have run, so later lines find the projects they made; nothing is written
    into the repository itself."""
    folder = tmp_path_factory.mktemp("workspace")
    for entry in ROOT.iterdir():
        if not entry.name.startswith("."):
            (folder / entry.name).symlink_to(entry)
    done: set[tuple[str, ...]] = set()
    for doc, line, command in RUNNABLE:
        argv = tuple(split(command)[1])
        if command_of(command) == "init" and argv not in done:  # docs may repeat a line
            done.add(argv)
            made = run_line(command, folder)
            assert made.returncode == 0, f"{doc}:{line}: {command}\n{made.stderr[-2000:]}"
    return folder


def test_some_documented_lines_run_here() -> None:
    assert len(RUNNABLE) >= 4


@pytest.mark.parametrize(
    ("doc", "line", "command"), RUNNABLE, ids=[f"{d}:{n}" for d, n, _ in RUNNABLE]
)
def test_each_line_that_needs_no_broker_runs(
    doc: str, line: int, command: str, workspace: Path, tmp_path: Path
) -> None:
    # An init line ran in the workspace already (its folder exists now): again, in a fresh one.
    cwd = tmp_path if command_of(command) == "init" else workspace
    completed = run_line(command, cwd)
    assert completed.returncode == 0, f"{doc}:{line}: {command}\n{completed.stderr[-2000:]}"
