"""Bulk mode: a whole file of jobs through the same routing, engine loop (admission by adapter,
continuous generation) and validation as the Kafka worker, into a Parquet dataset, without
Kafka. The embedded default for a nightly run on one machine. Rows are read ahead while the
engine runs, and written as they finish.

Resumable: a run has an id (`--run-id`, by default the input file's sha256); job_ids already in
the files of the same run are skipped, and files are written atomically under names unique to
each start, so an interrupted run started again leaves no duplicate and no gap. Another run into
the same dataset (another night's file) skips nothing.
Bad rows become `error` rows with their reason; only a failure of the run itself is an error.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from workers.bulk.jobfiles import read_rows
from workers.core.config import PipelineConfig
from workers.core.contracts import ErrorInfo, Result, ResultStatus, Timings, Usage, adapter_label
from workers.core.errors import JobError, JobRejected
from workers.core.messages import SourceMessage
from workers.core.prepare import PreparedJob, decode_job
from workers.core.processing import Answered
from workers.parquet.dataset import ParquetDatasetWriter
from workers.serving import Serving

log = structlog.get_logger(__name__)

ACCEPT_CHUNK = 64  # rows prepared together (one embedding call for those routed by embedding)
COLLECT_WAIT_S = 0.005


def _field(raw: bytes, name: str) -> str | None:
    try:
        value = json.loads(raw).get(name)
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, str) and value else None


def _run_marker(run_id: str) -> str:
    return f"-run-{run_id}-"


def default_run_id(input_path: Path) -> str:
    """The input file's sha256, shortened: starting the same file again resumes its run, and
    another night's file is a run of its own even when its job_ids repeat."""
    digest = hashlib.sha256()
    with input_path.open("rb") as data:
        while chunk := data.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def job_id_of(raw: bytes, row: int) -> str:
    return _field(raw, "job_id") or f"row-{row}"


def task_of(raw: bytes, default_task: str | None, pipelines: dict[str, PipelineConfig]) -> str:
    """The pipeline a row runs on; `JobRejected` if none."""
    if default_task is not None:
        return default_task
    task = decode_job(raw).task  # rejects rows that are not JSON or not a job
    if task not in pipelines:
        raise JobRejected(JobError.UNKNOWN_TASK, f"no pipeline serves task {task!r}")
    return task


def _message(pipeline: PipelineConfig, row: int, raw: bytes) -> SourceMessage:
    return SourceMessage(
        topic=pipeline.input_topic or "",
        partition=0,
        offset=row,
        key=None,
        value=raw,
        headers=[],
        timestamp_ms=int(time.time() * 1000),
    )


def prepare_rows(
    serving: Serving,
    pipelines: dict[str, PipelineConfig],
    default_task: str | None,
    input_path: Path,
    rows: set[int],
) -> dict[int, PreparedJob]:
    """These rows of the input as `serving`'s engine would get them (the agreement check's
    probes); rows refused before the engine are left out."""
    messages: list[SourceMessage] = []
    for row, raw in enumerate(read_rows(input_path)):
        if row in rows:
            try:
                messages.append(
                    _message(pipelines[task_of(raw, default_task, pipelines)], row, raw)
                )
            except JobRejected:
                continue
    prepared = serving.preparer.prepare_many(messages)
    return {
        message.offset: job
        for message, job in zip(messages, prepared, strict=True)
        if isinstance(job, PreparedJob)
    }


@dataclass(frozen=True)
class BulkOptions:
    """What one bulk run reads, writes and how (`lora-workers bulk` flags)."""

    input_path: Path
    output_dir: Path
    task: str | None = None  # serve every row with this pipeline; None: each row's own task
    rows_per_file: int = 10_000
    row_group_size: int = 10_000
    run_id: str | None = None  # None: the input file's sha256 (`default_run_id`)
    read_ahead: int = 4096  # jobs read and not yet finished, at most


@dataclass(frozen=True)
class RowSelection:
    """The input rows one engine serves, by row number, and how many they are."""

    wanted: Callable[[int], bool]
    total: int


