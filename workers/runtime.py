"""Assembles a Kafka worker or a bulk run from settings, and closes what it started."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from workers.adapters.checks import adapter_digest
from workers.adapters.feed import AdapterUpdateFeed
from workers.adapters.merged import MergedCheckpoints
from workers.bulk.plan import MergeMode
from workers.bulk.runner import BulkOptions
from workers.bulk.tiers import TieredBulkRun, TieredSummary
from workers.core.config import (
    AdapterCatalog,
    ConfigError,
    PipelineConfig,
    Settings,
    load_catalog,
    load_pipelines,
)
from workers.core.contracts import AdapterStatus
from workers.core.engine_api import AdapterHandle, MergedModel
from workers.core.errors import AdapterRejected
from workers.engine.model import EngineValues, engine_values
from workers.engine.vllm_engine import VllmEngine
from workers.health import Readiness, serve
from workers.kafka.clients import KafkaConnection, probe
from workers.kafka.sinks import AtLeastOnceSink, ResultSink
from workers.kafka.source import KafkaJobSource
from workers.kafka.status import NoticeWriter, last_serving_states, read_statuses
from workers.kafka.transactions import ExactlyOnceSink
from workers.serving import (
    EngineFactory,
    MergedCheck,
    adapter_requirements,
    check_dedicated,
    start_serving,
)
from workers.worker import RunLimits, RunSummary, Worker

log = structlog.get_logger(__name__)


def run_worker(
    settings: Settings,
    *,
    max_jobs: int | None = None,
    idle_exit_s: float | None = None,
    metrics_port: int | None = None,
    engine_factory: EngineFactory = VllmEngine,
) -> RunSummary:
    kafka = KafkaConnection.from_settings(settings)
    pipelines = load_pipelines(settings.pipelines_dir)
    catalog = load_catalog(settings.catalog)
    # Before any Kafka client: a model or rank problem is a one-line configuration error.
    values = engine_values(settings.engine, catalog)
    readiness = Readiness()
    server = None if metrics_port is None else serve(metrics_port, readiness)
    # One line, within seconds, if the cluster cannot be used (rather than clients retrying).
    probe(kafka)

    sink: ResultSink = (
        ExactlyOnceSink(
            kafka,
            settings.transactional_id,
            settings.delivery.transaction_timeout_ms,
            settings.sizes,
        )
        if settings.delivery.mode == "exactly_once"
        else AtLeastOnceSink(kafka, settings.sizes)
    )
    # Before the engine starts: a killed predecessor's open transaction is fenced and aborted
    # while the engine loads, so its partitions are readable when the worker first consumes.
    sink.start()
    # What the fleet serves, for adapters whose good state was compacted under a rejected one.
    last_serving = last_serving_states(read_statuses(kafka, settings.adapters.status_topic))
    statuses = NoticeWriter(kafka, settings.adapters.status_topic)
    evaluations = NoticeWriter(kafka, settings.adapters.evaluations_topic)
    updates = AdapterUpdateFeed(kafka, settings.adapters.updates_topic)
    merged, merge, check, reference = None, None, None, None
    dedicated = settings.merge.dedicated_adapter
    if dedicated is not None:
        catalog, merged, merge = _dedicated_to(dedicated, settings, values, pipelines, catalog)
        # The LoRA path's answers first, on an engine started for them and closed again.
        check = MergedCheck(settings, pipelines, catalog)
        reference = check.reference(merged.adapter)
    serving = start_serving(
        settings,
        pipelines,
        catalog,
        on_status=statuses.write_status,
        updates=updates,
        last_serving=last_serving,
        merged=merged,
        merge=merge,
        shadows=True,
        check=check,
        values=values,
        engine_factory=engine_factory,
    )
    try:
        if check is not None and reference is not None:
            problem = check.disagreement(serving, reference)
            if problem is not None:  # one line from the CLI, everything closed by `finally`
                raise ConfigError(
                    f"merge.dedicated_adapter {dedicated!r}: the merged checkpoint does not "
                    f"answer as the adapter does on the LoRA path ({problem}); not serving it"
                )
        # Started once serving is ready: an engine death then costs a switch, not a start.
        serving.engine.keep_standby()
        readiness.update(engine=True)
        worker = Worker(
            settings,
            pipelines,
            serving,
            updates,
            source_factory=lambda handlers: KafkaJobSource(
                kafka,
                settings.group_id,
                sorted(p.input_topic for p in pipelines.values()),
                None,
                handlers,
                instance_id=settings.instance_id,
            ),
            sink=sink,
            readiness=readiness,
            evaluations=evaluations,
            report_status=statuses.write_status,
        )
        return worker.run(RunLimits(max_jobs=max_jobs, idle_exit_s=idle_exit_s))
    finally:
        if server is not None:
            server.shutdown()
        serving.engine.close()
        statuses.close()
        evaluations.close()


def _dedicated_to(
    name: str,
    settings: Settings,
    values: EngineValues,
    pipelines: dict[str, PipelineConfig],
    catalog: AdapterCatalog,
) -> tuple[AdapterCatalog, MergedModel, Callable[[AdapterHandle], MergedModel]]:
    """The catalog, merged checkpoint and merge function of a worker that serves one adapter
    merged; `ConfigError` if its pipelines route anywhere else."""
    check_dedicated(pipelines, name)
    entry = catalog.by_name.get(name)
    if entry is None:
        raise ConfigError(f"merge.dedicated_adapter {name!r} is not in the catalog")
    checkpoints = MergedCheckpoints(
        settings.merge, values.model.path, adapter_requirements(settings, values), values.dtype
    )
    handle = AdapterHandle(
        entry.name, entry.version, str(entry.path), 0, adapter_digest(entry.path)
    )
    try:
        merged = checkpoints.get(handle)
    except AdapterRejected as rejection:
        raise ConfigError(f"merge.dedicated_adapter {name!r}: {rejection}") from rejection
    return catalog.model_copy(update={"adapters": [entry]}), merged, checkpoints.get


def bulk_run(settings: Settings, options: BulkOptions, merge: MergeMode) -> TieredBulkRun:
    """A bulk run, its inputs checked; `.run()` serves it, `.dry_run()` only plans it."""
    pipelines = load_pipelines(settings.pipelines_dir)
    if options.task is not None:
        if options.task not in pipelines:
            raise ConfigError(f"no pipeline {options.task!r}; known: {sorted(pipelines)}")
        pipelines = {options.task: pipelines[options.task]}
    if not options.input_path.is_file():
        raise ConfigError(f"input {options.input_path} is not a file")
    if options.output_dir.exists() and not options.output_dir.is_dir():
        raise ConfigError(f"output {options.output_dir} exists and is not a directory")
    catalog = load_catalog(settings.catalog)

    def log_status(status: AdapterStatus) -> None:
        log.info("adapter_status", **status.model_dump(mode="json"))

    return TieredBulkRun(settings, pipelines, catalog, options, merge, log_status)


def run_bulk(
    settings: Settings, options: BulkOptions, merge: MergeMode = MergeMode.AUTO
) -> TieredSummary:
    return bulk_run(settings, options, merge).run()
