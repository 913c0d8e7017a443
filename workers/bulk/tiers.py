"""A bulk run in tiers on one multi-LoRA engine: adapters that dominate the run are served merged
into its base weights, in place, one at a time; everything else through LoRA.

1. Survey: route every row (without an engine) and count jobs and token budgets per adapter.
2. Plan (`workers.bulk.plan`): `--merge never|always|auto`; auto from measured costs.
3. The LoRA phase first: it answers every merged adapter's probes (a sample of its jobs at
   temperature 0, `workers.bulk.agreement`), then serves the rest of the run.
4. Per merged adapter: the engine merges it in place (`VllmEngine.merge`, milliseconds; no
   engine start), then a gate before it serves anything: the same probes, compared with the
   LoRA path's answers; below the thresholds (or with nothing compared), nothing is written
   merged and the adapter's jobs go back to the LoRA path at the end, which says so. The
   engine unmerges after each merged phase, whatever happened in it.
5. The costs measured on the way are stored for the next run's plan.

Every row is served in exactly one phase; rows that do not route go to the first one, which
writes them as error rows with their reason. The engine loop runs once per phase (a loop is
started once), each on the same engine. One run at a time per run id and output
(`workers.bulk.resume.run_lock`); rows an earlier start ended with a transient error are served
again.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from rich.console import Console
from rich.table import Table

from workers.adapters.checks import adapter_digest
from workers.bulk.agreement import Agreement, Probe, compare, greedy, run_probes, sample_rows
from workers.bulk.jobfiles import read_rows
from workers.bulk.plan import (
    Demand,
    MergeMode,
    Phase,
    RunPlan,
    load_costs,
    plan_run,
    save_costs,
)
from workers.bulk.resume import drop_transient_rows, run_lock
from workers.bulk.runner import (
    BulkOptions,
    BulkRunner,
    BulkSummary,
    RowSelection,
    _run_marker,
    default_run_id,
    job_id_of,
    prepare_rows,
)
from workers.core.config import AdapterCatalog, PipelineConfig, Settings
from workers.core.contracts import AdapterStatus, ServedBy, adapter_label
from workers.core.engine_api import AdapterHandle, AdapterLoadError, EngineDied
from workers.core.errors import JobRejected
from workers.core.prepare import decode_job
from workers.core.routing import rule_route
from workers.engine.model import EngineValues, engine_values
from workers.engine.vllm_engine import VllmEngine
from workers.parquet.dataset import existing_job_ids
from workers.serving import Serving, check_routing, start_serving

log = structlog.get_logger(__name__)

COSTS_FILE = "costs.json"
# A bulk run wants throughput, not latency: requests waiting inside the engine keep its
# scheduler's batch full between our admission rounds (8-9% more jobs/s merged, measured).
BULK_DEPTH_PER_SEQ = 2


# One engine's answers to one merged adapter's probes, by input row, and how long they took.
Answers = tuple[dict[int, Probe], float]


@dataclass
class Survey:
    """Every row's route, from the jobs alone."""

    demand: dict[str | None, Demand] = field(default_factory=dict)
    rows: defaultdict[str | None, list[int]] = field(default_factory=lambda: defaultdict(list))
    unroutable: list[int] = field(default_factory=list)  # not a job, unknown task or adapter
    rows_read: int = 0
    skipped: int = 0  # already written by an earlier start of the run


def survey(
    input_path: Path,
    pipelines: dict[str, PipelineConfig],
    task: str | None,
    known_adapters: set[str],
    done: set[str],
) -> Survey:
    found = Survey()
    jobs: defaultdict[str | None, int] = defaultdict(int)
    budgets: defaultdict[str | None, int] = defaultdict(int)
    for row, raw in enumerate(read_rows(input_path)):
        found.rows_read += 1
        if done and job_id_of(raw, row) in done:
            found.skipped += 1
            continue
        try:
            job = decode_job(raw)
        except JobRejected:
            found.unroutable.append(row)
            continue
        pipeline = pipelines.get(task or job.task)
        # Jobs routed by a classifier or embeddings are counted with the base model's: the
        # LoRA engine serves them, never a merged one.
        route = None if pipeline is None else rule_route(job, pipeline)
        name = None if route is None else route.adapter
        if pipeline is None or (name is not None and name not in known_adapters):
            found.unroutable.append(row)
            continue
        params = job.params
        max_tokens = (params and params.max_tokens) or pipeline.sampling.max_tokens
        jobs[name] += 1
        budgets[name] += max_tokens
        found.rows[name].append(row)
    found.demand = {name: Demand(jobs[name], budgets[name]) for name in jobs}
    return found


