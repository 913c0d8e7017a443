"""The engine and everything around it that the Kafka worker and bulk mode share: adapters
registered from the catalog (and the update topic), routing checked, the preparer and the
engine loop (admission, generation, output checks) wired to one engine."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from workers import metrics
from workers.adapters.cache import AdapterCache
from workers.adapters.checks import AdapterRequirements
from workers.adapters.feed import AdapterUpdateFeed
from workers.adapters.registry import AdapterRegistry
from workers.core.admission import Admission
from workers.core.config import AdapterCatalog, ConfigError, PipelineConfig, Settings
from workers.core.contracts import AdapterStatus, AdapterUpdate
from workers.core.engine_api import AdapterHandle, MergedModel
from workers.core.prepare import JobPreparer, PreparedJob
from workers.core.processing import OutputChecker
from workers.core.routing import NearestAdapters, Router
from workers.engine.loop import EngineLoop, LoopLimits
from workers.engine.vllm_engine import VllmEngine

log = structlog.get_logger(__name__)


def check_routing(pipelines: dict[str, PipelineConfig], known_adapters: set[str]) -> None:
    """Fail at start-up, not per job, when a pipeline routes to an adapter nobody announced."""
    for pipeline in pipelines.values():
        names = pipeline.routing.targets()
        missing = sorted(str(n) for n in names if n is not None and n not in known_adapters)
        if missing:
            raise ConfigError(f"pipeline {pipeline.task!r} routes to unknown adapters {missing}")


def check_dedicated(pipelines: dict[str, PipelineConfig], adapter: str) -> None:
    """A worker serving one adapter merged must get no job routed elsewhere by configuration:
    the merged weights would mis-serve the base model's jobs and cannot serve another's."""
    for pipeline in pipelines.values():
        others = sorted({str(name) for name in pipeline.routing.targets()} - {adapter})
        if others:
            shown = ["the base model" if name == "None" else name for name in others]
            raise ConfigError(
                f"merge.dedicated_adapter is {adapter!r}, but pipeline {pipeline.task!r} routes "
                f"jobs to {shown}"
            )


def embedding_router(pipelines: dict[str, PipelineConfig]) -> NearestAdapters | None:
    """Centroids of every embedding-routed pipeline's examples, computed once at start-up."""
    routed = {task: p.routing.embedding for task, p in pipelines.items() if p.routing.embedding}
    if not routed:
        return None
    from workers.embedding import CentroidIndex, SentenceEmbedder  # torch only when used

    embedder = SentenceEmbedder()
    started = time.monotonic()
    indexes = {task: CentroidIndex(config.examples, embedder) for task, config in routed.items()}
    log.info("embedding_centroids", tasks=sorted(indexes), s=round(time.monotonic() - started, 2))

    def nearest(task: str, texts: Sequence[str]) -> list[tuple[str, float]]:
        started = time.monotonic()
        found = indexes[task].nearest(embedder.embed(texts))
        metrics.EMBEDDING_SECONDS.observe(time.monotonic() - started)
        return found

    return nearest


def prewarm(engine: VllmEngine, registry: AdapterRegistry, names: list[str]) -> None:
    served = registry.served()
    unknown = sorted(set(names) - set(served))
    if unknown:
        raise ConfigError(f"adapters.prewarm names adapters nobody serves: {unknown}")
    handles = [route.handle for name in names for route in served[name].routes]
    AdapterCache(engine).prewarm(handles, engine.tokenize("warm-up"))


@dataclass(frozen=True)
class Serving:
    engine: VllmEngine
    registry: AdapterRegistry
    cache: AdapterCache
    preparer: JobPreparer
    loop: EngineLoop  # not started: the caller starts it, with its own between-steps work


def start_serving(
    settings: Settings,
    pipelines: dict[str, PipelineConfig],
    catalog: AdapterCatalog,
    on_status: Callable[[AdapterStatus], None],
    updates: AdapterUpdateFeed | None = None,
    last_serving: dict[str, AdapterUpdate] | None = None,
    merged: MergedModel | None = None,
    merge: Callable[[AdapterHandle], MergedModel] | None = None,
    engine_depth: int | None = None,
    shadows: bool = False,
) -> Serving:
    """Start the engine, register the catalog (then the update topic, if any) and check that
    every pipeline routes to an adapter that exists. The caller closes `serving.engine`.

    With `merged`, the engine runs that checkpoint and serves only its adapter: the catalog
    must hold just that one, and routing was checked by whoever planned the merge. With
    `merge` too, a new version of the adapter is merged and the engine switched to it.
    `engine_depth` overrides `admission.engine_depth` (bulk runs keep the engine deeper).
    `shadows`: jobs of an adapter with a shadow version also run on it (the Kafka worker)."""
    engine = VllmEngine(settings.engine, merged)
    try:
        registry = AdapterRegistry(
            engine,
            AdapterRequirements.of(
                settings.adapters, catalog.base_model, settings.engine.max_lora_rank
            ),
            worker_id=settings.worker_id,
            on_status=on_status,
            only=None if merged is None else merged.adapter.name,
        )
        registry.load_catalog(catalog)
        if updates is not None:
            # Serve the latest announced versions from the first job on.
            seen = updates.catch_up(registry.apply_record, settings.adapters.catch_up_timeout_s)
            log.info("adapter_updates_caught_up", records=seen, serving=sorted(registry.served()))
            restored = registry.restore_last_good(last_serving or {})
            if restored:
                log.warning("adapters_restored_from_status", adapters=restored)
        if merged is None:
            check_routing(pipelines, set(catalog.by_name) | set(registry.served()))
            prewarm(engine, registry, settings.adapters.prewarm)
        cache = AdapterCache(engine)
        router = Router(
            resolve=registry.resolve,
            shadow_for=registry.shadow_for if shadows else None,
            nearest=embedding_router(pipelines),
        )
        preparer = JobPreparer(
            pipelines_by_topic={p.input_topic: p for p in pipelines.values()},
            known_tasks=set(pipelines),
            router=router,
            tokenize=engine.tokenize,
            max_model_len=engine.max_model_len,
            max_job_bytes=settings.sizes.max_job_bytes,
        )

        def switch_model(adapter: AdapterHandle | None) -> None:
            if adapter is None or merge is None:
                raise ConfigError("a merged engine serves no base-model jobs")
            engine.switch_merged(merge(adapter))
            cache.refresh()

        def restart_engine() -> None:
            engine.restart()  # with the same adapters registered and pinned
            cache.refresh()

        admission = settings.admission
        loop = EngineLoop(
            engine,
            cache,
            OutputChecker(pipelines, engine.max_model_len, router),
            Admission[PreparedJob](
                policy=admission.policy,
                max_adapters=admission.max_adapters or settings.engine.max_loras,
                max_wait_s=admission.max_wait_ms / 1000,
                tenant_weights=admission.tenant_weights,
                is_resident=cache.is_resident,
            ),
            LoopLimits(
                engine_depth=engine_depth or admission.engine_depth or settings.engine.max_num_seqs,
                crash_attempts=settings.engine.crash_attempts,
                stall_warning_s=settings.engine.step_stall_warning_s,
                shadow_share=settings.shadow.max_engine_share,
                shadow_max_waiting=settings.shadow.max_waiting,
            ),
            restart_engine=restart_engine,
            on_unavailable=registry.mark_unavailable,
            switch_model=None if merge is None else switch_model,
        )
    except BaseException:
        engine.close()
        raise
    return Serving(engine, registry, cache, preparer, loop)
