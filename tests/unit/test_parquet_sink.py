import json
import os
import stat
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.datasets import read_dataset
from workers.core.contracts import AdapterRef, ErrorInfo, Result, ResultStatus, Timings, Usage
from workers.parquet.dataset import (
    TEMP_SUFFIX,
    ParquetDatasetWriter,
    PublishRefused,
    arrow_schema_for,
    existing_job_ids,
    output_columns,
)

# 2024-03-01T12:00:00Z and the last / first millisecond around the following midnight.
NOON_MS = 1_709_294_400_000
LAST_MS_OF_DAY = 1_709_337_599_999
MIDNIGHT_MS = 1_709_337_600_000

CLASSIFY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"enum": ["billing", "technical", "account"]},
        "confidence": {"type": "number"},
    },
    "required": ["label"],
}

FIXED_NAMES = [
    "job_id",
    "task",
    "status",
    "adapter_name",
    "adapter_version",
    "adapter_sha256",
    "served_by",
    "route_json",
    "output_json",
    "raw_output",
    "prompt_tokens",
    "completion_tokens",
    "error_code",
    "error_message",
    "metadata_json",
    "enqueued_at",
    "received_at",
    "completed_at",
    "queue_ms",
    "generate_ms",
]


def make_result(
    job_id: str,
    *,
    task: str = "classify",
    status: ResultStatus = ResultStatus.OK,
    output: Any = None,
    raw_output: str = "",
    adapter: AdapterRef | None = None,
    error: ErrorInfo | None = None,
    metadata: dict[str, Any] | None = None,
    completed_at_ms: int = NOON_MS,
) -> Result:
    return Result(
        job_id=job_id,
        task=task,
        status=status,
        output=output,
        raw_output=raw_output,
        adapter=adapter,
        usage=Usage(prompt_tokens=12, completion_tokens=5),
        error=error,
        metadata=metadata,
        timings=Timings(
            enqueued_at_ms=completed_at_ms - 300,
            received_at_ms=completed_at_ms - 250,
            completed_at_ms=completed_at_ms,
            queue_ms=20.5,
            generate_ms=229.5,
        ),
    )


def hidden_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith((".", "_"))]


# --- column mapping ----------------------------------------------------------------------------