@dataclass
class PhaseReport:
    served_by: ServedBy
    adapters: list[str]  # labels, name@version
    jobs: int
    estimate_s: float
    seconds: float = 0.0  # the whole phase: engine start or merge, check, serving, unmerge
    engine_start_s: float = 0.0
    merge_s: float = 0.0  # the tier switch in place, to merged
    unmerge_s: float = 0.0  # and back to LoRA
    serve_s: float = 0.0
    output_tokens: int = 0
    agreement: Agreement | None = None
    fallback: str | None = None  # why a merged phase was given up (its jobs went to LoRA)
    probes_for: list[str] = field(default_factory=list)  # a LoRA phase: whose probes it answered

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.serve_s if self.serve_s else 0.0


@dataclass
class TieredSummary(BulkSummary):
    plan: RunPlan | None = None
    phases: list[PhaseReport] = field(default_factory=list)
    retried: int = 0  # rows an earlier start ended with a transient error, served again


@dataclass
class DryRun:
    run_id: str
    survey: Survey
    plan: RunPlan
    labels: list[str]  # name@version of each adapter in survey.demand, in its order


class TieredBulkRun:
    def __init__(
        self,
        settings: Settings,
        pipelines: dict[str, PipelineConfig],
        catalog: AdapterCatalog,
        options: BulkOptions,
        mode: MergeMode,
        on_status: Callable[[AdapterStatus], None],
        console: Console | None = None,
    ) -> None:
        self._settings = settings
        self._pipelines = pipelines
        self._catalog = catalog
        self._options = options
        self._mode = mode
        self._on_status = on_status
        self._console = console
        self._costs_path = settings.merge.cache_dir / COSTS_FILE
        self._costs = load_costs(self._costs_path)
        self._values = engine_values(settings.engine, catalog)
        self._handles: dict[str, AdapterHandle] = {}

    def run(self) -> TieredSummary:
        check_routing(self._pipelines, set(self._catalog.by_name))
        run_id = self._options.run_id or default_run_id(self._options.input_path)
        with run_lock(self._options.output_dir, run_id):
            return self._run(run_id)

    def dry_run(self) -> DryRun:
        """What `run` would do, from the jobs and the stored costs alone: nothing is generated,
        written or deleted."""
        check_routing(self._pipelines, set(self._catalog.by_name))
        run_id = self._options.run_id or default_run_id(self._options.input_path)
        marker = _run_marker(run_id)
        done = existing_job_ids(self._options.output_dir, stem_marker=marker)
        found, plan = self._plan(done)
        return DryRun(run_id, found, plan, self._labels(list(found.demand)))

    def _plan(self, done: set[str]) -> tuple[Survey, RunPlan]:
        found = survey(
            self._options.input_path,
            self._pipelines,
            self._options.task,
            set(self._catalog.by_name),
            done,
        )
        return found, plan_run(found.demand, self._mode, self._costs)

    def _run(self, run_id: str) -> TieredSummary:
        started = time.monotonic()
        marker = _run_marker(run_id)
        retried = drop_transient_rows(self._options.output_dir, marker)
        done = existing_job_ids(self._options.output_dir, stem_marker=marker)
        found, plan = self._plan(done)
        log.info(
            "bulk_plan",
            mode=self._mode.value,
            merged=plan.merged,
            estimate_s=round(plan.estimate_s, 1),
            estimates={m.value: round(s, 1) for m, s in plan.estimates.items()},
            retried=retried,
        )
        summary = TieredSummary(run_id=run_id, plan=plan, retried=retried)
        options = BulkOptions(**{**self._options.__dict__, "run_id": run_id})
        merge = self._settings.merge
        probes = {
            name: set(
                sample_rows(found.rows[name], merge.agreement_min_jobs, merge.agreement_fraction)
            )
            for name in plan.merged
        }
        references: dict[str, Answers] = {}
        lora_phase = next((p for p in plan.phases if p.served_by is ServedBy.LORA), None)
        if lora_phase is None and not found.unroutable:
            summary.seconds = time.monotonic() - started
            return summary  # nothing to serve: no engine
        rest = list(lora_phase.adapters) if lora_phase else []
        estimate = lora_phase.estimate_s if lora_phase else 0.0
        report = self._lora_report(rest, found, estimate, with_unroutable=True)
        report.probes_for = self._labels(list(probes))
        serving = self._serving(plan, None)
        engine = serving.engine
        try:
            report.engine_start_s = time.monotonic() - started

            def answer_probes(serving: Serving) -> bool:
                for name, rows in probes.items():
                    references[name] = self._probe(serving, rows)
                return True

            selection = self._selection(rest, found, True)
            self._serve(report, options, summary, selection, serving, answer_probes)
            report.seconds = time.monotonic() - started
            summary.phases.append(report)
            to_lora: list[str | None] = []
            for phase in plan.phases:
                if phase.served_by is ServedBy.MERGED:
                    name = phase.adapters[0]
                    assert name is not None
                    reference = references.get(name, ({}, 0.0))
                    report = self._merged_phase(
                        engine, name, phase, found, options, summary, probes[name], reference
                    )
                    summary.phases.append(report)
                    if report.fallback is not None:
                        to_lora.append(name)
            if to_lora:
                phase_started = time.monotonic()
                report = self._lora_report(to_lora, found, 0.0)
                selection = self._selection(to_lora, found, False)
                self._serve(report, options, summary, selection, self._serving(plan, engine))
                report.seconds = time.monotonic() - phase_started
                summary.phases.append(report)
        finally:
            engine.close()
        summary.rows, summary.skipped = found.rows_read, found.skipped
        summary.seconds = time.monotonic() - started
        self._remember(summary, found)
        return summary

    def _lora_report(
        self,
        names: list[str | None],
        found: Survey,
        estimate_s: float,
        with_unroutable: bool = False,
    ) -> PhaseReport:
        jobs = sum(len(found.rows[name]) for name in names)
        jobs += len(found.unroutable) if with_unroutable else 0
        return PhaseReport(ServedBy.LORA, self._labels(names), jobs, estimate_s)

    @staticmethod
    def _selection(names: list[str | None], found: Survey, with_unroutable: bool) -> RowSelection:
        rows = {row for name in names for row in found.rows[name]}
        if with_unroutable:
            rows.update(found.unroutable)
        return RowSelection(rows.__contains__, len(rows))

    def _probe(self, serving: Serving, rows: set[int]) -> Answers:
        """These rows' probes answered by `serving`'s engine (rows refused before the engine
        are left out: they are not the engine's answers)."""
        jobs = prepare_rows(
            serving, self._pipelines, self._options.task, self._options.input_path, rows
        )
        requests = {row: greedy(job.request) for row, job in jobs.items()}
        schemas = {row: job.pipeline.output_schema is not None for row, job in jobs.items()}
        return run_probes(serving.engine, requests, schemas)

    def _merged_phase(
        self,
        engine: VllmEngine,
        name: str,
        phase: Phase,
        found: Survey,
        options: BulkOptions,
        summary: TieredSummary,
        sample: set[int],
        reference: Answers,
    ) -> PhaseReport:
        started = time.monotonic()
        # Registered (a no-op: the engine has them) and prewarmed while still on LoRA.
        serving = self._serving(None, engine, merged=True)
        handle = serving.registry.served()[name].routes[0].handle
        report = PhaseReport(ServedBy.MERGED, [_label(handle)], phase.jobs, phase.estimate_s)
        try:
            report.merge_s = engine.merge(handle)
        except AdapterLoadError as exc:  # whatever stops merging, the adapter is served on LoRA
            report.fallback = f"merging failed: {exc}"
            log.warning("merged_adapter_fallback", adapter=report.adapters[0], reason=str(exc))
            report.seconds = time.monotonic() - started
            return report
        required = min(self._settings.merge.agreement_min_jobs, len(found.rows[name]))
        try:
            self._serve(
                report,
                options,
                summary,
                self._selection([name], found, False),
                serving,
                lambda serving: self._agrees(report, serving, sample, reference, required),
            )
        finally:
            # Back to LoRA for what follows (after an engine death the loop restarted it on
            # LoRA already: nothing to undo).
            try:
                report.unmerge_s = engine.unmerge()
            except EngineDied:  # died under the probes: it comes back on LoRA
                engine.restart()
        report.seconds = time.monotonic() - started
        return report

    def _agrees(
        self,
        report: PhaseReport,
        serving: Serving,
        sample: set[int],
        reference: Answers,
        required: int,
    ) -> bool:
        """The gate: the merged engine's answers to the probes against the LoRA engine's."""
        lora, lora_s = reference
        merged, merged_s = self._probe(serving, sample)
        report.agreement = compare(report.adapters[0], merged, lora, lora_s + merged_s, required)
        merge = self._settings.merge
        report.fallback = report.agreement.failure(
            merge.min_identical_text, merge.min_identical_output
        )
        log.info(
            "merged_adapter_agreement",
            adapter=report.adapters[0],
            jobs=report.agreement.jobs,
            failed=report.agreement.failed,
            identical_text=round(report.agreement.text_rate, 4),
            identical_output=report.agreement.output_rate,
            check_s=round(report.agreement.seconds, 2),
            fallback=report.fallback,
        )
        if report.fallback is not None:
            log.warning(
                "merged_adapter_fallback", adapter=report.adapters[0], reason=report.fallback
            )
        return report.fallback is None

    def _serving(
        self, plan: RunPlan | None, engine: VllmEngine | None, merged: bool = False
    ) -> Serving:
        """A fresh engine loop (a loop runs once) on `engine`, or on a new engine: with room
        for the merged tier's larger steps when `plan` merges anything."""
        settings, values = self._settings, self._values
        engine_settings = settings.engine
        if plan is not None and plan.merged:
            seqs = max(engine_settings.max_num_seqs, settings.merge.max_num_seqs)
            engine_settings = engine_settings.model_copy(update={"max_num_seqs": seqs})
            values = dataclasses.replace(values, settings=engine_settings)
        seqs = settings.merge.max_num_seqs if merged else settings.engine.max_num_seqs

        def on(existing: VllmEngine) -> Callable[[EngineValues, object], VllmEngine]:
            return lambda _values, _merged: existing

        return start_serving(
            settings.model_copy(update={"engine": engine_settings}),
            self._pipelines,
            self._catalog,
            on_status=self._on_status,
            engine_depth=settings.admission.engine_depth or BULK_DEPTH_PER_SEQ * seqs,
            values=values,
            **({} if engine is None else {"engine_factory": on(engine)}),
        )

    def _serve(
        self,
        report: PhaseReport,
        options: BulkOptions,
        summary: TieredSummary,
        selection: RowSelection,
        serving: Serving,
        first: Callable[[Serving], bool] | None = None,
    ) -> None:
        """Run `first` on `serving` (False: serve nothing), then serve the rows."""
        if first is not None and not first(serving):
            return  # nothing written
        if not selection.total:
            return
        runner = BulkRunner(self._pipelines, serving, options, selection)
        part = runner.run(self._console)
        # Throughput after start-up (the probes ran before).
        report.serve_s = part.seconds
        report.output_tokens = part.output_tokens
        summary.add(part)

    def _labels(self, names: list[str | None]) -> list[str]:
        return [_label_of(name, self._handle) for name in names]

    def _handle(self, name: str) -> AdapterHandle:
        """The catalog's version of `name`, its files hashed once (only adapters the run uses)."""
        if name not in self._handles:
            entry = self._catalog.by_name[name]
            digest = adapter_digest(entry.path)
            self._handles[name] = AdapterHandle(name, entry.version, str(entry.path), 0, digest)
        return self._handles[name]

    def _remember(self, summary: TieredSummary, found: Survey) -> None:
        """Blend what this run measured into the stored costs."""
        costs = self._costs
        observed: dict[str, float] = {}
        starts = [p.engine_start_s for p in summary.phases if p.engine_start_s]
        if starts:
            observed["engine_start_s"] = starts[0]
        for phase in summary.phases:
            if phase.serve_s and phase.output_tokens:
                key = (
                    "merged_tokens_per_s"
                    if phase.served_by is ServedBy.MERGED
                    else "lora_tokens_per_s"
                )
                observed[key] = phase.tokens_per_s
            if phase.agreement is not None:
                observed["check_s"] = phase.agreement.seconds
            if phase.merge_s:
                # All a merged phase costs beyond serving and the check: the switch both ways
                # and the phase's own engine loop (its adapters registered and prewarmed).
                check_s = phase.agreement.seconds if phase.agreement else 0.0
                overhead = phase.seconds - phase.serve_s - check_s
                observed["switch_s"] = max(overhead, phase.merge_s + phase.unmerge_s)
        for name, demand in found.demand.items():
            tokens = summary.tokens_by_adapter.get(_label_of(name, self._handle), 0)
            if tokens and demand.token_budget:
                costs = costs.with_fill(name, tokens / demand.token_budget)
        costs = costs.measured(**observed)
        save_costs(costs, self._costs_path)


