"""What a bulk run does before serving: one run at a time per run id and output, and rows an
earlier start ended with a transient error served again. Real files, no engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.results import make_result
from workers.bulk.resume import drop_transient_rows, is_final, run_lock
from workers.bulk.runner import _run_marker
from workers.core.config import ConfigError
from workers.core.errors import JobError, OutputError
from workers.parquet.dataset import ParquetDatasetWriter, existing_job_ids


@pytest.mark.parametrize(
    ("status", "code", "final"),
    [
        ("ok", None, True),
        ("invalid_output", OutputError.SCHEMA_VIOLATION.value, True),
        ("error", JobError.INVALID_JOB.value, True),
        ("error", JobError.INVALID_JSON.value, True),
        ("error", JobError.CONTEXT_EXCEEDED.value, True),
        ("error", JobError.UNKNOWN_TASK.value, True),
        ("error", JobError.ENGINE_CRASH.value, False),
        ("error", JobError.INTERNAL_ERROR.value, False),
        ("error", JobError.ADAPTER_UNAVAILABLE.value, False),
    ],
)
def test_only_transient_errors_are_served_again(status: str, code: str | None, final: bool) -> None:
    assert is_final(status, code) is final


def error_row(job_id: str, code: JobError) -> object:
    return make_result(
        job_id=job_id,
        status="error",
        output=None,
        raw_output="",
        adapter=None,
        error={"code": code.value, "message": "it happened"},
    )


def test_a_resumed_run_drops_its_transient_rows_and_keeps_every_final_one(tmp_path: Path) -> None:
    writer = ParquetDatasetWriter(tmp_path, None)
    marker = _run_marker("abc")
    writer.write(
        [
            make_result(job_id="ok-1"),
            error_row("crashed", JobError.ENGINE_CRASH),
            error_row("bad", JobError.INVALID_JOB),
        ],
        f"part-000000000-000000002{marker}s1",
    )
    writer.write([error_row("raised", JobError.INTERNAL_ERROR)], f"part-000000003{marker}s1")
    writer.write([error_row("other-run", JobError.ENGINE_CRASH)], "part-000000000-run-xyz-s1")

    assert drop_transient_rows(tmp_path, marker) == 2
    assert existing_job_ids(tmp_path, stem_marker=marker) == {"ok-1", "bad"}
    assert "other-run" in existing_job_ids(tmp_path)  # another run's files are not touched
    assert drop_transient_rows(tmp_path, marker) == 0  # nothing left to retry
    assert drop_transient_rows(tmp_path / "missing", marker) == 0
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]


def test_a_second_run_with_the_same_id_and_output_refuses_to_start(tmp_path: Path) -> None:
    with run_lock(tmp_path / "out", "abc"):
        with (
            pytest.raises(ConfigError, match="run abc is already running into"),
            run_lock(tmp_path / "out", "abc"),
        ):
            pass
        with run_lock(tmp_path / "out", "other"):  # another run id: its own lock
            pass
    with run_lock(tmp_path / "out", "abc"):  # released on exit
        pass


def test_the_lock_of_a_killed_run_is_released(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from workers.bulk.resume import run_lock\n"
            f"with run_lock(Path({str(tmp_path)!r}), 'abc'):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError), run_lock(tmp_path, "abc"):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=10)
    with run_lock(tmp_path, "abc"):
        pass
