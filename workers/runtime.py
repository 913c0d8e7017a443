"""Assembles a worker from settings: pipelines, catalog, engine, adapters, source, sink."""

from __future__ import annotations

import structlog
from prometheus_client import start_http_server

from workers.adapter_cache import AdapterCache
from workers.adapter_feed import AdapterUpdateFeed
from workers.adapters import AdapterRegistry
from workers.config import (
    ConfigError,
    PipelineConfig,
    Settings,
    load_catalog,
    load_pipelines,
)
from workers.engine import VllmEngine
from workers.prepare import JobPreparer
from workers.sinks import KafkaSink
from workers.source import KafkaJobSource
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

    sink = KafkaSink(bootstrap, settings.kafka)
    updates = AdapterUpdateFeed(bootstrap, settings.adapters.updates_topic, settings.kafka)
    engine = VllmEngine(settings.engine)
    try:
        registry = AdapterRegistry(
            engine,
            settings.adapters,
            base_model=catalog.base_model,
            max_lora_rank=settings.engine.max_lora_rank,
            worker_id=settings.worker_id,
            on_status=lambda status: sink.write_status(settings.adapters.status_topic, status),
        )
        registry.load_catalog(catalog)
        # Serve the latest announced versions from the first job on.
        seen = updates.catch_up(registry.apply_record, settings.adapters.catch_up_timeout_s)
        log.info("adapter_updates_caught_up", records=seen, serving=sorted(registry.served()))
        check_routing(pipelines, set(catalog.by_name) | set(registry.served()))
        prewarm(engine, registry, settings.adapters.prewarm)
        preparer = JobPreparer(
            pipelines_by_topic={p.input_topic: p for p in pipelines.values()},
            known_tasks=set(pipelines),
            resolve_adapter=registry.resolve,
            tokenize=engine.tokenize,
            max_model_len=engine.max_model_len,
        )
        worker = Worker(
            settings,
            pipelines,
            engine,
            preparer,
            registry,
            updates,
            source_factory=lambda on_revoke: KafkaJobSource(
                bootstrap,
                settings.group_id,
                sorted(p.input_topic for p in pipelines.values()),
                settings.kafka,
                on_revoke,
            ),
            sink=sink,
        )
        return worker.run(RunLimits(max_jobs=max_jobs, idle_exit_s=idle_exit_s))
    finally:
        engine.close()
