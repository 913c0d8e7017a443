"""Prometheus metrics, all named in one place (`lora-workers run --metrics-port` serves them)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

MESSAGES_CONSUMED = Counter(
    "lora_workers_messages_consumed_total", "Messages read from input topics.", ["topic"]
)
RESULTS = Counter(
    "lora_workers_results_total",
    "Results acknowledged by the broker.",
    ["task", "status", "adapter"],
)
DEAD_LETTERS = Counter(
    "lora_workers_dead_letters_total",
    "Messages sent to a dead-letter topic, by reason.",
    ["task", "code"],
)
OUTPUT_TOKENS = Counter(
    "lora_workers_output_tokens_total", "Generated tokens.", ["task", "adapter"]
)
BATCH_JOBS = Histogram(
    "lora_workers_batch_jobs",
    "Jobs per engine call.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
BATCH_ADAPTERS = Histogram(
    "lora_workers_batch_adapters",
    "Distinct adapters (base model counted as one) per engine call.",
    buckets=(1, 2, 3, 4, 6, 8, 16, 32),
)
GENERATE_SECONDS = Histogram(
    "lora_workers_generate_seconds",
    "Wall time of one engine call.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)


ADAPTER_LOAD_SECONDS = Histogram(
    "lora_workers_adapter_load_seconds",
    "Time to validate-load one adapter version into the engine (add_lora).",
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
    "Adapter cache events per batch and adapter: hit, miss (loaded before generate), eviction.",
    ["event"],
)
SCHEMA_COMPLIANCE = Counter(
    "lora_workers_schema_outputs_total",
    "Final outputs of tasks with an output schema, valid or not, by task and adapter.",
    ["task", "adapter", "valid"],
)
ENGINE_RESTARTS = Counter(
    "lora_workers_engine_restarts_total", "Engine restarts after the engine died mid-batch."
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
