"""Crash isolation as control flow: a fake `run` that dies on chosen jobs, plain data only."""

from __future__ import annotations

import pytest

from workers.core.crashes import run_isolating_crashes
from workers.core.engine_api import EngineDied


class FlakyEngine:
    """Dies whenever a batch holds a poison job, or on the first `transient_deaths` calls."""

    def __init__(self, poison: set[int], transient_deaths: int = 0) -> None:
        self.poison = poison
        self.transient_deaths = transient_deaths
        self.calls: list[list[int]] = []
        self.restarts = 0

    def run(self, jobs: list[int]) -> list[int]:
        self.calls.append(jobs)
        if self.transient_deaths > 0 or self.poison & set(jobs):
            self.transient_deaths -= 1
            raise EngineDied("killed")
        return jobs

    def restart(self) -> None:
        self.restarts += 1


def served(outcomes: list[list[int]]) -> list[int]:
    return sorted(job for outcome in outcomes for job in outcome)


def test_healthy_batch_runs_once() -> None:
    engine = FlakyEngine(poison=set())
    guarded = run_isolating_crashes(list(range(8)), engine.run, engine.restart, 2)
    assert served(guarded.outcomes) == list(range(8))
    assert guarded.crashed == [] and engine.restarts == 0 and len(engine.calls) == 1


def test_one_off_death_restarts_once_and_serves_everyone() -> None:
    engine = FlakyEngine(poison=set(), transient_deaths=1)
    guarded = run_isolating_crashes(list(range(8)), engine.run, engine.restart, 2)
    assert served(guarded.outcomes) == list(range(8))
    assert guarded.crashed == [] and guarded.restarts == engine.restarts == 1


@pytest.mark.parametrize("poison", [0, 5, 7])
def test_poison_job_is_isolated_and_the_rest_served(poison: int) -> None:
    engine = FlakyEngine(poison={poison})
    guarded = run_isolating_crashes(list(range(8)), engine.run, engine.restart, 2)
    assert guarded.crashed == [poison]
    assert served(guarded.outcomes) == [j for j in range(8) if j != poison]
    # 8 → 4 → 2 → 1, then the single job once more: log2(8) + 2 deaths.
    assert engine.restarts == 5


def test_two_poison_jobs_in_one_batch() -> None:
    engine = FlakyEngine(poison={1, 6})
    guarded = run_isolating_crashes(list(range(8)), engine.run, engine.restart, 1)
    assert sorted(guarded.crashed) == [1, 6]
    assert served(guarded.outcomes) == [0, 2, 3, 4, 5, 7]


def test_a_job_alone_is_tried_crash_attempts_times() -> None:
    engine = FlakyEngine(poison={0})
    guarded = run_isolating_crashes([0], engine.run, engine.restart, 3)
    assert guarded.crashed == [0] and engine.calls == [[0], [0], [0]]


class RefusingEngine:
    """Raises a plain error (no death) whenever a batch holds a refused job."""

    def __init__(self, refused: set[int]) -> None:
        self.refused = refused
        self.restarts = 0

    def run(self, jobs: list[int]) -> list[int]:
        if self.refused & set(jobs):
            raise ValueError(f"refused {sorted(self.refused & set(jobs))}")
        return jobs

    def restart(self) -> None:
        self.restarts += 1


def test_a_job_that_raises_alone_fails_without_a_restart_and_the_rest_is_served() -> None:
    engine = RefusingEngine(refused={3, 4})
    guarded = run_isolating_crashes(list(range(8)), engine.run, engine.restart, 2)
    assert sorted(job for job, _ in guarded.failed) == [3, 4]
    assert all(isinstance(error, ValueError) for _, error in guarded.failed)
    assert served(guarded.outcomes) == [0, 1, 2, 5, 6, 7]
    assert guarded.crashed == [] and engine.restarts == 0


def test_a_set_that_already_died_starts_from_its_halves() -> None:
    # The engine loop's quarantine: every request in the engine died together, once.
    engine = FlakyEngine(poison={5})
    guarded = run_isolating_crashes(list(range(8)), engine.run, engine.restart, 2, died_once=True)
    assert served(guarded.outcomes) == [0, 1, 2, 3, 4, 6, 7]
    assert guarded.crashed == [5]
    assert engine.calls[0] == [0, 1, 2, 3]  # the whole set is never run again


def test_a_lone_job_that_already_died_counts_that_death() -> None:
    engine = FlakyEngine(poison={9})
    guarded = run_isolating_crashes([9], engine.run, engine.restart, 2, died_once=True)
    assert guarded.crashed == [9]
    assert engine.calls == [[9]]  # one more death makes crash_attempts=2
