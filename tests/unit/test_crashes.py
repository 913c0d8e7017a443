"""Crash quarantine as a state machine on plain data: suspects, cohorts and turns, twins,
convictions, the restart budget and the memory of payloads that kill the engine."""

from __future__ import annotations

from workers.core.crashes import (
    SPLIT,
    KnownKillers,
    Quarantine,
    RestartBudget,
    fingerprint,
)
from workers.core.engine_api import AdapterHandle, GenerationRequest


class Job:
    """A job whose payload is `payload` (the same payload: the same fingerprint)."""

    def __init__(self, name: str, payload: str | None = None) -> None:
        self.name = name
        self.payload = payload or name

    def __repr__(self) -> str:
        return self.name


def quarantine(crash_attempts: int = 2) -> Quarantine[Job]:
    return Quarantine(crash_attempts, 10.0, lambda job: job.payload, risky_wait_s=60.0)


def run_turn(q: Quarantine[Job], now: float = 0.0) -> list[Job]:
    """The next turn's jobs, all run to the end."""
    turn = q.due(now, others_waiting=False)
    assert turn is not None
    q.begin(turn)
    jobs = list(turn.jobs)
    for job in jobs:
        q.release(job)
    assert q.on_turn is None
    return jobs


def test_the_job_caught_as_the_engine_died_stands_alone_and_the_rest_runs_first() -> None:
    q = quarantine()
    a, b, c, p = Job("a"), Job("b"), Job("c"), Job("p")
    assert not q.suspect([a, b, c, p], [p], now=0.0)
    assert len(q) == 4
    assert run_turn(q) == [a, b, c]  # the mild cohort first, in one turn
    turn = q.due(0.0, others_waiting=False)
    assert turn is not None and turn.jobs == [p] and turn.risky
    q.begin(turn)
    assert not q.died([p], now=1.0)  # one death alone: crash_attempts is 2
    turn = q.due(1.0, others_waiting=False)
    assert turn is not None
    q.begin(turn)
    convictions = q.died([p], now=2.0)
    assert convictions.killers == [p] and len(q) == 0


def test_the_jobs_whose_first_step_died_run_alone() -> None:
    q = quarantine()
    jobs = [Job(str(n)) for n in range(10)]
    q.suspect(jobs, jobs[7:], now=0.0)  # added since the last step that ran
    turns = [run_turn(q) for _ in range(4)]
    assert turns == [jobs[:7], [jobs[7]], [jobs[8]], [jobs[9]]]


