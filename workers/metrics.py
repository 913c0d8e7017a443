"""Prometheus metrics, all named in one place (`lora-workers run --metrics-port` serves them,
with `/healthz` and `/readyz`; `ops/prometheus/alerts.yml` and `ops/grafana/dashboard.json`
use them).

Per-job series are labelled by task, adapter name and version: `adapter="base", version=""`
for the base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from workers.core.contracts import BASE_MODEL_LABEL, Result

JOB_LABELS = ["task", "adapter", "version"]
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 1.5, 2.5, 5, 10, 30, 60, 120, 300)

MESSAGES_CONSUMED = Counter(
    "lora_workers_messages_consumed_total", "Messages read from input topics.", ["topic"]
)
RESULTS = Counter(
    "lora_workers_results_total",
    "Results written (acknowledged, or committed with their offsets), by status.",
    [*JOB_LABELS, "status"],
)
DEAD_LETTERS = Counter(
    "lora_workers_dead_letters_total",
    "Messages sent to a dead-letter topic, by reason.",
    ["task", "code"],
)
PROMPT_TOKENS = Counter("lora_workers_prompt_tokens_total", "Prompt tokens of results.", JOB_LABELS)
OUTPUT_TOKENS = Counter("lora_workers_output_tokens_total", "Generated tokens.", JOB_LABELS)
JOB_LATENCY_SECONDS = Histogram(
    "lora_workers_job_latency_seconds",
    "From the job's Kafka timestamp to its result being written (exactly-once: held for the "
    "transaction that commits it within commit_interval_ms).",
    JOB_LABELS,
    buckets=LATENCY_BUCKETS,
)
QUEUE_SECONDS = Histogram(
    "lora_workers_queue_seconds",
    "From consuming a job to handing it to the engine.",
    JOB_LABELS,
    buckets=LATENCY_BUCKETS,
)
JOB_GENERATE_SECONDS = Histogram(
    "lora_workers_job_generate_seconds",
    "From the job entering the engine to its request finishing.",
    JOB_LABELS,
    buckets=LATENCY_BUCKETS,
)
ENGINE_STEP_SECONDS = Histogram(
    "lora_workers_engine_step_seconds",
    "Wall time of one engine step (every unfinished request advanced by one token).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
ENGINE_REQUESTS = Gauge(
    "lora_workers_engine_requests", "Requests in the engine (added, not finished)."
)
ENGINE_DEPTH = Gauge(
    "lora_workers_engine_depth",
    "Requests the engine loop keeps in the engine now: admission.engine_depth, or less while a "
    "quiet tenant's jobs share the engine with a backlog (docs/configuration.md).",
)
ADMISSION_WAITING = Gauge(
    "lora_workers_admission_waiting", "Jobs prepared and waiting to enter the engine."
)
ADAPTER_LOAD_SECONDS = Histogram(
    "lora_workers_adapter_load_seconds",
    "Time to load one adapter version into the engine (add_lora), by adapter name.",
    ["adapter"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
ADAPTER_REJECTIONS = Counter(
    "lora_workers_adapter_rejections_total", "Adapter versions refused, by reason.", ["code"]
)
ADAPTER_UNLOADS = Counter(
    "lora_workers_adapter_unloads_total", "Adapter versions removed from the engine after draining."
)
ADAPTER_CACHE = Counter(
    "lora_workers_adapter_cache_total",
    "Adapter cache events per admission round and adapter: hit, miss (loaded before its jobs "
    "enter the engine), eviction.",
    ["adapter", "event"],
)
ADAPTERS_RESIDENT = Gauge(
    "lora_workers_adapters_resident", "Adapter versions in the engine's host cache."
)
SCHEMA_COMPLIANCE = Counter(
    "lora_workers_schema_outputs_total",
    "Final outputs of tasks with an output schema, valid or not, by task and adapter.",
    [*JOB_LABELS, "valid"],
)
ENGINE_RESTARTS = Counter(
    "lora_workers_engine_restarts_total", "Engine restarts after the engine died."
)
ENGINE_STANDBY = Gauge(
    "lora_workers_engine_standby",
    "1 while a standby engine is started and idle, ready to take over after an engine death.",
)
TIER_SWITCHES = Counter(
    "lora_workers_tier_switches_total",
    "In-place tier switches of the engine: an adapter merged into the base weights, or unmerged.",
    ["direction"],
)
TIER_SWITCH_SECONDS = Histogram(
    "lora_workers_tier_switch_seconds",
    "Wall time of one in-place tier switch (merge or unmerge, prefix cache reset included).",
    ["direction"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
MERGE_CHECKS = Counter(
    "lora_workers_merge_checks_total",
    "Agreement checks of an adapter version before its first merged turn in a live stream: "
    "passed (it may be merged), or refused (it stays on LoRA).",
    ["verdict"],
)
TRANSACTIONS = Counter(
    "lora_workers_transactions_total",
    "Exactly-once commits (answers plus offsets), by outcome.",
    ["outcome"],
)
UNDELIVERABLE = Counter(
    "lora_workers_undeliverable_total",
    "Answers that could not be written and were replaced by a minimal undeliverable dead letter.",
)
CONSUMER_LAG = Gauge(
    "lora_workers_consumer_lag",
    "Messages in an assigned input partition after this worker's position.",
    ["topic", "partition"],
)
ROUTES = Counter(
    "lora_workers_routes_total",
    "Results by how their adapter was chosen (job, tenant, classifier, embedding, task) and "
    "whether a classifier or embedding route fell back.",
    ["task", "by", "adapter", "fallback"],
)
EMBEDDING_SECONDS = Histogram(
    "lora_workers_embedding_seconds",
    "Wall time of embedding one consumed batch of inputs for embedding routing.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
SHADOW_EVALUATIONS = Counter(
    "lora_workers_shadow_evaluations_total",
    "Jobs also run on a shadow version, by whether its text and parsed output were identical.",
    ["adapter", "version", "identical_text", "identical_output"],
)
SHADOW_SUMMARY = Gauge(
    "lora_workers_shadow_summary",
    "Rolling comparison of a shadow version with the serving one (shadow.summary_window jobs): "
    "identical_text, identical_output, serving_valid, shadow_valid as shares; tokens and "
    "latency_ms means per side.",
    ["adapter", "version", "measure"],
)
SHADOW_SKIPPED = Counter(
    "lora_workers_shadow_skipped_total",
    "Shadow runs skipped because shadow.max_waiting were already waiting.",
    ["task"],
)
SHADOW_FAILED = Counter(
    "lora_workers_shadow_failed_total", "Shadow runs that failed (no evaluation).", ["task"]
)
READY = Gauge("lora_workers_ready", "1 once the engine, the adapters and the assignment are up.")


def job_labels(task: str, adapter_name: str | None, version: str | None) -> tuple[str, str, str]:
    if adapter_name is None:
        return (task, BASE_MODEL_LABEL, "")
    return (task, adapter_name, version or "")


def result_labels(result: Result) -> tuple[str, str, str]:
    adapter = result.adapter
    return job_labels(result.task, adapter and adapter.name, adapter and adapter.version)


@dataclass(frozen=True)
class _ResultSeries:
    prompt_tokens: Any
    output_tokens: Any
    queue: Any
    generate: Any
    latency: Any


@lru_cache(maxsize=4096)
def _result_series(labels: tuple[str, str, str]) -> _ResultSeries:
    """A result's per-job series, looked up once per label set (`.labels()` costs about
    1.5 µs, seven times a job). Safe while none of these metrics has a child removed."""
    return _ResultSeries(
        PROMPT_TOKENS.labels(*labels),
        OUTPUT_TOKENS.labels(*labels),
        QUEUE_SECONDS.labels(*labels),
        JOB_GENERATE_SECONDS.labels(*labels),
        JOB_LATENCY_SECONDS.labels(*labels),
    )


@lru_cache(maxsize=4096)
def _results_counter(labels: tuple[str, str, str], status: str) -> Any:
    return RESULTS.labels(*labels, status)


def record_result(result: Result, finished_at_ms: int) -> None:
    """The per-job series of one written result."""
    labels = result_labels(result)
    _results_counter(labels, result.status.value).inc()
    series = _result_series(labels)
    series.prompt_tokens.inc(result.usage.prompt_tokens)
    series.output_tokens.inc(result.usage.completion_tokens)
    timings = result.timings
    series.queue.observe(timings.queue_ms / 1000)
    series.generate.observe(timings.generate_ms / 1000)
    series.latency.observe(max(0, finished_at_ms - timings.enqueued_at_ms) / 1000)
    if result.route is not None:
        route = result.route
        adapter = route.adapter or BASE_MODEL_LABEL
        ROUTES.labels(result.task, route.by.value, adapter, str(route.fallback).lower()).inc()
