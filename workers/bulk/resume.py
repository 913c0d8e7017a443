"""What a bulk run does before it serves: take its run's lock, and give up the rows an earlier
start of the run ended with a transient error, so they are served again.

Resume never redoes a final row: an answer, an invalid output or a job that cannot be served
(`invalid_job`, `context_exceeded`, ...) gets the same outcome every time. A transient error
(the engine died, something raised, an adapter's files were briefly unreadable) says nothing
about the job, so the row is dropped from its file (rewritten atomically without it) and the
job is served again; a crash before it is leaves the job unwritten, and the next start serves it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import structlog

from workers.core.config import ConfigError
from workers.core.contracts import ResultStatus
from workers.core.errors import TRANSIENT_JOB_ERRORS
from workers.parquet.dataset import TEMP_SUFFIX, data_files

log = structlog.get_logger(__name__)


def is_final(status: str, error_code: str | None) -> bool:
    """Whether a written row stays as it is when its run resumes."""
    return status != ResultStatus.ERROR.value or error_code not in TRANSIENT_JOB_ERRORS


@contextlib.contextmanager
def run_lock(output_dir: Path, run_id: str) -> Iterator[Path]:
    """Exclusive use of one run's files while it runs: a second start of the same run into the
    same dataset would serve the same rows. The kernel releases the lock when the process
    exits, however it exits, so a killed run never leaves it held."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f".lock-run-{run_id}"
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(
            f"run {run_id} is already running into {output_dir} (lock {path.name} is held); "
            "wait for it to finish, or give another --run-id or --output"
        ) from None
    try:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")  # who holds it, for whoever looks
        handle.flush()
        yield path
    finally:
        handle.close()  # the file stays: removing it would race the next run's open


def drop_transient_rows(output_dir: Path, stem_marker: str) -> int:
    """Remove the rows with a transient error from the run's files; how many were removed."""
    if not output_dir.is_dir():
        return 0
    dropped = 0
    for path in data_files(output_dir):
        if stem_marker not in path.stem:
            continue
        outcomes = pq.ParquetFile(path).read(columns=["status", "error_code"]).to_pylist()
        keep = [is_final(row["status"], row["error_code"]) for row in outcomes]
        if all(keep):
            continue
        dropped += keep.count(False)
        if any(keep):
            _rewrite(path, keep)
        else:
            path.unlink()
        log.info("bulk_transient_rows_dropped", file=str(path), rows=keep.count(False))
    return dropped


def _rewrite(path: Path, keep: list[bool]) -> None:
    """The file without the rows not kept, under the same name, atomically."""
    source = pq.ParquetFile(path)
    group_rows = source.metadata.row_group(0).num_rows if source.metadata.num_row_groups else 1
    table = source.read().filter(pa.array(keep))
    temp = path.with_name(f".tmp-{path.stem}-{uuid.uuid4().hex}{TEMP_SUFFIX}")
    try:
        with open(temp, "xb") as handle:
            with pq.ParquetWriter(handle, table.schema) as writer:
                writer.write_table(table, row_group_size=max(group_rows, 1))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
