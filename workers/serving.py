"""The engine and everything around it that the Kafka worker and bulk mode share: adapters
registered from the catalog (and the update topic), routing checked, the preparer and the
engine loop (admission, generation, output checks) wired to one engine."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from workers import metrics
from workers.adapters.cache import AdapterCache
from workers.adapters.checks import AdapterRequirements
from workers.adapters.feed import AdapterUpdateFeed
from workers.adapters.registry import AdapterRegistry
from workers.bulk.agreement import Probe, compare, greedy, run_probes
from workers.core.admission import Admission
from workers.core.config import AdapterCatalog, AdapterEntry, ConfigError, PipelineConfig, Settings
from workers.core.contracts import AdapterStatus, AdapterUpdate, AdapterVersionSpec
from workers.core.engine_api import AdapterHandle, AdapterLoadError, GenerationRequest, MergedModel
from workers.core.messages import SourceMessage
from workers.core.prepare import JobPreparer, PreparedJob
from workers.core.processing import OutputChecker
from workers.core.routing import NearestAdapters, Router
from workers.core.tiering import TierPolicy
from workers.engine.loop import EngineLoop, LoopLimits
from workers.engine.merge_turns import MergeTurns
from workers.engine.model import EngineValues, engine_values, identify
from workers.engine.vllm_engine import VllmEngine

# Starts the engine a worker serves with: `VllmEngine`, or a benchmark's double of it.
EngineFactory = Callable[[EngineValues, MergedModel | None], VllmEngine]

log = structlog.get_logger(__name__)


def check_routing(pipelines: dict[str, PipelineConfig], known_adapters: set[str]) -> None:
    """Fail at start-up, not per job, when a pipeline routes to an adapter nobody announced."""
    for pipeline in pipelines.values():
        names = pipeline.routing.targets()
        missing = sorted(str(n) for n in names if n is not None and n not in known_adapters)
        if missing:
            raise ConfigError(f"pipeline {pipeline.task!r} routes to unknown adapters {missing}")


def adapter_requirements(settings: Settings, values: EngineValues) -> AdapterRequirements:
    """What an adapter must be to serve on this engine's model (`workers.adapters.checks`)."""
    return AdapterRequirements.of(settings.adapters, values.model, values.max_lora_rank, identify)


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


# The dedicated merged worker's probes: each pipeline's prompt over these inputs, as its jobs
# would get them, at temperature 0. Varied on purpose: another adapter's weights, or a bad
# merge, answer them differently from the adapter on the LoRA path.
_PROBE_SUBJECTS = ("My invoice", "The app", "Your delivery", "The password reset")
_PROBE_COMPLAINTS = (
    "was charged twice this month, please refund it.",
    "crashes every time I open the settings page.",
    "arrived two weeks late and the box was damaged.",
    "email never arrives; I am locked out of my account.",
    "is great, thank you for the quick help yesterday!",
    "shows the wrong currency since the last update.",
    "asks me to log in again after every single click.",
    "- can I change the address on an order already shipped?",
)
PROBE_INPUTS = tuple(
    f"{subject} {complaint}"
    for subject, complaint in itertools.product(_PROBE_SUBJECTS, _PROBE_COMPLAINTS)
)

# One engine's answers to the probes, by probe, and how long they took.
Answers = tuple[dict[int, Probe], float]


