"""Rolling summaries of shadow evaluations, per (adapter, shadow version). Pure logic, no I/O.

Each evaluation (`workers.core.processing.evaluation_of`) goes to `adapters.evaluations`; the
summary over a worker's last `window` of them goes to metrics at once and to `adapters.status`
every `interval_s` (`docs/adapters.md`, shadow evaluation).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from statistics import fmean

from workers import metrics
from workers.core.contracts import (
    AdapterState,
    AdapterStatus,
    EvaluationSummary,
    ShadowEvaluation,
)


def summarize(evaluations: list[ShadowEvaluation]) -> EvaluationSummary:
    def share(values: list[bool]) -> float:
        return round(fmean(values), 4) if values else 0.0

    def mean(values: list[float]) -> float:
        return round(fmean(values), 2) if values else 0.0

    return EvaluationSummary(
        jobs=len(evaluations),
        identical_text=share([e.identical_text for e in evaluations]),
        identical_output=share([e.identical_output for e in evaluations]),
        serving_valid=share([e.serving_valid for e in evaluations]),
        shadow_valid=share([e.shadow_valid for e in evaluations]),
        serving_tokens=mean([e.serving_tokens for e in evaluations]),
        shadow_tokens=mean([e.shadow_tokens for e in evaluations]),
        serving_latency_ms=mean([e.serving_latency_ms for e in evaluations]),
        shadow_latency_ms=mean([e.shadow_latency_ms for e in evaluations]),
    )


@dataclass
class ShadowSummaries:
    window: int
    interval_s: float
    worker: str
    _recent: dict[tuple[str, str], deque[ShadowEvaluation]] = field(default_factory=dict)
    _changed: set[tuple[str, str]] = field(default_factory=set)
    _next_report: float = 0.0

    def add(self, evaluation: ShadowEvaluation) -> None:
        key = (evaluation.adapter, evaluation.shadow.version)
        recent = self._recent.setdefault(key, deque(maxlen=self.window))
        recent.append(evaluation)
        self._changed.add(key)
        metrics.SHADOW_EVALUATIONS.labels(
            *key, str(evaluation.identical_text).lower(), str(evaluation.identical_output).lower()
        ).inc()
        summary = summarize(list(recent))
        for measure, value in summary.model_dump(exclude={"jobs"}).items():
            metrics.SHADOW_SUMMARY.labels(*key, measure).set(value)

    def due(self, now: float, *, force: bool = False) -> list[AdapterStatus]:
        """Statuses for the versions with new evaluations, once per `interval_s`."""
        if not self._changed or (now < self._next_report and not force):
            return []
        self._next_report = now + self.interval_s
        changed, self._changed = sorted(self._changed), set()
        return [
            AdapterStatus(
                name=name,
                version=version,
                state=AdapterState.SHADOW,
                worker=self.worker,
                evaluation=summarize(list(self._recent[(name, version)])),
                sha256=self._recent[(name, version)][-1].shadow.sha256,
                at_ms=int(time.time() * 1000),
            )
            for name, version in changed
        ]
