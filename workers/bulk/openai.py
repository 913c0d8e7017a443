"""OpenAI batch files (`lora-workers bulk --format openai`): each line of an OpenAI Batch API
input file becomes a project job, served by the ordinary bulk run, and each comes back as an
OpenAI batch output line.

The lines run on built-in pipelines (no pipeline files needed): `openai-chat` renders a
`/v1/chat/completions` line's messages with the model's chat template, `openai-completions`
sends a `/v1/completions` prompt as it is. A `response_format` JSON schema gets a pipeline of
its own (the same rendering, that schema as its output schema), so generation is constrained to
it and the answer validated. `body.model` picks the adapter (a catalog name) or the base model;
there is no other routing.

Resume: the jobs go through a Parquet staging dataset (`OUT.parts/`) with the bulk run's
resume and run lock; the JSONL output is rebuilt from it, one line per input line, and renamed
into place in one step. A run killed midway leaves no output file; started again it serves only
what the staging dataset lacks, and each `custom_id` is written once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.bulk.jobfiles import numbered_lines
from workers.bulk.plan import MergeMode
from workers.bulk.runner import BulkOptions, _run_marker, default_run_id
from workers.bulk.tiers import TieredBulkRun, TieredSummary
from workers.core.config import ConfigError, PipelineConfig, Settings, load_catalog
from workers.core.config.pipelines import ChatRendering, SamplingDefaults
from workers.core.contracts import AdapterStatus, Job, validation_details
from workers.parquet.dataset import data_files

log = structlog.get_logger(__name__)

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
CHAT_TASK = "openai-chat"
COMPLETIONS_TASK = "openai-completions"
TASK_OF_URL = {CHAT_URL: CHAT_TASK, COMPLETIONS_URL: COMPLETIONS_TASK}
# OpenAI's own default temperature; max_tokens keeps the pipelines' default (64) when not given.
OPENAI_SAMPLING = SamplingDefaults(temperature=1.0)
_RESULT_COLUMNS = [
    "job_id",
    "status",
    "raw_output",
    "prompt_tokens",
    "completion_tokens",
    "error_code",
    "error_message",
    "completed_at",
]


class LineError(Exception):
    """Why one input line cannot be served; it becomes that line's error line."""

    def __init__(self, code: str, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.custom_id = custom_id


class _Lenient(BaseModel):
    # OpenAI's fields this project does not use (n, logprobs, user, ...) are ignored, not refused.
    model_config = ConfigDict(extra="ignore", frozen=True)


class JsonSchemaFormat(_Lenient):
    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class RequestBody(_Lenient):
    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    min_tokens: int | None = None  # vLLM's extension, which `vllm run_batch` takes too
    response_format: ResponseFormat | None = None


class BatchLine(_Lenient):
    custom_id: str = Field(min_length=1)
    method: Literal["POST"] = "POST"
    url: str
    body: RequestBody


@dataclass(frozen=True)
class Mapped:
    """One servable line: its job (task named) and what its output line repeats."""

    custom_id: str
    url: str
    model: str
    job: Job
    schema: dict[str, Any] | None


def schema_task(base_task: str, schema: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()[:12]
    return f"{base_task}-schema-{digest}"


def map_line(raw: bytes, adapters: set[str], base_model: str) -> Mapped:
    """One input line as a project job; `LineError` says why it cannot be one."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise LineError("invalid_json", f"not JSON: {exc}") from None
    custom_id = data.get("custom_id") if isinstance(data, dict) else None
    custom_id = custom_id if isinstance(custom_id, str) else None
    try:
        line = BatchLine.model_validate(data)
    except ValidationError as exc:
        raise LineError("invalid_request", validation_details(exc), custom_id) from None
    body = line.body
    task = TASK_OF_URL.get(line.url)
    if task is None:
        raise LineError(
            "unknown_url", f"url {line.url!r}: expected {CHAT_URL} or {COMPLETIONS_URL}", custom_id
        )
    if body.model != base_model and body.model not in adapters:
        raise LineError(
            "unknown_model",
            f"model {body.model!r} is neither the base model {base_model!r} nor an adapter "
            "of the catalog",
            custom_id,
        )
    job: dict[str, Any] = {"job_id": line.custom_id, "task": task}
    if line.url == CHAT_URL:
        if body.messages is None:
            raise LineError("invalid_request", f"{CHAT_URL} needs body.messages", custom_id)
        job["messages"] = body.messages
    else:
        if body.prompt is None:
            raise LineError("invalid_request", f"{COMPLETIONS_URL} needs body.prompt", custom_id)
        job["input"] = body.prompt
    if body.model != base_model:
        job["adapter"] = body.model
    params = {
        "max_tokens": body.max_completion_tokens or body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stop": [body.stop] if isinstance(body.stop, str) else body.stop,
        "seed": body.seed,
        "min_tokens": body.min_tokens,
    }
    params = {name: value for name, value in params.items() if value is not None}
    if params:
        job["params"] = params
    schema = None
    if body.response_format is not None and body.response_format.type == "json_schema":
        if body.response_format.json_schema is None:
            raise LineError(
                "invalid_request", "response_format json_schema needs its json_schema", custom_id
            )
        schema = body.response_format.json_schema.schema_
        job["task"] = schema_task(task, schema)
    try:
        return Mapped(line.custom_id, line.url, body.model, Job.model_validate(job), schema)
    except ValidationError as exc:
        raise LineError("invalid_job", validation_details(exc), custom_id) from None


@dataclass(frozen=True)
class BatchPlan:
    """Every input line in order: its job, or why it has none."""

    lines: list[Mapped | LineError]

    @property
    def jobs(self) -> list[Mapped]:
        return [line for line in self.lines if isinstance(line, Mapped)]


def plan_lines(lines: Iterable[bytes], adapters: set[str], base_model: str) -> BatchPlan:
    """Each line mapped; a `custom_id` seen before gets an error line (the first one runs)."""
    seen: set[str] = set()
    planned: list[Mapped | LineError] = []
    for raw in lines:
        try:
            mapped = map_line(raw, adapters, base_model)
        except LineError as error:
            planned.append(error)
            continue
        if mapped.custom_id in seen:
            planned.append(
                LineError(
                    "duplicate_custom_id",
                    f"custom_id {mapped.custom_id!r} is used by an earlier line",
                    mapped.custom_id,
                )
            )
            continue
        seen.add(mapped.custom_id)
        planned.append(mapped)
    return BatchPlan(planned)


def pipelines_for(jobs: Sequence[Mapped]) -> dict[str, PipelineConfig]:
    """The built-in pipelines, and one per distinct response_format schema."""
    chat = PipelineConfig(task=CHAT_TASK, chat=ChatRendering(), sampling=OPENAI_SAMPLING)
    completions = PipelineConfig(
        task=COMPLETIONS_TASK, prompt_template="{input}", sampling=OPENAI_SAMPLING
    )
    pipelines = {CHAT_TASK: chat, COMPLETIONS_TASK: completions}
    for job in jobs:
        if job.schema is not None and job.job.task not in pipelines:
            base = pipelines[TASK_OF_URL[job.url]]
            pipelines[job.job.task] = base.model_copy(
                update={
                    "task": job.job.task,
                    "input_topic": f"jobs.{job.job.task}",
                    "result_topic": f"results.{job.job.task}",
                    "output_schema": job.schema,
                }
            )
    return pipelines


def _stable_id(prefix: str, *parts: str) -> str:
    # The same run writes the same ids on every start.
    return prefix + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def error_line(error: LineError, line_id: str) -> dict[str, Any]:
    return {
        "id": line_id,
        "custom_id": error.custom_id,
        "response": None,
        "error": {"code": error.code, "message": error.message},
    }


def output_line(job: Mapped, row: dict[str, Any], run_id: str) -> dict[str, Any]:
    """A served job's OpenAI batch output line; an error or invalid output is an error line."""
    if row["status"] != "ok":
        code = row["error_code"] or row["status"]
        message = row["error_message"] or f"the output is {row['status']}"
        return error_line(
            LineError(code, message, job.custom_id), _stable_id("batch_req_", run_id, job.custom_id)
        )
    text: str = row["raw_output"]
    completion = int(row["completion_tokens"])
    max_tokens = job.job.params.max_tokens if job.job.params else None
    # The result has no finish reason: a generation that used its whole budget was cut short.
    finish = "length" if max_tokens is not None and completion >= max_tokens else "stop"
    if job.url == CHAT_URL:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
        }
        obj, prefix = "chat.completion", "chatcmpl-"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        obj, prefix = "text_completion", "cmpl-"
    prompt = int(row["prompt_tokens"])
    return {
        "id": _stable_id("batch_req_", run_id, job.custom_id),
        "custom_id": job.custom_id,
        "response": {
            "status_code": 200,
            "request_id": _stable_id("req-", run_id, job.custom_id),
            "body": {
                "id": _stable_id(prefix, run_id, job.custom_id),
                "object": obj,
                "created": int(row["completed_at"].timestamp()),
                "model": job.model,
                "choices": [choice],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            },
        },
        "error": None,
    }


def output_lines(plan: BatchPlan, rows: dict[str, dict[str, Any]], run_id: str) -> list[str]:
    """One JSON line per input line, in input order."""
    lines: list[dict[str, Any]] = []
    for number, line in enumerate(plan.lines, start=1):
        if isinstance(line, LineError):
            lines.append(error_line(line, _stable_id("batch_req_", run_id, f"line {number}")))
        elif line.custom_id in rows:
            lines.append(output_line(line, rows[line.custom_id], run_id))
        else:  # only after a failed run; the caller checks
            raise ConfigError(f"custom_id {line.custom_id!r} has no result in the staging dataset")
    return [json.dumps(line, ensure_ascii=False) for line in lines]


def read_results(root: Path, run_id: str) -> dict[str, dict[str, Any]]:
    """The rows of run `run_id` in the staging dataset, by job_id (= custom_id); another
    input file's run into the same place may reuse its custom_ids."""
    rows: dict[str, dict[str, Any]] = {}
    if not root.is_dir():
        return rows
    for path in data_files(root):
        if _run_marker(run_id) not in path.name:
            continue
        for row in pq.read_table(path, columns=_RESULT_COLUMNS).to_pylist():
            rows[row["job_id"]] = row
    return rows


def write_atomically(path: Path, lines: Sequence[str]) -> None:
    """The whole file or nothing: a reader (or a killed run) never sees a partial output."""
    temporary = path.with_name(f".{path.name}.partial")
    with temporary.open("w", encoding="utf-8") as out:
        for line in lines:
            out.write(line + "\n")
        out.flush()
        os.fsync(out.fileno())
    temporary.replace(path)


def staging_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def is_jsonl_output(output: Path) -> bool:
    """`--output x.jsonl`: OpenAI batch output; anything else: a Parquet dataset directory."""
    return output.suffix == ".jsonl"


@dataclass
class OpenAIBatchRun:
    """One OpenAI batch file through the bulk run; `run()` serves it and writes the output."""

    settings: Settings
    input_path: Path
    output: Path
    mode: MergeMode
    run_id: str | None = None
    rows_per_file: int = 10_000
    row_group_size: int = 10_000

    def __post_init__(self) -> None:
        if not self.input_path.is_file():
            raise ConfigError(f"input {self.input_path} is not a file")
        catalog = load_catalog(self.settings.catalog)
        self._catalog = catalog
        self.run_id = self.run_id or default_run_id(self.input_path)
        with self.input_path.open("rb") as lines:
            self.plan = plan_lines(
                (raw for _, raw in numbered_lines(lines)),
                set(catalog.by_name),
                catalog.base_model,
            )
        jsonl = is_jsonl_output(self.output)
        self._parquet_dir = staging_dir(self.output) if jsonl else self.output
        self._jsonl = self.output if jsonl else None

    def bulk(self, jobs_dir: Path | None = None) -> TieredBulkRun:
        """The bulk run of the file's jobs, written as a job file into `jobs_dir` (default:
        beside the staging dataset, under a name its readers skip)."""
        assert self.run_id is not None
        if jobs_dir is None:
            self._parquet_dir.mkdir(parents=True, exist_ok=True)
            jobs_dir = self._parquet_dir
        jobs_path = jobs_dir / f"_jobs-{self.run_id}.jsonl"
        write_atomically(
            jobs_path, [m.job.model_dump_json(exclude_none=True) for m in self.plan.jobs]
        )
        options = BulkOptions(
            jobs_path,
            self._parquet_dir,
            None,
            self.rows_per_file,
            self.row_group_size,
            self.run_id,
        )

        def log_status(status: AdapterStatus) -> None:
            log.info("adapter_status", **status.model_dump(mode="json"))

        pipelines = pipelines_for(self.plan.jobs)
        return TieredBulkRun(
            self.settings, pipelines, self._catalog, options, self.mode, log_status
        )

    def run(self) -> TieredSummary | None:
        """Serve the jobs (none: no engine start), then write the JSONL output if asked."""
        assert self.run_id is not None
        summary = self.bulk().run() if self.plan.jobs else None
        if self._jsonl is not None:
            rows = read_results(self._parquet_dir, self.run_id)
            write_atomically(self._jsonl, output_lines(self.plan, rows, self.run_id))
        return summary