class MergedCheck:
    """The agreement check of a worker dedicated to one adapter merged
    (`merge.dedicated_adapter`), at start-up and at every version switch: the probes answered
    by a LoRA engine on the adapter (started for that, then closed) and by the merged engine
    must agree as the bulk merged tier's gate requires (`workers.bulk.agreement`)."""

    def __init__(
        self, settings: Settings, pipelines: dict[str, PipelineConfig], catalog: AdapterCatalog
    ) -> None:
        # The reference engine warms nothing: it answers the probes and closes.
        adapters = settings.adapters.model_copy(update={"prewarm": []})
        self._settings = settings.model_copy(update={"adapters": adapters})
        self._pipelines = pipelines
        self._catalog = catalog

    def reference(self, adapter: AdapterHandle) -> Answers:
        """`adapter`'s answers on the LoRA path, from an engine started for them."""
        entry = AdapterEntry(name=adapter.name, version=adapter.version, path=adapter.path)
        catalog = self._catalog.model_copy(update={"adapters": [entry]})
        serving = start_serving(self._settings, self._pipelines, catalog, lambda _: None)
        try:
            (route,) = serving.registry.served()[adapter.name].routes
            return run_probes(serving.engine, *self._probes(serving, route.handle))
        finally:
            serving.engine.close()

    def disagreement(self, serving: Serving, reference: Answers) -> str | None:
        """Why the merged engine may not serve (None: it may), its answers against `reference`."""
        merged = serving.engine.merged
        assert merged is not None
        requests, schemas = self._probes(serving, merged.adapter)
        answers, seconds = run_probes(serving.engine, requests, schemas)
        merge = self._settings.merge
        agreement = compare(
            merged.adapter.engine_name,
            answers,
            reference[0],
            seconds + reference[1],
            min(merge.agreement_min_jobs, len(requests)),
        )
        problem = agreement.failure(merge.min_identical_text, merge.min_identical_output)
        log.info(
            "merged_adapter_agreement",
            adapter=merged.adapter.engine_name,
            jobs=agreement.jobs,
            failed=agreement.failed,
            identical_text=round(agreement.text_rate, 4),
            identical_output=agreement.output_rate,
            check_s=round(agreement.seconds, 2),
            fallback=problem,
        )
        return problem

    def _probes(
        self, serving: Serving, adapter: AdapterHandle
    ) -> tuple[dict[int, GenerationRequest], dict[int, bool]]:
        pairs = [(p, text) for p in self._pipelines.values() for text in PROBE_INPUTS]
        messages = [
            SourceMessage(
                topic=pipeline.input_topic or "",
                partition=0,
                offset=index,
                key=None,
                value=json.dumps(
                    {"job_id": f"probe-{index}", "task": pipeline.task, "input": text}
                ).encode(),
                headers=[],
                timestamp_ms=0,
            )
            for index, (pipeline, text) in enumerate(pairs)
        ]
        staged = serving.preparer.stage_all(messages)  # the jobs' requests, not yet routed
        jobs = {
            message.offset: job
            for message, job in zip(messages, staged, strict=True)
            if isinstance(job, PreparedJob)
        }
        requests = {
            key: dataclasses.replace(greedy(job.classifying or job.request), adapter=adapter)
            for key, job in jobs.items()
        }
        return requests, {key: job.pipeline.output_schema is not None for key, job in jobs.items()}


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
    check: MergedCheck | None = None,
    values: EngineValues | None = None,
    engine_factory: EngineFactory = VllmEngine,
) -> Serving:
    """Start the engine, register the catalog (then the update topic, if any) and check that
    every pipeline routes to an adapter that exists. The caller closes `serving.engine`.

    With `merged`, the engine runs that checkpoint and serves only its adapter: the catalog
    must hold just that one, and routing was checked by whoever planned the merge. With
    `merge` too, a new version of the adapter is merged and the engine switched to it.
    `engine_depth` overrides `admission.engine_depth` (bulk runs keep the engine deeper).
    `shadows`: jobs of an adapter with a shadow version also run on it (the Kafka worker).
    `check`: a new version's merged checkpoint serves only if it agrees with the version on
    the LoRA path; else the engine goes back to the version before, which serves again, and
    the new one is rejected on the status topic. `values`: the engine's (`engine_values`),
    when the caller has them already. `engine_factory`: what starts the engine (a benchmark's
    instant engine measures the worker's own per-job cost)."""
    values = values or engine_values(settings.engine, catalog)
    engine = engine_factory(values, merged)
    try:
        registry = AdapterRegistry(
            engine,
            adapter_requirements(settings, values),
            worker_id=settings.worker_id,
            on_status=on_status,
            only=None if merged is None else merged.adapter.name,
        )
        registry.load_catalog(catalog)
        if updates is not None:
            # Serve the latest announced versions from the first job on.
            seen = updates.catch_up(
                lambda record: registry.apply_record_surviving(record, lambda _d: engine.restart()),
                settings.adapters.catch_up_timeout_s,
            )
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
            render_chat=engine.render_chat,
            max_model_len=engine.max_model_len,
            max_job_bytes=settings.sizes.max_job_bytes,
        )

        def switch_model(adapter: AdapterHandle | None) -> None:
            if adapter is None or merge is None:
                raise ConfigError("a merged engine serves no base-model jobs")
            before = engine.merged
            assert before is not None
            new = merge(adapter)
            if check is None:
                engine.switch_merged(new)
                cache.refresh()
                return
            try:
                reference = check.reference(adapter)
                engine.switch_merged(new)
                cache.refresh()
                problem = check.disagreement(serving, reference)
            except Exception as exc:  # a check that cannot run passes nothing
                problem = f"the agreement check failed: {exc}"
            if problem is None:
                return
            if engine.merged is not before:
                engine.switch_merged(before)
                cache.refresh()
            _serve_again(registry, catalog, before.adapter)
            # The engine loop rejects `adapter` on the status topic with this reason.
            raise AdapterLoadError(
                f"{adapter.engine_name} merged does not answer as on the LoRA path: {problem}"
            )

        def restart_engine() -> None:
            engine.restart()  # with the same adapters registered and pinned
            cache.refresh()
            # The Kafka worker freezes start-up's objects out of garbage collection
            # (worker.py): the dead engine's client is among them, so collect it now.
            gc.unfreeze()
            gc.collect()
            gc.freeze()

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
                engine_depth=engine_depth or admission.engine_depth or default_depth(settings),
                engine_slots=settings.engine.max_num_seqs,
                crash_attempts=settings.engine.crash_attempts,
                max_restarts_per_minute=settings.engine.max_restarts_per_minute,
                stall_warning_s=settings.engine.step_stall_warning_s,
                shadow_share=settings.shadow.max_engine_share,
                shadow_max_waiting=settings.shadow.max_waiting,
                latency_target_s=admission.latency_target_ms / 1000,
                min_throughput_share=admission.min_throughput_share,
            ),
            restart_engine=restart_engine,
            on_unavailable=registry.mark_unavailable,
            switch_model=None if merge is None else switch_model,
            merge_turns=merge_turns(settings) if shadows and merged is None else None,
        )
        serving = Serving(engine, registry, cache, preparer, loop)
    except BaseException:
        engine.close()
        raise
    return serving


