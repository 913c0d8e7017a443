"""Results as a Hive-partitioned Parquet dataset for analysts.

Layout: `root/task=<task>/date=<YYYY-MM-DD>/<file_stem>.parquet`, the date taken from
`completed_at` in UTC. Each file is written under a temporary name and renamed into place, so a
reader never sees a partial file and a replay with the same `file_stem` overwrites its earlier
file instead of adding duplicate rows.

The `task` column lives only in the directory name, not in the files. pyarrow.dataset silently
prefers the partition value when a file also holds a column of the same name, and other readers
(DuckDB, Polars) resolve that clash in their own ways, so storing it twice would give two
sources of truth that could disagree. `arrow_schema_for` is therefore the logical row schema (what
`read_dataset` returns, plus its `date` column); the files hold it without `task`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq

from workers.core.contracts import Result

PARTITION_TASK = "task"
PARTITION_DATE = "date"
TEMP_SUFFIX = ".parquet.partial"
OUTPUT_COLUMN_PREFIX = "out_"
# pyarrow.dataset's default ignore_prefixes; DuckDB and Polars globs skip hidden files too.
IGNORED_PREFIXES = (".", "_")

_TIMESTAMP = pa.timestamp("ms", tz="UTC")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

FIXED_FIELDS: tuple[pa.Field, ...] = (
    pa.field("job_id", pa.string(), nullable=False),
    pa.field(PARTITION_TASK, pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("adapter_name", pa.string()),
    pa.field("adapter_version", pa.string()),
    pa.field("adapter_sha256", pa.string()),
    pa.field("served_by", pa.string()),
    pa.field("route_json", pa.string()),
    pa.field("output_json", pa.string(), nullable=False),
    pa.field("raw_output", pa.string(), nullable=False),
    pa.field("prompt_tokens", pa.int32(), nullable=False),
    pa.field("completion_tokens", pa.int32(), nullable=False),
    pa.field("error_code", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("metadata_json", pa.string()),
    pa.field("enqueued_at", _TIMESTAMP, nullable=False),
    pa.field("received_at", _TIMESTAMP, nullable=False),
    pa.field("completed_at", _TIMESTAMP, nullable=False),
    pa.field("queue_ms", pa.float64(), nullable=False),
    pa.field("generate_ms", pa.float64(), nullable=False),
)

_SCALAR_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "integer": pa.int64(),
    "number": pa.float64(),
    "boolean": pa.bool_(),
}


def _property_type(prop: Any) -> pa.DataType | None:
    """The Arrow type of one output property, or None when it is not a plain scalar."""
    if not isinstance(prop, dict):
        return None
    declared = prop.get("type")
    if isinstance(declared, str):
        return _SCALAR_TYPES.get(declared)
    if isinstance(declared, list):
        # ["string", "null"] is a nullable string; a real union has no single column type.
        non_null = [t for t in declared if t != "null"]
        if len(non_null) == 1 and isinstance(non_null[0], str):
            return _SCALAR_TYPES.get(non_null[0])
        return None
    enum = prop.get("enum")
    if isinstance(enum, list):
        values = [v for v in enum if v is not None]
        if values and all(isinstance(v, str) for v in values):
            return pa.string()
    return None


def output_columns(output_schema: dict[str, Any] | None) -> dict[str, pa.DataType]:
    """Typed `out_<property>` columns for the top-level scalar properties of an object schema."""
    if not output_schema:
        return {}
    declared = output_schema.get("type")
    if declared is not None and declared != "object":
        return {}
    properties = output_schema.get("properties")
    if not isinstance(properties, dict):
        return {}
    columns: dict[str, pa.DataType] = {}
    for name, prop in properties.items():
        arrow_type = _property_type(prop)
        if arrow_type is not None:
            columns[f"{OUTPUT_COLUMN_PREFIX}{name}"] = arrow_type
    return columns


def arrow_schema_for(output_schema: dict[str, Any] | None) -> pa.Schema:
    """Fixed columns + one typed column per top-level scalar property of the task's output
    JSON Schema."""
    out_fields = [pa.field(name, t) for name, t in output_columns(output_schema).items()]
    return pa.schema([*FIXED_FIELDS, *out_fields])


def _typed_value(value: Any, arrow_type: pa.DataType) -> Any:
    """The value if it fits the column's type, else None (a wrong type must not fail the file)."""
    # bool is an int subclass in Python; JSON true is not a number.
    if arrow_type == pa.string():
        return value if isinstance(value, str) else None
    if arrow_type == pa.bool_():
        return value if isinstance(value, bool) else None
    if arrow_type == pa.int64():
        ok = isinstance(value, int) and not isinstance(value, bool)
        return value if ok and _INT64_MIN <= value <= _INT64_MAX else None
    if arrow_type == pa.float64():
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None
        try:
            return float(value)
        except OverflowError:  # an integer beyond float64's range
            return None
    return None


