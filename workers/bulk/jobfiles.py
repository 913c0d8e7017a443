"""Job files: JSONL (one job per line) or Parquet (one job per row), as JSON bytes per job."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.parquet as pq

from workers.core.config import ConfigError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def read_rows(path: Path) -> Iterator[bytes]:
    """Each job as JSON bytes: JSONL lines as they are, Parquet rows converted (nulls dropped)."""
    for _, row in numbered_rows(path):
        yield row


def numbered_rows(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line or row number from 1, job bytes); blank JSONL lines are skipped."""
    if path.suffix == ".parquet":
        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                job = {k: v for k, v in row.items() if v is not None}
                # Parquet may hold types JSON lacks (timestamps, decimals): send them as text.
                yield number, json.dumps(job, default=str).encode()
    elif path.suffix in JSONL_SUFFIXES:
        with path.open("rb") as lines:
            yield from numbered_lines(lines)
    else:
        raise ConfigError(f"{path}: expected a .jsonl or .parquet file")


def numbered_lines(lines: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    for number, line in enumerate(lines, start=1):
        if line.strip():
            yield number, line.rstrip(b"\r\n")


def count_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with path.open("rb") as lines:
        return sum(1 for line in lines if line.strip())
