"""The CLI's project commands, run as a user runs them: --version, --help, config show, init and
bulk --dry-run. None needs a broker or an engine."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.unit.cli_process import run_cli

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli(args, cwd, **env)


def test_help_tells_where_settings_come_from() -> None:
    shown = cli("--help")
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    assert "LORA_WORKERS_" in text
    assert "--config FILE" in text
    assert "config show" in text


def test_version_is_the_installed_one() -> None:
    from importlib.metadata import version

    shown = cli("--version")
    assert shown.returncode == 0
    assert shown.stdout.strip() == f"lora-workers {version('lora-workers')}"


def test_config_show_gives_each_setting_its_source(tmp_path: Path) -> None:
    shown = cli("--group-id-is-not-global", cwd=tmp_path)
    assert shown.returncode == 2  # an unknown flag: usage error, one line
    assert len(shown.stderr.strip().splitlines()) == 1
    shown = cli("config", "show", LORA_WORKERS_ENGINE__MAX_LORAS="3")
    assert shown.returncode == 0, shown.stderr
    lines = {line.split()[0]: line for line in shown.stdout.splitlines() if line[0] != "#"}
    assert lines["engine.max_loras"].split()[1] == "3"
    assert lines["engine.max_loras"].endswith("# environment LORA_WORKERS_ENGINE__MAX_LORAS")
    assert lines["catalog"].endswith(f"# file {ROOT / 'lora-workers.yaml'}")
    assert lines["group_id"].endswith("# default")


def test_a_misspelled_variable_stops_every_command_with_one_line() -> None:
    shown = cli("config", "show", LORA_WORKERS_GROUPID="x")
    assert shown.returncode == 2
    assert shown.stderr.strip() == (
        "lora-workers: error: LORA_WORKERS_GROUPID: unknown setting "
        "(did you mean LORA_WORKERS_GROUP_ID?)"
    )


def test_init_refuses_a_folder_in_use(tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    shown = cli("init", str(tmp_path / "used"))
    assert shown.returncode == 2
    assert "exists and is not an empty folder" in shown.stderr
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["notes.txt"]


def test_bulk_dry_run_plans_without_writing(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    rows = [
        {"job_id": "a", "task": "classify", "input": "refund please"},
        {"job_id": "b", "task": "classify", "input": "login broken"},
        {"job_id": "c", "task": "reply", "input": "hi", "tenant": "acme"},
        {"job_id": "d", "task": "nope", "input": "x"},
    ]
    jobs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    shown = cli(
        "bulk", "--input", str(jobs), "--output", str(out), "--dry-run", "--merge", "always"
    )
    assert shown.returncode == 0, shown.stderr
    assert not out.exists()
    assert "4 rows read, 0 already written, 3 to serve, 1 unroutable" in shown.stdout
    tiers = {line.split()[0]: line.split()[-1] for line in shown.stdout.splitlines()[2:-1]}
    assert tiers["classifier@1"] == "merged"
    assert sum(int(line.split()[1]) for line in shown.stdout.splitlines()[2:-1]) == 3


def test_check_passes_on_a_new_project_and_fails_on_a_broken_one(tmp_path: Path) -> None:
    assert cli("init", "proj", cwd=tmp_path).returncode == 0
    project = tmp_path / "proj"
    passed = cli("check", cwd=project)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert passed.stdout.strip().endswith("0 failed")
    (project / "models" / "adapters" / "summarizer" / "adapter_config.json").unlink()
    failed = cli("check", cwd=project)
    assert failed.returncode == 1
    assert "summarizer" in failed.stdout
    assert failed.stdout.strip().endswith("1 failed")


def test_without_vllm_check_and_run_say_how_to_install_it(tmp_path: Path) -> None:
    # A `vllm` that cannot be imported shadows the installed one, as on a machine without it.
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise ImportError('no vllm here')\n")
    checked = cli("check", PYTHONPATH=str(tmp_path))
    assert checked.returncode == 1
    assert "vLLM is not installed" in checked.stdout
    ran = cli("--bootstrap-servers", "127.0.0.1:1", "run", PYTHONPATH=str(tmp_path))
    assert ran.returncode == 2
    assert (
        ran.stderr.strip().splitlines()[-1].startswith("lora-workers: error: vLLM is not installed")
    )


def test_publish_failures_are_one_line_per_reason(capsys: pytest.CaptureFixture[str]) -> None:
    from workers.cli import _print_failed_lines

    denied = "not authorized (topic): jobs.x: Broker: Topic authorization failed"
    errors = [(n, denied) for n in range(1, 14)] + [(20, "not JSON"), (None, "flush timed out")]
    _print_failed_lines(errors)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"lora-workers: 13 lines (1, 2, 3, 4, 5, ...): {denied}",
        "lora-workers: line 20: not JSON",
        "lora-workers: publish: flush timed out",
    ]