@dataclass
class BulkSummary:
    run_id: str = ""
    rows: int = 0
    skipped: int = 0  # already in the output (resume)
    by_status: Counter[str] = field(default_factory=Counter)
    by_adapter: Counter[str] = field(default_factory=Counter)
    tokens_by_adapter: Counter[str] = field(default_factory=Counter)  # output tokens
    errors: Counter[str] = field(default_factory=Counter)
    # (task, adapter) -> [valid, total] over outputs checked against the task's schema
    compliance: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    output_tokens: int = 0
    files: int = 0
    seconds: float = 0.0

    def add(self, other: BulkSummary) -> None:
        """Count another engine's part of the same run in."""
        self.rows += other.rows
        self.skipped += other.skipped
        self.by_status.update(other.by_status)
        self.by_adapter.update(other.by_adapter)
        self.tokens_by_adapter.update(other.tokens_by_adapter)
        self.errors.update(other.errors)
        for key, (valid, total) in other.compliance.items():
            tally = self.compliance.setdefault(key, [0, 0])
            tally[0] += valid
            tally[1] += total
        self.output_tokens += other.output_tokens
        self.files += other.files


class BulkRunner:
    def __init__(
        self,
        pipelines: dict[str, PipelineConfig],
        serving: Serving,
        options: BulkOptions,
        selection: RowSelection,
    ) -> None:
        """`selection`: the rows this engine serves; rows its run already wrote are left out
        by whoever chose them (`workers.bulk.tiers.survey`)."""
        self._pipelines = pipelines
        self._serving = serving
        self._preparer = serving.preparer
        self._loop = serving.loop
        self._options = options
        self._writers: dict[str, ParquetDatasetWriter] = {}
        # With one pipeline every row is its job; otherwise a row's `task` picks the pipeline.
        self._default_task = options.task
        self.run_id = options.run_id or default_run_id(options.input_path)
        # Each start of the run writes under its own names, so a resumed run never overwrites
        # a file an earlier start finished.
        self._start_id = uuid.uuid4().hex[:6]
        # (input row, result) not yet on disk, per task: each task has its own output columns.
        self._pending: defaultdict[str, list[tuple[int, Result]]] = defaultdict(list)
        self.summary = BulkSummary(run_id=self.run_id)
        self._selection = selection

    def run(self, console: Console | None = None) -> BulkSummary:
        """Serve the selected rows."""
        started = time.monotonic()
        selection = self._selection
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._loop.start()
        try:
            with progress:
                label = self._default_task or ", ".join(sorted(self._pipelines))
                bar = progress.add_task(label, total=selection.total, rate="")
                shown = _Shown(progress, bar, started)
                self._serve(selection.wanted, shown)
                self._write(final=True)
        finally:
            self._loop.stop(timeout_s=30)
        self.summary.seconds = time.monotonic() - started
        return self.summary

    def _serve(self, wanted: Callable[[int], bool], shown: _Shown) -> None:
        """Every wanted row of the input through the engine, until all are finished."""
        chunk: list[tuple[int, bytes]] = []
        rows = (pair for pair in enumerate(read_rows(self._options.input_path)) if wanted(pair[0]))
        for row, raw in rows:
            self.summary.rows += 1
            chunk.append((row, raw))
            if len(chunk) < ACCEPT_CHUNK:
                continue
            shown.advance(self._accept(chunk))
            chunk = []
            # Read ahead while the engine runs, within bounds.
            while self._loop.unfinished() >= self._options.read_ahead:
                shown.advance(self._collect(wait=True))
            shown.advance(self._collect(wait=False))
            shown.show_rate(self.summary)
        shown.advance(self._accept(chunk))
        while self._loop.unfinished():
            shown.advance(self._collect(wait=True))
            shown.show_rate(self.summary)

    def _accept(self, rows: list[tuple[int, bytes]]) -> int:
        """Submit the rows' jobs (inputs routed by embedding embedded together); returns how
        many rows are already finished (error rows)."""
        finished = 0
        messages: list[tuple[str, SourceMessage]] = []
        for row, raw in rows:
            try:
                task = task_of(raw, self._default_task, self._pipelines)
            except JobRejected as rejection:
                # Kept, with its reason, under its own task's partition (or task=unknown).
                task = _field(raw, "task") or "unknown"
                self._keep(row, self._error_result(job_id_of(raw, row), task, rejection))
                finished += 1
                continue
            messages.append((task, _message(self._pipelines[task], row, raw)))
        prepared = self._preparer.prepare_many([message for _, message in messages])
        jobs: list[PreparedJob] = []
        for (task, message), job in zip(messages, prepared, strict=True):
            if isinstance(job, JobRejected):
                job_id = job_id_of(message.value or b"", message.offset)
                self._keep(message.offset, self._error_result(job_id, task, job))
                finished += 1
            else:
                jobs.append(job)
        self._loop.submit(jobs)
        return finished

    def _collect(self, *, wait: bool) -> int:
        """Keep the jobs the engine finished (a row that kills the engine on its own comes out
        as an engine_crash row) and write full files; returns how many."""
        outcomes = self._loop.outcomes()
        if not outcomes and wait:
            time.sleep(COLLECT_WAIT_S)
        for outcome in outcomes:
            job = outcome.job
            if isinstance(outcome, Answered):
                self._keep(job.source.offset, outcome.result)
                self.summary.output_tokens += outcome.result.usage.completion_tokens
            else:
                error = self._error_result(job.job.job_id, job.pipeline.task, outcome.rejection)
                self._keep(job.source.offset, error)
        if outcomes:
            self._write(final=False)
        return len(outcomes)

    def _keep(self, row: int, result: Result) -> None:
        self._pending[result.task].append((row, result))
        self.summary.by_status[result.status.value] += 1
        adapter = adapter_label(
            result.adapter and result.adapter.name, result.adapter and result.adapter.version
        )
        if result.status is not ResultStatus.ERROR:
            self.summary.by_adapter[adapter] += 1
            self.summary.tokens_by_adapter[adapter] += result.usage.completion_tokens
            pipeline = self._pipelines.get(result.task)
            if pipeline is not None and pipeline.output_schema is not None:
                tally = self.summary.compliance.setdefault((result.task, adapter), [0, 0])
                tally[0] += result.status is ResultStatus.OK
                tally[1] += 1
        if result.error is not None:
            self.summary.errors[result.error.code] += 1

    def _write(self, *, final: bool) -> None:
        for task, pending in self._pending.items():
            while len(pending) >= self._options.rows_per_file or (final and pending):
                chunk = sorted(pending[: self._options.rows_per_file], key=lambda item: item[0])
                del pending[: self._options.rows_per_file]
                rows = f"{chunk[0][0]:09d}-{chunk[-1][0]:09d}"
                stem = f"part-{rows}{_run_marker(self.run_id)}{self._start_id}"
                written = self._writer_for(task).write([r for _, r in chunk], stem)
                self.summary.files += len(written)

    def _writer_for(self, task: str) -> ParquetDatasetWriter:
        if task not in self._writers:
            pipeline = self._pipelines.get(task)
            schema = pipeline.output_schema if pipeline else None
            self._writers[task] = ParquetDatasetWriter(
                self._options.output_dir, schema, row_group_size=self._options.row_group_size
            )
        return self._writers[task]

    def _error_result(self, job_id: str, task: str, rejection: JobRejected) -> Result:
        now = int(time.time() * 1000)
        return Result(
            job_id=job_id,
            task=task,
            status=ResultStatus.ERROR,
            output=None,
            raw_output="",
            adapter=None,
            usage=Usage(prompt_tokens=0, completion_tokens=0),
            error=ErrorInfo(code=rejection.code, message=rejection.message),
            timings=Timings(
                enqueued_at_ms=now,
                received_at_ms=now,
                completed_at_ms=now,
                queue_ms=0,
                generate_ms=0,
            ),
        )


