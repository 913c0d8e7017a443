"""Job files: JSONL (one job per line) or Parquet (one job per row), as JSON bytes per job."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from workers.core.config import ConfigError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def read_rows(path: Path) -> Iterator[bytes]:
    """Each job as JSON bytes: JSONL lines as they are, Parquet rows converted (nulls dropped)."""
    if path.suffix == ".parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                job = {k: v for k, v in row.items() if v is not None}
                # Parquet may hold types JSON lacks (timestamps, decimals): send them as text.
                yield json.dumps(job, default=str).encode()
    elif path.suffix in JSONL_SUFFIXES:
        with path.open("rb") as lines:
            for line in lines:
                if line.strip():
                    yield line.rstrip(b"\n")
    else:
        raise ConfigError(f"{path}: expected a .jsonl or .parquet file")


def count_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with path.open("rb") as lines:
        return sum(1 for line in lines if line.strip())