def test_output_columns_map_top_level_scalars_and_skip_the_rest() -> None:
    schema = {
        "type": "object",
        "properties": {
            "label": {"enum": ["a", "b"]},
            "label_or_null": {"enum": ["a", None]},
            "summary": {"type": "string", "minLength": 1},
            "count": {"type": "integer"},
            "score": {"type": "number"},
            "flag": {"type": "boolean"},
            "maybe": {"type": ["string", "null"]},
            "maybe_int": {"type": ["null", "integer"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "nested": {"type": "object", "properties": {"x": {"type": "string"}}},
            "union": {"type": ["string", "integer"]},
            "numbers": {"enum": [1, 2]},
            "ref": {"$ref": "#/$defs/thing"},
            "nothing": {"type": "null"},
        },
    }
    assert output_columns(schema) == {
        "out_label": pa.string(),
        "out_label_or_null": pa.string(),
        "out_summary": pa.string(),
        "out_count": pa.int64(),
        "out_score": pa.float64(),
        "out_flag": pa.bool_(),
        "out_maybe": pa.string(),
        "out_maybe_int": pa.int64(),
    }


@pytest.mark.parametrize(
    "schema",
    [None, {}, {"type": "string"}, {"type": "array", "items": {"type": "string"}}],
)
def test_no_object_schema_means_no_output_columns(schema: dict[str, Any] | None) -> None:
    assert output_columns(schema) == {}
    assert arrow_schema_for(schema).names == FIXED_NAMES


def test_arrow_schema_fixed_columns_then_output_columns() -> None:
    schema = arrow_schema_for(CLASSIFY_SCHEMA)
    assert schema.names == [*FIXED_NAMES, "out_label", "out_confidence"]
    utc_ms = pa.timestamp("ms", tz="UTC")
    for name in ("enqueued_at", "received_at", "completed_at"):
        assert schema.field(name).type == utc_ms
    assert schema.field("prompt_tokens").type == pa.int32()
    assert schema.field("completion_tokens").type == pa.int32()
    assert schema.field("queue_ms").type == pa.float64()
    assert schema.field("generate_ms").type == pa.float64()
    assert not schema.field("job_id").nullable
    for name in (
        "adapter_name",
        "adapter_version",
        "adapter_sha256",
        "served_by",
        "error_code",
        "error_message",
    ):
        assert schema.field(name).nullable
    assert schema.field("metadata_json").nullable
    assert schema.field("out_label").type == pa.string()
    assert schema.field("out_confidence").type == pa.float64()


def test_the_repository_task_schemas_get_their_columns() -> None:
    schemas_dir = Path(__file__).resolve().parents[2] / "schemas"
    classify = json.loads((schemas_dir / "classify.output.schema.json").read_text())
    summarize = json.loads((schemas_dir / "summarize.output.schema.json").read_text())
    assert output_columns(classify) == {"out_label": pa.string()}
    assert output_columns(summarize) == {"out_summary": pa.string()}


# --- writing and reading -----------------------------------------------------------------------


def test_round_trip_values_types_and_partitions(tmp_path: Path) -> None:
    root = tmp_path / "results"
    writer = ParquetDatasetWriter(root, CLASSIFY_SCHEMA)
    results = [
        make_result(
            "job-1",
            output={"label": "billing", "confidence": 1},
            raw_output='{"label": "billing", "confidence": 1}',
            adapter=AdapterRef(name="support-clf", version="v2", sha256="ab" * 32),
            metadata={"ticket": "T-1", "note": "café"},
        ),
        make_result("job-2", output={"label": "account", "confidence": 0.25}),
        make_result(
            "job-3",
            status=ResultStatus.INVALID_OUTPUT,
            output="not json, ünïcode",
            raw_output="not json, ünïcode",
            error=ErrorInfo(code="invalid_json", message="Expecting value"),
        ),
    ]

    paths = writer.write(results, "batch-0001")

    expected = root / "task=classify" / "date=2024-03-01" / "batch-0001.parquet"
    assert paths == [expected]
    assert expected.is_file()
    table = read_dataset(root).sort_by("job_id")
    assert table.column_names == [*FIXED_NAMES, "out_label", "out_confidence", "date"]
    rows = table.to_pylist()
    assert [r["job_id"] for r in rows] == ["job-1", "job-2", "job-3"]
    assert {r["task"] for r in rows} == {"classify"}
    assert {r["date"] for r in rows} == {date(2024, 3, 1)}
    assert [r["status"] for r in rows] == ["ok", "ok", "invalid_output"]

    first, second, invalid = rows
    assert (first["adapter_name"], first["adapter_version"]) == ("support-clf", "v2")
    assert (second["adapter_name"], second["adapter_version"]) == (None, None)
    assert (first["adapter_sha256"], second["adapter_sha256"]) == ("ab" * 32, None)
    assert json.loads(first["output_json"]) == {"label": "billing", "confidence": 1}
    assert first["metadata_json"] == '{"ticket": "T-1", "note": "café"}'
    assert second["metadata_json"] is None
    assert first["out_label"] == "billing"
    assert first["out_confidence"] == 1.0
    assert second["out_confidence"] == 0.25
    assert (first["prompt_tokens"], first["completion_tokens"]) == (12, 5)
    assert first["completed_at"] == datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    assert first["enqueued_at"] == datetime(2024, 3, 1, 11, 59, 59, 700_000, tzinfo=UTC)
    assert first["received_at"] == datetime(2024, 3, 1, 11, 59, 59, 750_000, tzinfo=UTC)
    assert (first["queue_ms"], first["generate_ms"]) == (20.5, 229.5)
    assert (first["error_code"], first["error_message"]) == (None, None)

    assert invalid["output_json"] == '"not json, ünïcode"'  # JSON text, not ASCII-escaped
    assert invalid["raw_output"] == "not json, ünïcode"
    assert (invalid["error_code"], invalid["error_message"]) == ("invalid_json", "Expecting value")
    assert invalid["out_label"] is None
    assert invalid["out_confidence"] is None

    types = table.schema
    assert types.field("completed_at").type == pa.timestamp("ms", tz="UTC")
    assert types.field("prompt_tokens").type == pa.int32()
    assert types.field("out_confidence").type == pa.float64()
    assert types.field("task").type == pa.string()
    assert types.field("date").type == pa.date32()


def test_values_of_the_wrong_type_become_null(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer"},
            "x": {"type": "number"},
            "b": {"type": "boolean"},
            "s": {"type": "string"},
        },
    }
    writer = ParquetDatasetWriter(tmp_path, schema)
    writer.write(
        [
            make_result("good", output={"n": 3, "x": 2, "b": False, "s": "yes"}),
            make_result("bad", output={"n": True, "x": "1.5", "b": 1, "s": 7}),
            make_result("huge", output={"n": 2**70, "x": 10**400}),
            make_result("list", output=[1, 2, 3]),
        ],
        "b",
    )
    rows = {r["job_id"]: r for r in read_dataset(tmp_path).to_pylist()}
    good = rows["good"]
    assert (good["out_n"], good["out_x"], good["out_b"], good["out_s"]) == (3, 2.0, False, "yes")
    for job_id in ("bad", "huge", "list"):
        row = rows[job_id]
        assert (row["out_n"], row["out_x"], row["out_b"], row["out_s"]) == (None,) * 4, job_id


def test_task_lives_in_the_partition_only_and_plain_hive_reading_works(tmp_path: Path) -> None:
    writer = ParquetDatasetWriter(tmp_path, CLASSIFY_SCHEMA)
    [path] = writer.write([make_result("job-1", output={"label": "billing"})], "b1")

    assert "task" not in pq.read_schema(path).names
    table = ds.dataset(tmp_path, format="parquet", partitioning="hive").to_table()
    assert table.column_names.count("task") == 1
    assert table.column("task").to_pylist() == ["classify"]
    assert table.column("date").to_pylist() == ["2024-03-01"]
    assert table.column("job_id").to_pylist() == ["job-1"]


def test_tasks_with_different_output_columns_read_back_together(tmp_path: Path) -> None:
    summarize_schema = {"type": "object", "properties": {"summary": {"type": "string"}}}
    ParquetDatasetWriter(tmp_path, CLASSIFY_SCHEMA).write(
        [make_result("c1", output={"label": "technical"})], "b1"
    )
    ParquetDatasetWriter(tmp_path, summarize_schema).write(
        [make_result("s1", task="summarize", output={"summary": "short"})], "b1"
    )
    rows = {r["job_id"]: r for r in read_dataset(tmp_path).to_pylist()}
    assert rows["c1"]["task"] == "classify"
    assert rows["c1"]["out_label"] == "technical"
    assert rows["c1"]["out_summary"] is None
    assert rows["s1"]["task"] == "summarize"
    assert rows["s1"]["out_summary"] == "short"
    assert rows["s1"]["out_label"] is None


def test_a_task_name_never_adds_a_directory_level(tmp_path: Path) -> None:
    writer = ParquetDatasetWriter(tmp_path, None)
    [path] = writer.write([make_result("j", task="team/a b", output="x")], "b1")
    assert path.parent.parent.parent == tmp_path
    assert path.parent.parent.name == "task=team%2Fa%20b"
    assert read_dataset(tmp_path).column("task").to_pylist() == ["team/a b"]


def test_results_spanning_two_utc_dates_go_to_two_partitions(tmp_path: Path) -> None:
    writer = ParquetDatasetWriter(tmp_path, None)
    paths = writer.write(
        [
            make_result("late", completed_at_ms=LAST_MS_OF_DAY),
            make_result("early", completed_at_ms=MIDNIGHT_MS),
            make_result("noon", completed_at_ms=NOON_MS),
        ],
        "b1",
    )
    assert paths == [
        tmp_path / "task=classify" / "date=2024-03-01" / "b1.parquet",
        tmp_path / "task=classify" / "date=2024-03-02" / "b1.parquet",
    ]
    by_job = {r["job_id"]: r["date"] for r in read_dataset(tmp_path).to_pylist()}
    assert by_job == {
        "late": date(2024, 3, 1),
        "noon": date(2024, 3, 1),
        "early": date(2024, 3, 2),
    }


def test_writing_the_same_stem_twice_overwrites(tmp_path: Path) -> None:
    writer = ParquetDatasetWriter(tmp_path, CLASSIFY_SCHEMA)
    batch = [make_result("job-1", output={"label": "billing"}), make_result("job-2")]
    first = writer.write(batch, "batch-7")
    replayed = [make_result("job-1", output={"label": "account"}), make_result("job-2")]
    second = writer.write(replayed, "batch-7")

    assert first == second
    assert list(tmp_path.rglob("*.parquet")) == first
    table = read_dataset(tmp_path)
    assert sorted(table.column("job_id").to_pylist()) == ["job-1", "job-2"]
    labels = dict(zip(table["job_id"].to_pylist(), table["out_label"].to_pylist(), strict=True))
    assert labels["job-1"] == "account"
    assert hidden_files(tmp_path) == []


def test_a_failed_write_leaves_neither_a_final_nor_a_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_write_table(self: pq.ParquetWriter, *args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", broken_write_table)
    writer = ParquetDatasetWriter(tmp_path, None)
    with pytest.raises(OSError, match="disk full"):
        writer.write([make_result("job-1")], "b1")

    partition = tmp_path / "task=classify" / "date=2024-03-01"
    assert not (partition / "b1.parquet").exists()
    assert list(partition.iterdir()) == []
    assert existing_job_ids(tmp_path) == set()


def test_a_failed_rename_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = ParquetDatasetWriter(tmp_path, None)
    [path] = writer.write([make_result("old")], "b1")

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        writer.write([make_result("new")], "b1")

    assert list(path.parent.iterdir()) == [path]
    assert existing_job_ids(tmp_path) == {"old"}


def test_the_file_is_synced_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def recording_replace(src: Any, dst: Any) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    partition = tmp_path / "task=classify" / "date=2024-03-01"
    partition.mkdir(parents=True)  # existing directories: only the write's own syncs remain
    ParquetDatasetWriter(tmp_path, None).write([make_result("job-1")], "b1")

    assert events == ["fsync-file", "replace", "fsync-dir"]


def test_row_group_size_is_respected(tmp_path: Path) -> None:
    results = [make_result(f"job-{i:02d}") for i in range(25)]
    [small] = ParquetDatasetWriter(tmp_path / "a", None, row_group_size=10).write(results, "b1")
    [default] = ParquetDatasetWriter(tmp_path / "b", None).write(results, "b1")

    small_file = pq.ParquetFile(small)
    assert small_file.num_row_groups == 3
    assert [small_file.metadata.row_group(i).num_rows for i in range(3)] == [10, 10, 5]
    assert pq.ParquetFile(default).num_row_groups == 1


def test_invalid_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="row_group_size"):
        ParquetDatasetWriter(tmp_path, None, row_group_size=0)
    writer = ParquetDatasetWriter(tmp_path, None)
    for stem in ("", ".hidden", "_hidden", "a/b"):
        with pytest.raises(ValueError, match="file_stem"):
            writer.write([make_result("job-1")], stem)
    assert list(tmp_path.iterdir()) == []


def test_an_empty_batch_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "results"
    assert ParquetDatasetWriter(root, None).write([], "b1") == []
    assert not root.exists()


# --- resuming ------------------------------------------------------------------------------------


def test_existing_job_ids_on_a_missing_root(tmp_path: Path) -> None:
    assert existing_job_ids(tmp_path / "nowhere") == set()


def test_existing_job_ids_of_a_written_dataset_ignore_hidden_files(tmp_path: Path) -> None:
    writer = ParquetDatasetWriter(tmp_path, CLASSIFY_SCHEMA)
    writer.write([make_result("a"), make_result("b", completed_at_ms=MIDNIGHT_MS)], "b1")
    writer.write([make_result("c", task="summarize")], "b2")
    partition = tmp_path / "task=classify" / "date=2024-03-01"
    # Leftovers a crash or another tool could leave: readers skip them, so must the resume.
    stray = pa.table({"job_id": ["ghost"]})
    pq.write_table(stray, partition / ".tmp-b9-0123.parquet")
    pq.write_table(stray, partition / "_partial.parquet")

    assert existing_job_ids(tmp_path) == {"a", "b", "c"}
    assert sorted(read_dataset(tmp_path).column("job_id").to_pylist()) == ["a", "b", "c"]


def test_read_dataset_of_a_missing_root_is_empty(tmp_path: Path) -> None:
    table = read_dataset(tmp_path / "nowhere")
    assert table.num_rows == 0
    assert table.column_names == [*FIXED_NAMES, "date"]


def test_a_temp_file_left_by_a_crash_matches_no_parquet_glob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # kill -9 between the write and the rename leaves the temp file behind; DuckDB and Polars
    # would read it through `**/*.parquet` and count its rows twice.
    temps: list[Path] = []

    def crash_before_rename(source: Any, _target: Any) -> None:
        temps.append(Path(source))
        raise SystemExit("killed")

    monkeypatch.setattr(os, "replace", crash_before_rename)
    with pytest.raises(SystemExit):
        ParquetDatasetWriter(tmp_path, None).write([make_result("j-1")], "part-1")
    (temp,) = temps
    assert not temp.match("*.parquet")
    assert list(tmp_path.rglob("*.parquet")) == []


def test_publish_if_is_asked_once_every_file_is_durable_and_a_no_publishes_nothing(
    tmp_path: Path,
) -> None:
    writer = ParquetDatasetWriter(tmp_path, CLASSIFY_SCHEMA)
    # Two dates: two files, both staged before the question, neither renamed yet.
    results = [make_result("j1"), make_result("j2", completed_at_ms=MIDNIGHT_MS)]
    staged_when_asked: list[str] = []

    def refuse() -> bool:
        staged_when_asked.extend(sorted(p.name[:8] for p in tmp_path.rglob(f"*{TEMP_SUFFIX}")))
        assert list(tmp_path.rglob("*.parquet")) == []
        return False

    with pytest.raises(PublishRefused):
        writer.write(results, "s1", publish_if=refuse)
    assert staged_when_asked == [".tmp-s1-", ".tmp-s1-"]
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # the staged files are gone
    paths = writer.write(results, "s1", publish_if=lambda: True)
    assert [p.parent.name for p in paths] == ["date=2024-03-01", "date=2024-03-02"]