@dataclass
class _Shown:
    """The progress bar of one engine's part of the run."""

    progress: Progress
    bar: object
    started: float

    def advance(self, rows: int = 1) -> None:
        if rows:
            self.progress.advance(self.bar, rows)  # type: ignore[arg-type]

    def show_rate(self, summary: BulkSummary) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        done = sum(summary.by_status.values())
        rate = f"{done / elapsed:,.1f} jobs/s  {summary.output_tokens / elapsed:,.0f} tok/s"
        self.progress.update(self.bar, rate=rate)  # type: ignore[arg-type]


def print_summary(summary: BulkSummary, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="Bulk run")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("run id", summary.run_id)
    table.add_row("input rows", f"{summary.rows:,}")
    table.add_row("skipped (already written)", f"{summary.skipped:,}")
    for status, count in sorted(summary.by_status.items()):
        table.add_row(f"status {status}", f"{count:,}")
    for adapter, count in sorted(summary.by_adapter.items()):
        table.add_row(f"adapter {adapter}", f"{count:,}")
    for code, count in sorted(summary.errors.items()):
        table.add_row(f"reason {code}", f"{count:,}")
    for (task, adapter), (valid, total) in sorted(summary.compliance.items()):
        table.add_row(f"schema-valid {task} / {adapter}", f"{valid / total:.1%} ({valid}/{total})")
    table.add_row("output tokens", f"{summary.output_tokens:,}")
    table.add_row("files written", f"{summary.files:,}")
    table.add_row("time", f"{summary.seconds:,.1f} s")
    served = sum(summary.by_status.values())
    seconds = max(summary.seconds, 1e-6)
    table.add_row(
        "throughput",
        f"{served / seconds:,.1f} jobs/s, {summary.output_tokens / seconds:,.0f} tok/s",
    )
    console.print(table)