def test_with_nothing_caught_the_suspects_are_split_into_cohorts() -> None:
    q = quarantine()
    jobs = [Job(str(n)) for n in range(32)]
    q.suspect(jobs, [], now=0.0)
    sizes = []
    while q:
        sizes.append(len(run_turn(q)))
    assert sizes == [32 // SPLIT] * SPLIT


def test_a_cohort_that_dies_apart_is_split_again_until_the_killer_stands_alone() -> None:
    q = quarantine(crash_attempts=1)
    jobs = [Job(str(n)) for n in range(64)]
    killer = jobs[37]
    q.suspect(jobs, [], now=0.0)
    deaths = 0
    while q:
        turn = q.due(0.0, others_waiting=False)
        assert turn is not None
        if killer in turn.jobs:
            q.begin(turn)
            deaths += 1
            convictions = q.died([], now=0.0)
        else:
            run_turn(q)
    assert convictions.killers == [killer]
    assert deaths == 2  # 64 → 8 → 1: a death per level, not one per halving (6)


def test_risky_cohorts_wait_for_a_quiet_moment_and_turns_never_follow_each_other() -> None:
    q = quarantine()
    a, p = Job("a"), Job("p")
    q.suspect([a, p], [p], now=0.0)
    assert q.due(5.0, others_waiting=True) is None  # others wait, the mild cohort is fresh
    turn = q.due(10.0, others_waiting=True)  # waited mild_wait_s: its turn
    assert turn is not None and turn.jobs == [a]
    q.begin(turn)
    q.release(a)
    assert q.due(11.0, others_waiting=True) is None  # the others get the engine first
    q.others_ran()
    assert q.due(30.0, others_waiting=True) is None  # a risky one waits longer...
    assert q.due(30.0, others_waiting=False) is not None  # ...or for a quiet moment


def test_a_quiet_moment_that_ends_before_the_turn_begins_gives_the_engine_back() -> None:
    q = quarantine()
    q.suspect([Job("p")], [], now=0.0)
    assert q.due(1.0, others_waiting=False) is not None  # the engine starts to empty...
    assert q.due(2.0, others_waiting=True) is None  # ...others arrive: they go first


def test_the_risky_wait_is_bounded() -> None:
    q = quarantine()
    q.suspect([Job("p")], [], now=0.0)
    assert q.due(59.0, others_waiting=True) is None
    assert q.due(60.0, others_waiting=True) is not None


def test_twins_wait_beside_a_suspect_and_share_its_verdict() -> None:
    q = quarantine(crash_attempts=1)
    p, g = Job("p", "kill"), Job("g", "fine")
    q.suspect([g, p], [p], now=0.0)
    twin, other_twin, stranger = Job("p2", "kill"), Job("g2", "fine"), Job("x", "other")
    assert q.adopt(twin) and q.adopt(other_twin) and not q.adopt(stranger)
    assert q.twins() == 2
    turn = q.due(0.0, others_waiting=False)
    assert turn is not None and turn.jobs == [g]
    q.begin(turn)
    assert q.release(g) == [other_twin]  # the same payload ran to the end: it may run too
    turn = q.due(0.0, others_waiting=False)
    assert turn is not None
    q.begin(turn)
    convictions = q.died([p], now=0.0)
    assert convictions.killers == [p] and convictions.repeats == [twin]
    assert q.twins() == 0 and len(q) == 0


def test_suspects_with_the_caught_jobs_payload_wait_beside_it_and_are_convicted_with_it() -> None:
    q = quarantine(crash_attempts=1)
    p1, p2, g = Job("p1", "kill"), Job("p2", "kill"), Job("g")
    q.suspect([g, p2, p1], [p1], now=0.0)  # p1 caught; p2, its payload, waits as its twin
    assert len(q) == 2 and q.twins() == 1
    turn = q.due(0.0, others_waiting=False)
    assert turn is not None and turn.jobs == [g]  # without p2: no second death with g in it
    q.begin(turn)
    q.release(g)
    turn = q.due(1.0, others_waiting=False)
    assert turn is not None and turn.jobs == [p1]
    q.begin(turn)
    convictions = q.died([p1], now=1.0)
    assert convictions.killers == [p1] and convictions.repeats == [p2]
    assert len(q) == 0 and q.twins() == 0


def test_one_payload_among_suspects_runs_once_even_when_nothing_is_caught() -> None:
    q = quarantine()
    copies = [Job(f"p{n}", "kill") for n in range(4)]
    others = [Job(f"g{n}") for n in range(12)]
    q.suspect([*others[:6], *copies, *others[6:]], [], now=0.0)
    assert len(q) == 13 and q.twins() == 3
    cohorts = []
    while (turn := q.due(0.0, others_waiting=False)) is not None:
        q.begin(turn)
        cohorts.append(turn.jobs)
        for job in list(turn.jobs):
            q.release(job)
    ran = [job for jobs in cohorts for job in jobs]
    assert sum(job.payload == "kill" for job in ran) == 1
    # The copy that ran to the end cleared the payload: its twins wait as usual again.
    assert q.twins() == 0


def test_withdrawing_twins_only_keeps_the_suspects() -> None:
    q = quarantine()
    a, b = Job("a"), Job("b")
    q.suspect([a, b], [], now=0.0)
    twin = Job("a2", "a")
    q.adopt(twin)
    assert q.withdraw(lambda _job: True, suspects=False) == [twin]
    assert len(q) == 2
    assert sorted(map(repr, q.withdraw(lambda job: job is a, suspects=True))) == ["a"]
    assert list(q) == [b]


def test_twins_of_a_withdrawn_suspect_go_back_to_waiting() -> None:
    q = quarantine()
    a = Job("a")
    q.suspect([a, Job("b")], [], now=0.0)
    twin = Job("a2", "a")
    q.adopt(twin)
    q.withdraw(lambda job: job is a, suspects=True)
    assert q.orphans() == [twin] and q.twins() == 0


def test_giving_up_returns_every_suspect_and_twin() -> None:
    q = quarantine()
    a, b, p = Job("a"), Job("b"), Job("p")
    q.suspect([a, b, p], [p], now=0.0)
    twin = Job("p2", "p")
    q.adopt(twin)
    turn = q.due(0.0, others_waiting=False)
    assert turn is not None
    q.begin(turn)
    suspects, twins = q.give_up()
    assert sorted(map(repr, suspects)) == ["a", "b", "p"] and twins == [twin]
    assert len(q) == 0 and q.on_turn is None


def test_restart_budget_is_a_sliding_minute() -> None:
    budget = RestartBudget(per_minute=2)
    assert budget.allows(0.0)
    budget.spend(0.0)
    budget.spend(10.0)
    assert not budget.allows(59.0) and budget.returns_in(59.0) == 1.0
    assert budget.allows(60.0)
    budget.spend(60.0)
    assert not budget.allows(69.0) and budget.allows(70.0)


def test_known_killers_are_forgotten_after_a_while_and_bounded() -> None:
    killers = KnownKillers(memory_s=100.0, size=2)
    killers.remember("a", 0.0)
    assert killers.knows("a", 99.0) and not killers.knows("a", 100.0)
    for key, at in [("x", 200.0), ("y", 201.0), ("z", 202.0)]:
        killers.remember(key, at)
    assert not killers.knows("x", 203.0) and killers.knows("z", 203.0)


def test_fingerprint_is_the_payload() -> None:
    adapter = AdapterHandle("tone", "1", "/a", 7, sha256="abc")
    request = GenerationRequest([1, 2, 3], adapter, 32, 0.0, 1)
    same = GenerationRequest([1, 2, 3], adapter, 32, 0.0, 1)
    assert fingerprint(request) == fingerprint(same)
    others = [
        GenerationRequest([1, 2, 4], adapter, 32, 0.0, 1),
        GenerationRequest([1, 2, 3], None, 32, 0.0, 1),
        GenerationRequest([1, 2, 3], AdapterHandle("tone", "2", "/b", 8), 32, 0.0, 1),
        GenerationRequest([1, 2, 3], adapter, 64, 0.0, 1),
        GenerationRequest([1, 2, 3], adapter, 32, 0.5, 1),
        GenerationRequest([1, 2, 3], adapter, 32, 0.0, 2),
        GenerationRequest([1, 2, 3], adapter, 32, 0.0, 1, {"type": "object"}),
    ]
    assert len({fingerprint(r) for r in [request, *others]}) == len(others) + 1
