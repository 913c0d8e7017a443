"""Results of Kafka jobs into a Parquet dataset, exactly once through crashes.

Each file holds a contiguous run of one partition's offsets and is named after its first
offset (`<topic>-p<partition>-<offset>`), dated by the jobs' Kafka timestamps, and the worker
commits right after each file. So after a crash the replay starts at the first offset of the
only file that can be uncommitted, rebuilds a file with the same name and overwrites it: no
duplicate and no missing row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from workers.core.config import PipelineConfig
from workers.core.contracts import Result
from workers.core.offsets import TopicPartitionKey
from workers.parquet.dataset import ParquetDatasetWriter

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class _Waiting:
    result: Result
    added_at: float


class ParquetResults:
    def __init__(self, pipelines: dict[str, PipelineConfig]) -> None:
        self._pipelines = {
            p.input_topic: p for p in pipelines.values() if "parquet" in p.sinks and p.parquet
        }
        self._writers = {
            topic: ParquetDatasetWriter(
                p.parquet.path,
                p.output_schema,
                row_group_size=p.parquet.row_group_size,
                date_from="enqueued_at",
            )
            for topic, p in self._pipelines.items()
            if p.parquet is not None
        }
        self._waiting: dict[TopicPartitionKey, dict[int, _Waiting]] = {}
        # The last file's commit failed: no further file until a commit succeeds, else a crash
        # would leave two uncommitted files, and the replay would cut its rows differently.
        self._uncommitted = False

    def add(self, topic: str, partition: int, offset: int, result: Result) -> None:
        rows = self._waiting.setdefault((topic, partition), {})
        rows[offset] = _Waiting(result, time.monotonic())

    def flush(
        self,
        first_unfinished_outside: Callable[[TopicPartitionKey, set[int]], int | None],
        on_written: Callable[[TopicPartitionKey, list[int]], None],
        commit: Callable[[], bool],
        *,
        force: bool = False,
        only: set[TopicPartitionKey] | None = None,
    ) -> None:
        """Write every due file. A file takes waiting rows below the partition's first offset
        that is neither waiting here nor finished, so files never skip an offset. After each
        durable file, `on_written` marks its rows done and `commit` commits them; no next file
        is written until a commit has succeeded."""
        if self._uncommitted:
            if not commit():
                return
            self._uncommitted = False
        now = time.monotonic()
        for key, rows in self._waiting.items():
            if only is not None and key not in only:
                continue
            pipeline = self._pipelines[key[0]]
            assert pipeline.parquet is not None
            config = pipeline.parquet
            while rows:
                limit = first_unfinished_outside(key, set(rows))
                ready = sorted(o for o in rows if limit is None or o < limit)
                if not ready:
                    break
                oldest = min(rows[o].added_at for o in ready)
                due = len(ready) >= config.rows_per_file
                due = due or (now - oldest) * 1000 >= config.max_file_age_ms
                if not (due or force):
                    break
                chunk = ready[: config.rows_per_file]
                self._write(key, pipeline, [rows[o].result for o in chunk], chunk[0])
                for offset in chunk:
                    del rows[offset]
                on_written(key, chunk)
                if not commit():
                    self._uncommitted = True
                    return

    def _write(
        self, key: TopicPartitionKey, pipeline: PipelineConfig, results: list[Result], first: int
    ) -> None:
        topic, partition = key
        stem = f"{topic}-p{partition:04d}-{first:012d}"
        writer = self._writers[topic]
        writer.remove_stem(pipeline.task, stem)
        writer.write(results, stem)
        log.info("parquet_file_written", file=stem, rows=len(results))

    def forget(self, keys: set[TopicPartitionKey]) -> None:
        for key in keys:
            self._waiting.pop(key, None)