def merge_turns(settings: Settings) -> MergeTurns | None:
    """The Kafka worker's merged turns (`merge.streaming`), or None."""
    merge = settings.merge
    if not merge.streaming:
        return None
    return MergeTurns(
        TierPolicy(
            share=merge.streaming_share,
            sustain_s=merge.streaming_after_s,
            others_max_wait_s=merge.streaming_others_max_wait_ms / 1000,
            min_backlog=merge.streaming_min_jobs,
        ),
        check_jobs=merge.agreement_min_jobs,
        min_identical_text=merge.min_identical_text,
        min_identical_output=merge.min_identical_output,
    )


def default_depth(settings: Settings) -> int:
    """Requests kept in the engine: its `max_num_seqs`, and an eighth more waiting inside it,
    so a slot freed in one step is filled in the next (the loop sees a finished request a
    step or two after the engine freed its slot)."""
    seqs = settings.engine.max_num_seqs
    return seqs + max(1, seqs // 8)


def _serve_again(
    registry: AdapterRegistry, catalog: AdapterCatalog, adapter: AdapterHandle
) -> None:
    """Route `adapter`'s jobs to this version again (a merged switch away from it was undone),
    with the adapter's current tenants and pinning."""
    served = registry.served().get(adapter.name)
    spec = AdapterVersionSpec(
        version=adapter.version, path=adapter.path, sha256=adapter.sha256 or ""
    )
    registry.apply(
        AdapterUpdate(
            name=adapter.name,
            base_model=catalog.base_model,
            versions=[spec],
            tenants=None if served is None or served.tenants is None else sorted(served.tenants),
            hot=served.hot if served is not None else False,
            published_at_ms=int(time.time() * 1000),
        )
    )