def _label(handle: AdapterHandle) -> str:
    return adapter_label(handle.name, handle.version)


def _label_of(name: str | None, handle_of: Callable[[str], AdapterHandle]) -> str:
    return adapter_label(None, None) if name is None else _label(handle_of(name))


def print_phases(summary: TieredSummary, console: Console | None = None) -> None:
    """How the run was served: each engine's adapters, jobs, time and throughput, the plan's
    estimate beside what happened, and each merged adapter's agreement with the LoRA path."""
    console = console or Console()
    plan = summary.plan
    table = Table(title="Serving plan" + (f" (--merge {plan.mode.value})" if plan else ""))
    table.add_column("")
    table.add_column("value", justify="right")
    for phase in summary.phases:
        table.add_row(
            f"{phase.served_by.value} {', '.join(phase.adapters)}",
            f"{phase.jobs:,} jobs in {phase.seconds:,.1f} s (estimate {phase.estimate_s:,.1f} s)",
        )
        if phase.served_by is ServedBy.MERGED:
            switch = f"{phase.merge_s:,.3f} s + {phase.unmerge_s:,.3f} s"
            table.add_row("  merge + unmerge in place", switch)
        else:
            table.add_row("  engine start", f"{phase.engine_start_s:,.1f} s")
        table.add_row(
            "  after start-up", f"{phase.serve_s:,.1f} s, {phase.tokens_per_s:,.0f} tok/s"
        )
        agreement = phase.agreement
        if agreement is not None:
            agreed = f"text {agreement.text_rate:.1%}"
            if agreement.output_rate is not None:
                agreed += f", parsed {agreement.output_rate:.1%}"
            failed = f", {agreement.failed} unanswered" if agreement.failed else ""
            table.add_row("  agreement with LoRA", f"{agreed} of {agreement.jobs} jobs{failed}")
        if phase.probes_for:
            table.add_row("  answered the probes of", ", ".join(phase.probes_for))
        if phase.fallback is not None:
            table.add_row("  served on LoRA instead", phase.fallback)
    if plan is not None:
        others = ", ".join(f"{m.value} {s:,.1f} s" for m, s in sorted(plan.estimates.items()))
        table.add_row("plan estimate", f"{plan.estimate_s:,.1f} s ({others})")
    if summary.retried:
        table.add_row("retried (transient errors)", f"{summary.retried:,} rows")
    table.add_row("took", f"{summary.seconds:,.1f} s")
    console.print(table)


