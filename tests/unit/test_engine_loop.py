"""The engine loop's crash quarantine and shadow admission, on a fake engine (the `Engine`
protocol) that dies as a marked prompt enters it, as the fault injection does vLLM's."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import pytest

from tests.unit.results import make_result
from workers.core.admission import Admission
from workers.core.config import PipelineConfig
from workers.core.contracts import Job, Result
from workers.core.engine_api import (
    AdapterHandle,
    EngineDied,
    Generation,
    GenerationRequest,
    MergedModel,
)
from workers.core.errors import JobError
from workers.core.messages import SourceMessage
from workers.core.prepare import PreparedJob
from workers.core.processing import Answered, Evaluated, Outcome, Unserved
from workers.engine.loop import EngineLoop, LoopLimits

POISON = 666  # a prompt holding this token kills the engine as it enters
PIPELINE = PipelineConfig(task="classify", prompt_template="{input}")
ADAPTER_A = AdapterHandle("a", "1", "/adapters/a", 1)
SHADOW_B = AdapterHandle("a", "2", "/adapters/a-2", 2)
ADAPTER_C = AdapterHandle("c", "1", "/adapters/c", 3)


class FakeEngine:
    """Finishes each request after `max_tokens` steps; dies adding a poisoned prompt. Its
    restart waits for `restarts_allowed` (set by default)."""

    max_model_len = 512

    def __init__(self, *, poison_kills_at_step: bool = False) -> None:
        self.poison_kills_at_step = poison_kills_at_step  # as vLLM may: at its first step
        self.requests: dict[str, GenerationRequest] = {}
        self.steps_left: dict[str, int] = {}
        self.dead = False
        self.died = threading.Event()
        self.restarts = 0
        self.restarts_allowed = threading.Event()
        self.restarts_allowed.set()
        self.deaths: list[list[tuple[int, ...]]] = []  # the prompts in the engine at each death
        self.adapters_per_step: list[set[int | None]] = []

    def _prompts(self) -> list[tuple[int, ...]]:
        return sorted(tuple(r.prompt_token_ids) for r in self.requests.values())

    def _die(self) -> None:
        self.deaths.append(self._prompts())
        self.requests.clear()
        self.steps_left.clear()
        self.dead = True
        self.died.set()
        raise EngineDied("killed")

    def _alive(self) -> None:
        if self.dead:
            raise EngineDied("dead")

    def add_request(self, request_id: str, request: GenerationRequest, priority: int = 0) -> None:
        self._alive()
        self.requests[request_id] = request
        self.steps_left[request_id] = request.max_tokens
        if POISON in request.prompt_token_ids and not self.poison_kills_at_step:
            self._die()

    def step(self) -> list[tuple[str, Generation]]:
        self._alive()
        if any(POISON in r.prompt_token_ids for r in self.requests.values()):
            self._die()
        self.adapters_per_step.append(
            {None if r.adapter is None else r.adapter.lora_id for r in self.requests.values()}
        )
        finished = []
        for request_id in list(self.requests):
            self.steps_left[request_id] -= 1
            if self.steps_left[request_id] <= 0:
                del self.requests[request_id], self.steps_left[request_id]
                finished.append((request_id, Generation("{}", 1, "stop")))
        return finished

    def abort_requests(self, request_ids: Sequence[str]) -> None:
        self._alive()
        for request_id in request_ids:
            self.requests.pop(request_id, None)
            self.steps_left.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        self._alive()
        return bool(self.requests)

    def restart(self) -> None:
        self.restarts_allowed.wait()
        self.restarts += 1
        self.dead = False
        self.died.clear()

    def serves_now(self, adapter: AdapterHandle | None) -> bool:
        return True

    def tokenize(self, prompt: str) -> list[int]:
        return [len(prompt)]

    def render_chat(
        self, messages: Sequence[Mapping[str, str]], chat_template: str | None
    ) -> list[int]:
        return [len(messages)]

    def register_adapter(self, adapter: AdapterHandle) -> None: ...

    def unregister_adapter(self, adapter: AdapterHandle) -> None: ...

    def pin_adapter(self, adapter: AdapterHandle) -> None: ...

    def resident_adapters(self) -> set[int]:
        return set()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        raise AssertionError("the engine loop feeds requests one at a time, never generate()")

    def switch_merged(self, merged: MergedModel) -> None: ...

    def close(self) -> None: ...


class LoadedCache:
    def ensure_loaded(self, adapters: Iterable[AdapterHandle | None]) -> dict[int, str]:
        return {}


class Checker:
    def check(self, job: PreparedJob, generation: Generation, admitted_at: float) -> Result:
        return make_result(job_id=job.job.job_id)


_offsets = iter(range(10**9))


def job(
    job_id: str,
    tokens: list[int],
    *,
    adapter: AdapterHandle | None = None,
    steps: int = 3,
    shadow: AdapterHandle | None = None,
) -> PreparedJob:
    request = GenerationRequest(tokens, adapter, max_tokens=steps, temperature=0.0, seed=None)
    return PreparedJob(
        job=Job(job_id=job_id, task="classify", input="x"),
        pipeline=PIPELINE,
        source=SourceMessage("jobs.classify", 0, next(_offsets), job_id.encode(), b"{}", [], 0),
        request=request,
        arrived_at=time.monotonic(),
        received_at_ms=0,
        shadow_request=None if shadow is None else GenerationRequest(tokens, shadow, 20, 0.0, None),
    )


def good(n: int) -> PreparedJob:
    return job(f"g{n}", [n])


def poison(job_id: str = "poison") -> PreparedJob:
    return job(job_id, [POISON])  # the same payload every time


@pytest.fixture
def started() -> Iterator[Callable[..., EngineLoop]]:
    loops: list[EngineLoop] = []

    def start(
        engine: FakeEngine,
        *,
        depth: int = 8,
        crash_attempts: int = 2,
        max_adapters: int | None = None,
        between_steps: Callable[[], None] | None = None,
        **new: Any,
    ) -> EngineLoop:
        limits = {"engine_depth": depth, "crash_attempts": crash_attempts, "stall_warning_s": 60}
        for name in ("max_restarts_per_minute", "latency_target_s", "min_throughput_share"):
            if name in new:
                limits[name] = new.pop(name)
        loop = EngineLoop(
            engine,
            LoadedCache(),
            Checker(),  # type: ignore[arg-type]
            Admission[PreparedJob](max_adapters=max_adapters),
            LoopLimits(**limits),
            restart_engine=engine.restart,
            on_unavailable=lambda _adapter, _reason: None,
            **new,
        )
        loop.start(between_steps)
        loops.append(loop)
        return loop

    yield start
    for loop in loops:
        loop.stop(5)


def collect(loop: EngineLoop, count: int, timeout_s: float = 10.0) -> list[Outcome]:
    """The next `count` outcomes, in the order the loop handed them out."""
    out: list[Outcome] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count and time.monotonic() < deadline:
        out += loop.outcomes()
        time.sleep(0.001)
    assert len(out) == count, " ".join(o.job.job.job_id for o in out)
    return out


def by_id(outcomes: list[Outcome]) -> dict[str, Outcome]:
    return {outcome.job.job.job_id: outcome for outcome in outcomes}


def crashed(outcome: Outcome) -> bool:
    return isinstance(outcome, Unserved) and outcome.rejection.code is JobError.ENGINE_CRASH


def test_isolation_finds_the_culprit_and_serves_the_rest(
    started: Callable[..., EngineLoop],
) -> None:
    engine = FakeEngine()
    loop = started(engine)
    loop.submit([good(0), good(1), good(2), poison(), *(good(n) for n in range(3, 20))])
    outcomes = by_id(collect(loop, 21))
    assert crashed(outcomes.pop("poison"))
    assert all(isinstance(o, Answered) for o in outcomes.values())
    # The job the engine died adding runs alone at once: one death with the others, then
    # crash_attempts alone; no bisection of the others through more deaths.
    assert len(engine.deaths) == 3 and engine.restarts == 3
    assert engine.deaths[1:] == [[(POISON,)], [(POISON,)]]


def test_a_death_at_the_first_step_of_a_job_points_at_the_jobs_added_before_it(
    started: Callable[..., EngineLoop],
) -> None:
    engine = FakeEngine(poison_kills_at_step=True)
    loop = started(engine, depth=4)
    # The poison enters as room frees, beside requests that already ran steps.
    loop.submit([*(job(f"g{n}", [n], steps=n + 2) for n in range(6)), poison()])
    outcomes = by_id(collect(loop, 7))
    assert crashed(outcomes.pop("poison"))
    assert all(isinstance(o, Answered) for o in outcomes.values())
    assert len(engine.deaths) == 3 and engine.deaths[1:] == [[(POISON,)], [(POISON,)]]


def test_a_death_in_a_step_splits_the_suspects_into_cohorts(
    started: Callable[..., EngineLoop],
) -> None:
    # With no job caught as the engine died, the suspects run apart in cohorts of a few.
    engine = FakeEngine()
    original_step = engine.step
    steps = 0

    def dying_step() -> list[tuple[str, Generation]]:
        nonlocal steps
        steps += 1
        if steps == 2:  # once, from outside, with all 16 requests in the engine
            engine._die()
        return original_step()

    engine.step = dying_step  # type: ignore[method-assign]
    loop = started(engine, depth=16)
    loop.submit(good(n) for n in range(16))
    outcomes = collect(loop, 16)
    assert all(isinstance(o, Answered) for o in outcomes)
    assert engine.restarts == 1
    assert max(len(adapters) for adapters in engine.adapters_per_step) == 1
    assert loop.stats.isolation_runs == 8  # 16 suspects in 8 cohorts of 2


def test_other_jobs_keep_flowing_while_suspects_are_isolated(
    started: Callable[..., EngineLoop],
) -> None:
    engine = FakeEngine()
    engine.restarts_allowed.clear()
    deaths_seen: list[int] = []
    loop = started(engine, between_steps=lambda: deaths_seen.append(len(engine.deaths)))
    loop.submit([good(0), good(1), poison()])
    assert engine.died.wait(5)
    later = [good(n) for n in range(100, 130)]
    loop.submit(later)  # arrive while the engine restarts
    engine.restarts_allowed.set()
    outcomes = collect(loop, 33)
    order = [o.job.job.job_id for o in outcomes]
    # Every job that arrived after the death is answered before the culprit is proven.
    assert max(order.index(j.job.job_id) for j in later) < order.index("poison")
    assert crashed(outcomes[-1]) and len(engine.deaths) == 3
    # Adapter updates (between_steps) ran between the deaths, not only before and after.
    assert any(0 < seen < len(engine.deaths) for seen in deaths_seen)


def test_suspects_count_as_running_so_a_shutdown_waits_for_them(
    started: Callable[..., EngineLoop],
) -> None:
    engine = FakeEngine()
    engine.restarts_allowed.clear()
    loop = started(engine)
    loop.submit([*(good(n) for n in range(6)), poison()])
    assert engine.died.wait(5)
    time.sleep(0.05)  # the loop is in the restart now
    assert loop.running() == 7 and loop.in_engine() >= 7
    # A shutdown gives back only the jobs waiting to enter; the suspects are served.
    loop.abort(lambda _job: True, waiting_only=True)
    engine.restarts_allowed.set()
    outcomes = by_id(collect(loop, 7))
    assert crashed(outcomes.pop("poison"))
    assert all(isinstance(o, Answered) for o in outcomes.values())
    deadline = time.monotonic() + 5
    while loop.in_engine() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert loop.running() == 0 and loop.unfinished() == 0


def test_suspects_running_apart_count_as_running(started: Callable[..., EngineLoop]) -> None:
    engine = FakeEngine()
    loops: list[EngineLoop] = []
    seen: list[tuple[int, int, int]] = []  # (deaths, running(), killers found) between steps

    def between_steps() -> None:
        if loops:
            seen.append((len(engine.deaths), loops[0].running(), loops[0].stats.killers))

    loops.append(started(engine, between_steps=between_steps))
    loops[0].submit([good(0), good(1), poison()])
    collect(loops[0], 3)
    during = [running for deaths, running, killers in seen if deaths and not killers]
    assert during and 0 not in during  # never an empty engine while a suspect is left


def test_a_repeat_of_a_proven_killer_is_dead_lettered_without_a_death(
    started: Callable[..., EngineLoop],
) -> None:
    engine = FakeEngine()
    loop = started(engine, depth=4)
    # The twin waits in admission behind a full engine when the first copy kills it.
    loop.submit([good(0), good(1), poison("p1"), *(good(n) for n in range(2, 12)), poison("p2")])
    outcomes = by_id(collect(loop, 14))
    assert crashed(outcomes["p1"]) and crashed(outcomes["p2"])
    assert len(engine.deaths) == 3
    repeat = outcomes["p2"]
    assert isinstance(repeat, Unserved) and "same payload" in repeat.rejection.message
    # Later, the same payload again: refused without entering the engine.
    loop.submit([poison("p3"), good(99)])
    later = by_id(collect(loop, 2))
    assert crashed(later["p3"]) and isinstance(later["g99"], Answered)
    assert len(engine.deaths) == 3 and engine.restarts == 3


def test_restarts_are_budgeted_per_minute(started: Callable[..., EngineLoop]) -> None:
    now = [1000.0]
    engine = FakeEngine()
    loop = started(engine, crash_attempts=3, max_restarts_per_minute=2, clock=lambda: now[0])
    loop.submit([good(0), good(1), poison()])
    outcomes = by_id(collect(loop, 3))
    # Two restarts, then a third death: the budget is spent, so the suspect left (the poison,
    # after two deaths alone of the three it would need) is given up, not restarted for.
    assert engine.restarts == 2 and len(engine.deaths) == 3
    given_up = outcomes["poison"]
    assert crashed(given_up) and "max_restarts_per_minute" in given_up.rejection.message
    assert isinstance(outcomes["g0"], Answered) and isinstance(outcomes["g1"], Answered)
    loop.submit([good(5)])
    time.sleep(0.3)
    assert loop.outcomes() == [] and engine.restarts == 2  # no restart until the budget returns
    now[0] += 61
    assert isinstance(collect(loop, 1)[0], Answered)
    assert engine.restarts == 3


def test_shadow_runs_wait_for_a_free_adapter_slot(started: Callable[..., EngineLoop]) -> None:
    engine = FakeEngine()
    loop = started(engine, max_adapters=2)
    loop.submit(
        [
            job("a-short", [1], adapter=ADAPTER_A, steps=2, shadow=SHADOW_B),
            job("a-long", [2], adapter=ADAPTER_A, steps=30),
            job("c-long", [3], adapter=ADAPTER_C, steps=30),
        ]
    )
    outcomes = collect(loop, 4)
    assert sum(isinstance(o, Evaluated) for o in outcomes) == 1  # the shadow ran, later
    assert max(len(adapters) for adapters in engine.adapters_per_step) <= 2
