"""The engine loop's merged turns (`workers.engine.merge_turns`), on a fake engine that merges
one adapter in place only when empty, timed by a fake clock."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tests.unit import test_engine_loop
from tests.unit.test_engine_loop import PIPELINE, FakeEngine, collect
from workers.core.contracts import Job
from workers.core.engine_api import (
    AdapterHandle,
    AdapterLoadError,
    EngineNotEmpty,
    Generation,
    GenerationRequest,
)
from workers.core.messages import SourceMessage
from workers.core.prepare import PreparedJob
from workers.core.processing import Answered, Outcome
from workers.core.tiering import TierPolicy
from workers.engine.loop import EngineLoop
from workers.engine.merge_turns import MergeTurns

started = test_engine_loop.started  # the same fixture: loops stopped after each test
FLOOD = AdapterHandle("flood", "1", "/adapters/flood", 1)
OTHER = AdapterHandle("other", "1", "/adapters/other", 2)
STEP_S = 0.01  # fake seconds per step
MAX_WAIT_S = 0.3


class MergingEngine(FakeEngine):
    """Merges one adapter in place, refusing while requests are in it; records, per step, the
    merged adapter and the adapters of the requests stepped. Its probe answers (`generate`)
    differ merged from LoRA when `disagrees`."""

    def __init__(
        self,
        *,
        disagrees: bool = False,
        die_merged_at_step: int | None = None,
        busy_merges: int = 0,
        failing_unmerges: int = 0,
    ) -> None:
        super().__init__()
        self.busy_merges = busy_merges  # merges answered "not empty" first
        self.failing_unmerges = failing_unmerges  # unmerges that fail first
        self.now = 0.0
        self.merged: AdapterHandle | None = None
        self.merges = 0
        self.disagrees = disagrees
        self.die_merged_at_step = die_merged_at_step
        self.steps: list[tuple[str | None, set[str | None]]] = []
        self.added_at: dict[tuple[int, ...], float] = {}

    def merge(self, adapter: AdapterHandle) -> float:
        if self.requests:
            raise AdapterLoadError("requests in the engine")
        if self.busy_merges:
            self.busy_merges -= 1
            raise EngineNotEmpty("an abort not applied yet")
        self.merged = adapter
        self.merges += 1
        return 0.0

    def unmerge(self) -> float:
        if self.requests:
            raise AdapterLoadError("requests in the engine")
        if self.failing_unmerges:
            self.failing_unmerges -= 1
            raise AdapterLoadError("the weights could not be put back")
        self.merged = None
        return 0.0

    @property
    def merged_adapter(self) -> AdapterHandle | None:
        return self.merged

    def serves_now(self, adapter: AdapterHandle | None) -> bool:
        return self.merged is None or adapter == self.merged

    def add_request(self, request_id: str, request: GenerationRequest, priority: int = 0) -> None:
        super().add_request(request_id, request, priority)
        self.added_at[tuple(request.prompt_token_ids)] = self.now

    def step(self) -> list[tuple[str, Generation]]:
        merged = None if self.merged is None else self.merged.name
        names = {None if r.adapter is None else r.adapter.name for r in self.requests.values()}
        self.steps.append((merged, names))
        if merged is not None and len(self.steps) == self.die_merged_at_step:
            self.merged = None  # a restart comes back unmerged
            self._die()
        self.now += STEP_S
        return super().step()

    def restart(self) -> None:
        super().restart()
        self.merged = None

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        shift = "merged " if self.merged is not None and self.disagrees else ""
        return [Generation(f"{shift}{r.prompt_token_ids}", 1, "stop") for r in requests]


_ids = iter(range(10**9))


def adapter_job(adapter: AdapterHandle | None, engine: MergingEngine) -> PreparedJob:
    n = next(_ids)
    name, lora_id = ("base", 0) if adapter is None else (adapter.name, adapter.lora_id)
    return PreparedJob(
        job=Job(job_id=f"{name}-{n}", task="classify", input="x"),
        pipeline=PIPELINE,
        source=SourceMessage("jobs.classify", 0, n, b"k", b"{}", [], 0),
        request=GenerationRequest([lora_id, 1000 + n], adapter, 5, 0.0, None),
        arrived_at=engine.now,  # the loop's clock
        received_at_ms=0,
    )


def run(
    started: Callable[..., EngineLoop], engine: MergingEngine, *, flood: int, others: int
) -> tuple[EngineLoop, dict[str, float], list[Outcome]]:
    """`flood` jobs of one adapter at once, and `others` of another, one every few steps."""
    turns = MergeTurns(
        TierPolicy(share=0.8, sustain_s=0.02, others_max_wait_s=MAX_WAIT_S, min_backlog=16),
        check_jobs=8,
    )
    loop: EngineLoop | None = None
    arrived: dict[str, float] = {}
    submitted_at: set[int] = set()

    def between_steps() -> None:
        steps = len(engine.steps)
        if loop is None or steps % 3 or steps in submitted_at or len(submitted_at) >= others:
            return
        submitted_at.add(steps)
        job = adapter_job(OTHER if len(submitted_at) % 2 else None, engine)  # None: base model
        arrived[job.job.job_id] = engine.now
        loop.submit([job])

    loop = started(
        engine, depth=32, between_steps=between_steps, clock=lambda: engine.now, merge_turns=turns
    )
    loop.submit([adapter_job(FLOOD, engine) for _ in range(flood)])
    outcomes = collect(loop, flood + others, timeout_s=30)
    return loop, arrived, outcomes


def test_a_dominant_adapter_runs_merged_in_turns_and_the_others_wait_their_bound(
    started: Callable[..., EngineLoop],
) -> None:
    engine = MergingEngine()
    _, arrived, outcomes = run(started, engine, flood=600, others=40)
    assert all(isinstance(o, Answered) for o in outcomes)
    assert engine.merges >= 2  # merged, back to LoRA for the others, merged again
    merged_steps = [names for merged, names in engine.steps if merged is not None]
    assert len(merged_steps) > len(engine.steps) / 2
    # While merged, nothing but the merged adapter's requests is in the engine.
    assert all(names == {"flood"} for names in merged_steps)
    # Each other job entered within its bound, plus a few steps of draining.
    waits = [
        engine.added_at[
            (OTHER.lora_id if j.startswith("other") else 0, int(j.split("-")[1]) + 1000)
        ]
        - at
        for j, at in arrived.items()
    ]
    assert max(waits) <= MAX_WAIT_S + 6 * STEP_S


def test_answers_that_disagree_merged_keep_the_adapter_on_lora(
    started: Callable[..., EngineLoop],
) -> None:
    engine = MergingEngine(disagrees=True)
    run(started, engine, flood=300, others=10)
    assert engine.merges == 1  # merged for the check, never again
    assert all(merged is None for merged, _ in engine.steps)


def test_an_engine_death_while_merged_comes_back_on_lora_and_serves_every_job(
    started: Callable[..., EngineLoop],
) -> None:
    engine = MergingEngine(die_merged_at_step=40)
    loop, _, outcomes = run(started, engine, flood=400, others=20)
    assert engine.restarts == loop.stats.engine_restarts == 1
    # The first step after the restart ran unmerged, and every job was answered.
    assert engine.steps[39][0] == "flood" and engine.steps[40][0] is None
    assert all(isinstance(o, Answered) for o in outcomes)


def test_a_merge_refused_for_requests_still_in_the_engine_is_tried_again(
    started: Callable[..., EngineLoop],
) -> None:
    engine = MergingEngine(busy_merges=3)
    _, _, outcomes = run(started, engine, flood=300, others=5)
    assert engine.busy_merges == 0 and engine.merges >= 1  # postponed, not refused
    assert all(isinstance(o, Answered) for o in outcomes)


def test_an_unmerge_that_fails_restarts_the_engine_on_its_original_weights(
    started: Callable[..., EngineLoop],
) -> None:
    engine = MergingEngine(failing_unmerges=1)
    loop, _, outcomes = run(started, engine, flood=600, others=40)
    assert engine.failing_unmerges == 0
    assert engine.restarts == loop.stats.engine_restarts == 1
    assert all(isinstance(o, Answered) for o in outcomes)
