"""The engine loop's depth and priorities, on a fake engine whose steps take longer the more
requests they hold (as this machine's CPU engine does), timed by a fake clock."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from tests.unit import test_engine_loop
from tests.unit.test_engine_loop import PIPELINE, FakeEngine
from workers.core.contracts import Job
from workers.core.engine_api import GenerationRequest
from workers.core.messages import SourceMessage
from workers.core.prepare import PreparedJob
from workers.engine.loop import EngineLoop

started = test_engine_loop.started  # the same fixture: loops stopped after each test
STEP_A, STEP_B = 0.008, 0.0003  # seconds per step, and per request in it
DEPTH = 64


class SlowingEngine(FakeEngine):
    """Each step advances the fake clock by a + b·(requests in it); records the requests per
    step and the priority each request was added with, by tenant."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.sizes: list[int] = []
        self.priorities: dict[str, list[int]] = {}
        self.quiet_added_at: dict[int, int] = {}  # a quiet job's number → steps run by then

    def add_request(self, request_id: str, request: GenerationRequest, priority: int = 0) -> None:
        super().add_request(request_id, request, priority)
        tenant = "quiet" if request.prompt_token_ids[0] == 0 else "flood"
        self.priorities.setdefault(tenant, []).append(priority)
        if tenant == "quiet":
            self.quiet_added_at[request.prompt_token_ids[1] - 1000] = len(self.sizes)

    def step(self):  # type: ignore[no-untyped-def]
        self.sizes.append(len(self.requests))
        self.now += STEP_A + STEP_B * len(self.requests)
        return super().step()


_offsets = iter(range(10**9))


def tenant_job(tenant: str, n: int) -> PreparedJob:
    tokens = [0 if tenant == "quiet" else 1, 1000 + n]  # never the fake's poison token
    return PreparedJob(
        job=Job(job_id=f"{tenant}-{n}", task="classify", input="x", tenant=tenant),
        pipeline=PIPELINE,
        source=SourceMessage("jobs.classify", 0, next(_offsets), b"k", b"{}", [], 0),
        # Lengths vary, so requests finish a few at a time and the engine is refilled each step.
        request=GenerationRequest(tokens, None, 8 + n % 17, temperature=0.0, seed=None),
        arrived_at=time.monotonic(),
        received_at_ms=0,
    )


def run(started: Callable[..., EngineLoop], *, quiet: bool) -> tuple[SlowingEngine, dict]:
    engine = SlowingEngine()
    trickle = iter(range(10**6))
    loop: EngineLoop | None = None

    submitted_at: set[int] = set()
    quiet_submitted: dict[int, int] = {}  # a quiet job's number → steps run when submitted

    def between_steps() -> None:
        # The quiet tenant: one job every fourth step, while the flood has a backlog.
        steps = len(engine.sizes)
        if quiet and loop is not None and steps and steps % 4 == 0 and steps not in submitted_at:
            submitted_at.add(steps)
            n = next(trickle)
            quiet_submitted[n] = steps
            loop.submit([tenant_job("quiet", n)])

    loop = started(
        engine,
        depth=DEPTH,
        between_steps=between_steps,
        clock=lambda: engine.now,
        latency_target_s=0.1,
    )
    loop.submit([tenant_job("flood", n) for n in range(4000)])
    deadline = time.monotonic() + 30
    while len(engine.sizes) < 350 and time.monotonic() < deadline:
        loop.outcomes()
        time.sleep(0.005)
    loop.stop(5)
    assert len(engine.sizes) >= 350
    return engine, quiet_submitted


def test_a_flood_alone_keeps_the_engine_full(started: Callable[..., EngineLoop]) -> None:
    engine, _ = run(started, quiet=False)
    assert min(engine.sizes[1:300]) == DEPTH


def test_a_quiet_tenant_beside_a_flood_gets_shorter_steps_and_goes_first(
    started: Callable[..., EngineLoop],
) -> None:
    engine, submitted = run(started, quiet=True)
    late = engine.sizes[200:300]
    # Fewer requests per step once the controller has seen steps of two sizes, but no fewer
    # than keep 95% of full depth's throughput: d / (a + b d) >= 0.95 * D / (a + b D).
    floor = 0.95 * DEPTH / (STEP_A + STEP_B * DEPTH) * STEP_A
    floor /= 1 - 0.95 * DEPTH / (STEP_A + STEP_B * DEPTH) * STEP_B
    assert max(late) < DEPTH
    # Requests finish a few per step (about DEPTH / 16): the engine dips that far below.
    assert int(floor) - DEPTH / 8 <= min(late) and statistics.median(late) >= int(floor)
    # A lower depth holds back the flood, never the quiet tenant: once it has jobs in the
    # engine (its first ones wait for room like any), each enters at the next step, even
    # while the engine drains to the lower depth.
    delays = [
        engine.quiet_added_at[n] - at for n, at in submitted.items() if n in engine.quiet_added_at
    ]
    assert len(delays) >= 50 and max(delays[5:]) <= 1, delays
    # Within the engine, the quiet tenant's requests are ranked before the flood's.
    # (0: its tenant has less than an equal share of the engine; 1: the others).
    assert set(engine.priorities["quiet"]) == {0}
    assert statistics.mean(engine.priorities["flood"]) > 0.95
