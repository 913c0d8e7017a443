"""Engine deaths: a batch whose engine died is bisected until the job that kills it stands alone.

A dead engine is restarted (same adapters) and the batch's halves are run again; a half that
runs is done, a half that kills the engine is split again. A job that kills the engine alone
`crash_attempts` times is given up on, to be dead-lettered as `engine_crash`, while every other
job of its batch is still served. A one-off death (the engine-core process killed from outside)
costs one restart and two half-size calls.

Any other exception from `run` (a request the engine refuses, a bug met by one job's data) is
bisected the same way without a restart: the job that raises on its own is given up on, to be
dead-lettered as `internal_error`, and the rest of its batch is served.

Pure control flow: `run` and `restart` are passed in, so this is tested with plain data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import structlog

from workers.core.engine_api import EngineDied

log = structlog.get_logger(__name__)

J = TypeVar("J")
R = TypeVar("R")


@dataclass
class Guarded(Generic[J, R]):
    outcomes: list[R] = field(default_factory=list)
    crashed: list[J] = field(default_factory=list)  # jobs that killed the engine on their own
    failed: list[tuple[J, Exception]] = field(default_factory=list)  # raised on their own
    restarts: int = 0


def run_isolating_crashes(
    batch: list[J],
    run: Callable[[list[J]], R],
    restart: Callable[[], None],
    crash_attempts: int,
    *,
    died_once: bool = False,
) -> Guarded[J, R]:
    """`died_once`: `batch` already killed the engine once (and it was restarted): start from
    its halves."""
    guarded: Guarded[J, R] = Guarded()
    # (jobs, engine deaths these exact jobs caused); a stack keeps the bisection depth-first.
    pending: list[tuple[list[J], int]] = []
    if died_once:
        _after_death(batch, 1, crash_attempts, pending, guarded)
    else:
        pending.append((batch, 0))
    while pending:
        jobs, deaths = pending.pop()
        try:
            guarded.outcomes.append(run(jobs))
            continue
        except EngineDied as exc:
            deaths += 1
            log.error("engine_died", jobs=len(jobs), deaths=deaths, error=str(exc))
            restart()
            guarded.restarts += 1
        except Exception as exc:
            if len(jobs) == 1:
                log.exception("job_failed", error=f"{type(exc).__name__}: {exc}")
                guarded.failed.append((jobs[0], exc))
                continue
            log.warning("batch_failed", jobs=len(jobs), error=f"{type(exc).__name__}: {exc}")
        _after_death(jobs, deaths, crash_attempts, pending, guarded)
    return guarded


def _after_death(
    jobs: list[J],
    deaths: int,
    crash_attempts: int,
    pending: list[tuple[list[J], int]],
    guarded: Guarded[J, R],
) -> None:
    """Split what failed; a lone job runs again until it has killed the engine enough times."""
    if len(jobs) > 1:
        middle = len(jobs) // 2
        pending.append((jobs[middle:], 0))
        pending.append((jobs[:middle], 0))
    elif deaths < crash_attempts:
        pending.append((jobs, deaths))
    else:
        guarded.crashed.append(jobs[0])
