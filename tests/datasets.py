"""Reads a results dataset back whole, as analysts' tools would (pyarrow.dataset, hive
partitioning), for the tests' checks."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from workers.parquet.dataset import PARTITION_DATE, PARTITION_TASK, arrow_schema_for, data_files


def _partitioning() -> ds.Partitioning:
    # Explicit types: inference would turn a task named "123" into an int32 column.
    return ds.partitioning(
        pa.schema([(PARTITION_TASK, pa.string()), (PARTITION_DATE, pa.date32())]),
        flavor="hive",
    )


def read_dataset(root: Path) -> pa.Table:
    """The whole dataset with partition columns `task` and `date` (pyarrow.dataset, hive
    partitioning); only for tests and reports."""
    root = Path(root)
    files = data_files(root) if root.is_dir() else []
    partitioning = _partitioning()
    if not files:
        return arrow_schema_for(None).append(pa.field(PARTITION_DATE, pa.date32())).empty_table()
    # Files of different tasks carry different out_ columns; pyarrow would otherwise take the
    # first file's schema and drop the others' columns.
    schema = pa.unify_schemas([pq.read_schema(path) for path in files] + [partitioning.schema])
    # The explicit file list keeps this reader and existing_job_ids on exactly the same files.
    dataset = ds.dataset(
        [str(path) for path in files],
        format="parquet",
        partitioning=partitioning,
        partition_base_dir=str(root),
        schema=schema,
    )
    table = dataset.to_table()
    # Same column order as arrow_schema_for: task right after job_id, then date last.
    rest = [n for n in table.column_names if n not in ("job_id", PARTITION_TASK, PARTITION_DATE)]
    return table.select(["job_id", PARTITION_TASK, *rest, PARTITION_DATE])