def summary_document(summary: TieredSummary) -> dict[str, object]:
    """The run's summary as JSON, for whatever schedules nightly runs (`--summary-json`)."""
    plan = summary.plan
    return {
        "run_id": summary.run_id,
        "rows": summary.rows,
        "skipped": summary.skipped,
        "retried": summary.retried,
        "by_status": dict(summary.by_status),
        "by_adapter": dict(summary.by_adapter),
        "errors": dict(summary.errors),
        "output_tokens": summary.output_tokens,
        "files": summary.files,
        "seconds": round(summary.seconds, 3),
        "plan": None
        if plan is None
        else {
            "mode": plan.mode.value,
            "merged": plan.merged,
            "estimate_s": round(plan.estimate_s, 3),
            "estimates": {m.value: round(s, 3) for m, s in plan.estimates.items()},
        },
        "phases": [
            {
                "served_by": phase.served_by.value,
                "adapters": phase.adapters,
                "jobs": phase.jobs,
                "estimate_s": round(phase.estimate_s, 3),
                "seconds": round(phase.seconds, 3),
                "engine_start_s": round(phase.engine_start_s, 3),
                "merge_s": round(phase.merge_s, 4),
                "unmerge_s": round(phase.unmerge_s, 4),
                "serve_s": round(phase.serve_s, 3),
                "output_tokens": phase.output_tokens,
                "tokens_per_s": round(phase.tokens_per_s, 1),
                "agreement": None
                if phase.agreement is None
                else {
                    "jobs": phase.agreement.jobs,
                    "failed": phase.agreement.failed,
                    "identical_text": round(phase.agreement.text_rate, 4),
                    "identical_output": None
                    if phase.agreement.output_rate is None
                    else round(phase.agreement.output_rate, 4),
                    "seconds": round(phase.agreement.seconds, 3),
                },
                "fallback": phase.fallback,
                "probes_for": phase.probes_for,
            }
            for phase in summary.phases
        ],
    }