def _utc_date(ms: int) -> date:
    # Integer timedelta arithmetic: exact for every millisecond, unlike float seconds.
    return (_EPOCH + timedelta(milliseconds=ms)).date()


def _fsync_dir(path: Path) -> None:
    """Persist a directory entry change (create, rename) across a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs_durable(path: Path) -> None:
    """mkdir -p that fsyncs the parent of each directory it creates."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        _fsync_dir(directory.parent)


class PublishRefused(Exception):
    """A write's `publish_if` said no: its temporary files are deleted, nothing is published."""


def _is_ignored(relative: Path) -> bool:
    return any(part.startswith(IGNORED_PREFIXES) for part in relative.parts)


def data_files(root: Path) -> list[Path]:
    """The dataset's visible files: the same ones pyarrow.dataset discovers."""
    return sorted(
        path
        for path in root.rglob("*.parquet")
        if path.is_file() and not _is_ignored(path.relative_to(root))
    )


class ParquetDatasetWriter:
    """Writes batches of results for one output schema into the dataset under `root`."""

    def __init__(
        self,
        root: Path,
        output_schema: dict[str, Any] | None,
        *,
        row_group_size: int = 10_000,
        date_from: str = "completed_at",
    ) -> None:
        """`date_from`: "completed_at" (bulk runs) or "enqueued_at" (Kafka sinks: the job's
        Kafka timestamp, which a replay after a crash reproduces, so rows land in the same
        partition and file as before)."""
        if date_from not in ("completed_at", "enqueued_at"):
            raise ValueError(f"date_from must be completed_at or enqueued_at, got {date_from!r}")
        self._date_from = date_from
        if row_group_size < 1:
            raise ValueError(f"row_group_size must be at least 1, got {row_group_size}")
        self.root = Path(root)
        self.row_group_size = row_group_size
        self.schema = arrow_schema_for(output_schema)
        self._output_columns = output_columns(output_schema)
        self._file_schema = self.schema.remove(self.schema.get_field_index(PARTITION_TASK))

    def write(
        self,
        results: Sequence[Result],
        file_stem: str,
        publish_if: Callable[[], bool] | None = None,
    ) -> list[Path]:
        """Write these results as one file per (task, date) Hive partition:
        root/task=<task>/date=<YYYY-MM-DD from completed_at, UTC>/<file_stem>.parquet.
        Atomic: write each to a temporary name in its directory, flush + os.fsync it, then
        os.replace every one onto its final name and fsync the directory, so a crash never leaves
        a partial file under a final name and a replay with the same file_stem overwrites instead
        of duplicating. Returns the final paths. Row groups of row_group_size.

        `publish_if` is asked once every temporary file is durable, right before the renames: if
        it says no, they are deleted and PublishRefused is raised (nothing is published).

        Atomic per file, not per call: if a later rename fails, the files already renamed stay,
        and a replay with the same file_stem replaces them."""
        _check_stem(file_stem)
        groups: dict[tuple[str, date], list[Result]] = {}
        for result in results:
            key = (result.task, _utc_date(self._partition_ms(result)))
            groups.setdefault(key, []).append(result)
        staged: list[tuple[Path, Path]] = []
        try:
            for (task, day), rows in groups.items():
                directory = self._task_dir(task) / f"{PARTITION_DATE}={day.isoformat()}"
                staged.append(self._stage_file(directory, file_stem, self._table(rows)))
            if publish_if is not None and not publish_if():
                raise PublishRefused(file_stem)
            for temp, final in staged:
                os.replace(temp, final)
                _fsync_dir(final.parent)
        except BaseException:
            for temp, _ in staged:
                with contextlib.suppress(FileNotFoundError):
                    temp.unlink()
            raise
        return [final for _, final in staged]

    def task_files(self, task: str, stem_prefix: str) -> list[Path]:
        """The visible files of `task`, in every date partition, whose stem starts with
        `stem_prefix`."""
        _check_stem(stem_prefix)
        pattern = f"{PARTITION_DATE}=*/{glob.escape(stem_prefix)}*.parquet"
        return sorted(self._task_dir(task).glob(pattern))

    def remove(self, paths: Sequence[Path]) -> None:
        """Delete these files, durably: a crash must not bring one back."""
        for path in paths:
            path.unlink(missing_ok=True)
            _fsync_dir(path.parent)

    def _task_dir(self, task: str) -> Path:
        # URI-encode the value, which pyarrow's hive partitioning decodes ("a/b" -> a%2Fb):
        # a task name must never add a directory level.
        return self.root / f"{PARTITION_TASK}={quote(task, safe='')}"

    def _partition_ms(self, result: Result) -> int:
        if self._date_from == "enqueued_at":
            return result.timings.enqueued_at_ms
        return result.timings.completed_at_ms

    def _table(self, rows: Sequence[Result]) -> pa.Table:
        columns: dict[str, list[Any]] = {field.name: [] for field in self._file_schema}
        for result in rows:
            for name, value in self._row(result).items():
                columns[name].append(value)
        return pa.table(columns, schema=self._file_schema)

    def _row(self, result: Result) -> dict[str, Any]:
        timings = result.timings
        row: dict[str, Any] = {
            "job_id": result.job_id,
            "status": result.status.value,
            "adapter_name": result.adapter.name if result.adapter else None,
            "adapter_version": result.adapter.version if result.adapter else None,
            "adapter_sha256": result.adapter.sha256 if result.adapter else None,
            "served_by": result.served_by.value if result.served_by else None,
            "route_json": None if result.route is None else result.route.model_dump_json(),
            "output_json": json.dumps(result.output, ensure_ascii=False),
            "raw_output": result.raw_output,
            "prompt_tokens": result.usage.prompt_tokens,
            "completion_tokens": result.usage.completion_tokens,
            "error_code": result.error.code if result.error else None,
            "error_message": result.error.message if result.error else None,
            "metadata_json": (
                None if result.metadata is None else json.dumps(result.metadata, ensure_ascii=False)
            ),
            "enqueued_at": timings.enqueued_at_ms,
            "received_at": timings.received_at_ms,
            "completed_at": timings.completed_at_ms,
            "queue_ms": timings.queue_ms,
            "generate_ms": timings.generate_ms,
        }
        output = result.output if isinstance(result.output, dict) else {}
        prefix_len = len(OUTPUT_COLUMN_PREFIX)
        for column, arrow_type in self._output_columns.items():
            row[column] = _typed_value(output.get(column[prefix_len:]), arrow_type)
        return row

    def _stage_file(self, directory: Path, file_stem: str, table: pa.Table) -> tuple[Path, Path]:
        """The table durable under a temporary name: (temporary path, final path)."""
        _make_dirs_durable(directory)
        final = directory / f"{file_stem}.parquet"
        # Same directory so os.replace is an atomic rename. The leading dot hides it from
        # pyarrow; the suffix keeps a file left by `kill -9` out of every `*.parquet` glob
        # (DuckDB and Polars read dot files a glob matches, and would count its rows twice).
        temp = directory / f".tmp-{file_stem}-{uuid.uuid4().hex}{TEMP_SUFFIX}"
        try:
            with open(temp, "xb") as handle:
                with pq.ParquetWriter(handle, self._file_schema) as writer:
                    writer.write_table(table, row_group_size=self.row_group_size)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            raise
        return temp, final


def _check_stem(file_stem: str) -> None:
    # A stem starting with "." or "_" would be written but never read back.
    if (
        not file_stem
        or file_stem.startswith(IGNORED_PREFIXES)
        or "/" in file_stem
        or os.sep in file_stem
    ):
        raise ValueError(f"invalid file_stem {file_stem!r}: empty, hidden or a path")


def existing_job_ids(root: Path, stem_marker: str | None = None) -> set[str]:
    """job_ids already in the dataset (empty set when root does not exist), for resuming a run.
    Read only the job_id column of every *.parquet file (ignore names starting with '.' or '_'),
    or of the files whose stem contains `stem_marker` (one run's files)."""
    root = Path(root)
    if not root.is_dir():
        return set()
    job_ids: set[str] = set()
    for path in data_files(root):
        if stem_marker is not None and stem_marker not in path.stem:
            continue
        column = pq.ParquetFile(path).read(columns=["job_id"]).column("job_id")
        job_ids.update(column.to_pylist())
    return job_ids
