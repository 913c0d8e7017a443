"""Assembles a worker from settings: pipelines, catalog, engine, adapters, source, sink."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from prometheus_client import start_http_server

from workers.adapters.cache import AdapterCache
from workers.adapters.feed import AdapterUpdateFeed
from workers.adapters.registry import AdapterRegistry
from workers.bulk.runner import BulkRunner, BulkSummary
from workers.core.batching import AdapterBatcher
from workers.core.config import (
    AdapterCatalog,
    ConfigError,
    PipelineConfig,
    Settings,
    load_catalog,
    load_pipelines,
)
from workers.core.contracts import AdapterStatus
from workers.core.prepare import JobPreparer, PreparedJob
from workers.core.processing import BatchProcessor
from workers.engine.vllm_engine import VllmEngine
from workers.kafka.sinks import AtLeastOnceSink, ResultSink
from workers.kafka.source import KafkaJobSource
from workers.kafka.status import AdapterStatusWriter
from workers.kafka.transactions import ExactlyOnceSink
from workers.worker import RunLimits, RunSummary, Worker

log = structlog.get_logger(__name__)


def check_routing(pipelines: dict[str, PipelineConfig], known_adapters: set[str]) -> None:
    """Fail at start-up, not per job, when a pipeline routes to an adapter nobody announced."""
    for pipeline in pipelines.values():
        names = {pipeline.routing.adapter, *pipeline.routing.tenants.values()} - {None}
        missing = sorted(n for n in names if n not in known_adapters)
        if missing:
            raise ConfigError(f"pipeline {pipeline.task!r} routes to unknown adapters {missing}")


def prewarm(engine: VllmEngine, registry: AdapterRegistry, names: list[str]) -> None:
    served = registry.served()
    unknown = sorted(set(names) - set(served))
    if unknown:
        raise ConfigError(f"adapters.prewarm names adapters nobody serves: {unknown}")
    handles = [route.handle for name in names for route in served[name].routes]
    AdapterCache(engine).prewarm(handles, engine.tokenize("warm-up"))


@dataclass(frozen=True)
class Serving:
    """The engine and everything around it that the Kafka worker and bulk mode share."""

    engine: VllmEngine
    registry: AdapterRegistry
    cache: AdapterCache
    preparer: JobPreparer
    batcher: AdapterBatcher[PreparedJob]

    def restart_engine(self) -> None:
        self.engine.restart()
        self.cache.refresh()


def start_serving(
    settings: Settings,
    pipelines: dict[str, PipelineConfig],
    catalog: AdapterCatalog,
    on_status: Callable[[AdapterStatus], None],
    updates: AdapterUpdateFeed | None = None,
) -> Serving:
    """Start the engine, register the catalog (then the update topic, if any) and check that
    every pipeline routes to an adapter that exists. The caller closes `serving.engine`."""
    engine = VllmEngine(settings.engine)
    try:
        registry = AdapterRegistry(
            engine,
            settings.adapters,
            base_model=catalog.base_model,
            max_lora_rank=settings.engine.max_lora_rank,
            worker_id=settings.worker_id,
            on_status=on_status,
        )
        registry.load_catalog(catalog)
        if updates is not None:
            # Serve the latest announced versions from the first job on.
            seen = updates.catch_up(registry.apply_record, settings.adapters.catch_up_timeout_s)
            log.info("adapter_updates_caught_up", records=seen, serving=sorted(registry.served()))
        check_routing(pipelines, set(catalog.by_name) | set(registry.served()))
        prewarm(engine, registry, settings.adapters.prewarm)
        cache = AdapterCache(engine)
        batching = settings.batching
        batcher: AdapterBatcher[PreparedJob] = AdapterBatcher(
            max_batch_size=batching.max_batch_size,
            linger_s=batching.linger_ms / 1000,
            policy=batching.policy,
            max_adapters=batching.max_adapters_per_batch or settings.engine.max_loras,
            max_wait_s=batching.max_wait_ms / 1000,
            is_resident=cache.is_resident,
        )
        preparer = JobPreparer(
            pipelines_by_topic={p.input_topic: p for p in pipelines.values()},
            known_tasks=set(pipelines),
            resolve_adapter=registry.resolve,
            tokenize=engine.tokenize,
            max_model_len=engine.max_model_len,
        )
    except BaseException:
        engine.close()
        raise
    return Serving(engine, registry, cache, preparer, batcher)


def run_worker(
    settings: Settings,
    *,
    max_jobs: int | None = None,
    idle_exit_s: float | None = None,
    metrics_port: int | None = None,
) -> RunSummary:
    bootstrap = settings.require_bootstrap()
    pipelines = load_pipelines(settings.pipelines_dir, settings.schemas_dir)
    catalog = load_catalog(settings.catalog)
    if metrics_port is not None:
        start_http_server(metrics_port)

    sink: ResultSink = (
        ExactlyOnceSink(
            bootstrap,
            settings.transactional_id,
            settings.delivery.transaction_timeout_ms,
            settings.kafka,
        )
        if settings.delivery.mode == "exactly_once"
        else AtLeastOnceSink(bootstrap, settings.kafka)
    )
    statuses = AdapterStatusWriter(bootstrap, settings.adapters.status_topic, settings.kafka)
    updates = AdapterUpdateFeed(bootstrap, settings.adapters.updates_topic, settings.kafka)
    serving = start_serving(
        settings,
        pipelines,
        catalog,
        on_status=statuses.write,
        updates=updates,
    )
    try:
        worker = Worker(
            settings,
            pipelines,
            serving.engine,
            serving.preparer,
            serving.registry,
            updates,
            serving.cache,
            serving.batcher,
            source_factory=lambda handlers: KafkaJobSource(
                bootstrap,
                settings.group_id,
                sorted(p.input_topic for p in pipelines.values()),
                settings.kafka,
                handlers,
                instance_id=settings.instance_id,
            ),
            sink=sink,
            restart_engine=serving.restart_engine,
        )
        return worker.run(RunLimits(max_jobs=max_jobs, idle_exit_s=idle_exit_s))
    finally:
        serving.engine.close()
        statuses.close()


def run_bulk(
    settings: Settings,
    *,
    task: str | None,
    input_path: Path,
    output_dir: Path,
    rows_per_file: int,
    row_group_size: int = 10_000,
) -> BulkSummary:
    """`task` None: every pipeline, each row served by the pipeline its `task` names."""
    pipelines = load_pipelines(settings.pipelines_dir, settings.schemas_dir)
    if task is not None:
        if task not in pipelines:
            raise ConfigError(f"no pipeline {task!r}; known: {sorted(pipelines)}")
        pipelines = {task: pipelines[task]}
    if not input_path.is_file():
        raise ConfigError(f"input {input_path} is not a file")
    catalog = load_catalog(settings.catalog)

    def log_status(status: AdapterStatus) -> None:
        log.info("adapter_status", **status.model_dump(mode="json"))

    serving = start_serving(settings, pipelines, catalog, on_status=log_status)
    try:
        runner = BulkRunner(
            pipelines,
            serving.preparer,
            BatchProcessor(serving.engine, serving.cache, pipelines),
            serving.batcher,
            output_dir,
            rows_per_file=rows_per_file,
            default_task=task,
            row_group_size=row_group_size,
            restart_engine=serving.restart_engine,
            crash_attempts=settings.engine.crash_attempts,
        )
        return runner.run(input_path)
    finally:
        serving.engine.close()
