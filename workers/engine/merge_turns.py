"""Merged turns in a live stream: the engine loop's side of `workers.core.tiering`.

When one adapter dominates the work, the engine loop empties the engine, merges that adapter into
the base weights in place (`Engine.merge`) and admits only its jobs, which then run at the base
model's speed; before the other adapters' jobs would wait too long it empties the engine again,
unmerges (the original weights, bit for bit) and serves them on LoRA. `TierPolicy` decides when;
`MergeTurns` does it, on the loop thread, with the engine empty.

The first time an adapter version is to be merged, up to `check_jobs` of its waiting jobs run
first on the LoRA path and then merged, greedily, with the same constrained decoding
(`workers.bulk.agreement`); a version whose merged answers do not agree well enough, whose merge
fails, or whose check killed the engine is never merged again and is served on LoRA. Answers
say which tier served them (`served_by`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field

import structlog

from workers import metrics
from workers.bulk.agreement import compare, greedy, run_probes
from workers.core.admission import Admission
from workers.core.engine_api import Engine, EngineDied, EngineNotEmpty
from workers.core.prepare import PreparedJob
from workers.core.tiering import Moment, Tiering, TierPolicy

log = structlog.get_logger(__name__)


@dataclass
class MergeTurns:
    policy: TierPolicy[Hashable]
    check_jobs: int = 32
    min_identical_text: float = 0.9
    min_identical_output: float = 0.95
    merged: Hashable | None = None  # the adapter key merged in the engine now
    decision: Tiering[Hashable] = field(default_factory=lambda: Tiering(None))
    _checked: set[Hashable] = field(default_factory=set)

    def admits(self, key: Hashable) -> bool:
        """Whether a job of adapter `key` may enter the engine now."""
        if self.merged is not None:
            return key == self.merged
        held = self.decision.held
        return held is None or key != held  # the base model's key is None: never held

    def decide(
        self,
        now: float,
        admission: Admission[PreparedJob],
        in_engine: Counter[Hashable],
        drain_s: float,
    ) -> bool:
        """Whether the engine must switch tiers (so be emptied first)."""
        work = Counter(admission.waiting_per_adapter()) + in_engine
        besides = self.merged if self.merged is not None else self.decision.held
        oldest = admission.oldest_arrival(besides=besides)
        wait = 0.0 if oldest is None else now - oldest
        decision = self.policy.decide(Moment(now, self.merged, work, wait, drain_s))
        if decision != self.decision:
            log.info(
                "tier_decision",
                merge=_name(decision.target, admission),
                held=_name(decision.held, admission),
                merged=_name(self.merged, admission),
            )
        self.decision = decision
        return decision.target != self.merged

    def switch(self, engine: Engine, admission: Admission[PreparedJob]) -> None:
        """Switch to `decision.target`, the engine being empty: unmerge what is merged, then
        merge the target (checking a new version's answers first)."""
        if self.merged is not None:
            self._unmerge(engine)
            log.info("merged_turn_ended")
        target = self.decision.target
        jobs = [] if target is None else admission.peek(target, self.check_jobs)
        if target is None or not jobs or jobs[0].adapter is None:
            return
        adapter = jobs[0].adapter
        try:
            if target in self._checked:
                engine.merge(adapter)
                self.merged = target
            else:
                self._merge_checked(engine, target, jobs)
        except EngineNotEmpty as busy:  # the engine still holds requests: try again later
            log.warning("merge_postponed", adapter=adapter.engine_name, reason=str(busy))
            return
        except EngineDied:
            self.merged = None
            self.policy.refuse(target)  # its check or merge killed the engine: not again
            log.error("merge_refused", adapter=adapter.engine_name, reason="the engine died")
            raise
        except Exception as exc:
            self.policy.refuse(target)
            log.error("merge_refused", adapter=adapter.engine_name, reason=str(exc))
            if engine.merged_adapter is not None:  # merged, then refused: back to LoRA
                self._unmerge(engine)
            self.merged = None
        if self.merged is not None:
            log.info("merged_turn_started", adapter=adapter.engine_name)

    def _merge_checked(self, engine: Engine, target: Hashable, jobs: list[PreparedJob]) -> None:
        probes = {index: greedy(job.request) for index, job in enumerate(jobs)}
        has_schema = {index: job.request.json_schema is not None for index, job in enumerate(jobs)}
        started = time.monotonic()
        reference, _ = run_probes(engine, probes, has_schema)
        engine.merge(jobs[0].adapter)  # type: ignore[arg-type]
        self.merged = target
        answers, _ = run_probes(engine, probes, has_schema)
        adapter = jobs[0].adapter
        assert adapter is not None
        agreement = compare(
            adapter.engine_name, answers, reference, time.monotonic() - started, len(jobs)
        )
        problem = agreement.failure(self.min_identical_text, self.min_identical_output)
        metrics.MERGE_CHECKS.labels("refused" if problem else "passed").inc()
        if problem is not None:
            raise ValueError(f"merged answers disagree with the LoRA path's: {problem}")
        self._checked.add(target)
        log.info(
            "merge_checked",
            adapter=adapter.engine_name,
            jobs=agreement.jobs,
            identical_text=round(agreement.text_rate, 3),
        )

    def _unmerge(self, engine: Engine) -> None:
        """Back to LoRA mode. If that fails, the weights are in doubt: the loop treats it as
        an engine death, and the fresh engine loads the original weights."""
        try:
            engine.unmerge()
        except EngineDied:
            raise
        except Exception as exc:
            log.error("unmerge_failed", error=str(exc))
            raise EngineDied(f"unmerging failed: {exc}") from exc
        self.merged = None

    def engine_restarted(self) -> None:
        """The engine died and came back in LoRA mode."""
        self.merged = None
        self.decision = Tiering(None)
        self.policy.reset()


def _name(key: Hashable | None, admission: Admission[PreparedJob]) -> str | None:
    """An adapter key as its engine name, for the log (from a waiting job that has it)."""
    if key is None:
        return None
    jobs = admission.peek(key, 1)
    return jobs[0].adapter.engine_name if jobs and jobs[0].adapter else str(key)
