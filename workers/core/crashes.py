"""Engine deaths: the jobs that were in a dead engine become suspects, run apart in small
cohorts until the job that kills it stands alone, while every other job keeps flowing.
Pure logic, no I/O: the engine loop (`workers.engine.loop`) runs the cohorts.

After a death, what was in the engine is split into cohorts. The jobs the death points at
(`caught`: the one the engine died adding, or those added since its last step, whose first
step was the one that died) stand alone (in `split` cohorts if more), the rest form one
cohort; with nothing to point at, the set is split into `split` cohorts. A cohort runs alone
in the engine on its turn; one that runs to the end is cleared (its jobs are answered as
usual); one that dies is split again, its jobs now `risky`. A job that kills the engine running
alone `crash_attempts` times is convicted: it is dead-lettered as `engine_crash`, and so is
every job with the same payload (`fingerprint`) among the suspects or waiting beside them.

Turns: a cohort runs when no other job waits for the engine, or once it has waited `mild_wait_s`
(`risky_wait_s` for a risky one: a job that probably kills the engine waits for a quiet moment,
so a restart costs the others little); and never twice in a row while other jobs wait.

A job with the same payload as a suspect (a twin) waits beside it rather than enter the engine:
a repeated poison costs no extra death. So do the jobs of one payload that died together: one
of them stays a suspect (one the death points at, if any), the others are its twins.
`KnownKillers` remembers convicted payloads for a while, so a repeat arriving later is
dead-lettered at once. `RestartBudget` bounds engine restarts per minute.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from workers.core.engine_api import GenerationRequest

J = TypeVar("J")

SPLIT = 8  # cohorts a set of suspects is split into when nothing points at one of them
RISKY_WAIT_S = 60.0  # a risky cohort waits at most this long for a quiet moment
RESTART_WINDOW_S = 60.0
KILLER_MEMORY_S = 3600.0  # how long a convicted payload is remembered
KILLER_MEMORY_SIZE = 1000  # at most this many payloads are remembered


def fingerprint(request: GenerationRequest) -> str:
    """What makes two requests the same payload to the engine: the prompt's tokens, the adapter
    version and the sampling parameters."""
    adapter = request.adapter
    document = [
        request.prompt_token_ids,
        None if adapter is None else [adapter.engine_name, adapter.lora_id],
        request.max_tokens,
        request.temperature,
        request.seed,
        request.json_schema,
    ]
    encoded = json.dumps(document, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()


@dataclass(eq=False)
class Cohort(Generic[J]):
    jobs: list[J]
    since: float  # when it became a cohort: its wait for a turn starts then
    risky: bool  # a death pointed at it: caught as the engine died, or died running apart
    solo_deaths: int = 0  # deaths its one job caused running alone


@dataclass
class Convictions(Generic[J]):
    killers: list[J] = field(default_factory=list)  # killed the engine alone crash_attempts times
    repeats: list[J] = field(default_factory=list)  # twins of a killer: the same payload

    def __bool__(self) -> bool:
        return bool(self.killers or self.repeats)


class Quarantine(Generic[J]):
    def __init__(
        self,
        crash_attempts: int,
        mild_wait_s: float,
        fingerprint: Callable[[J], Hashable],
        *,
        risky_wait_s: float = RISKY_WAIT_S,
        split: int = SPLIT,
    ) -> None:
        self.crash_attempts = crash_attempts
        self.mild_wait_s = mild_wait_s
        self.risky_wait_s = risky_wait_s
        self.split = max(2, split)
        self._fingerprint = fingerprint
        self._cohorts: list[Cohort[J]] = []
        self._prints: Counter[Hashable] = Counter()  # suspects' fingerprints
        self._twins: dict[Hashable, list[J]] = {}
        self.on_turn: Cohort[J] | None = None  # the cohort running (or about to) apart
        self._others_ran = True  # other jobs entered the engine since the last turn

    def __len__(self) -> int:
        """Suspects: jobs that died in the engine and have not been cleared or convicted."""
        return sum(len(cohort.jobs) for cohort in self._cohorts)

    def __iter__(self) -> Iterator[J]:
        for cohort in self._cohorts:
            yield from cohort.jobs

    def twins(self) -> int:
        return sum(len(jobs) for jobs in self._twins.values())

    # --- deaths ----------------------------------------------------------------------------

    def suspect(self, died: list[J], caught: Sequence[J], now: float) -> Convictions[J]:
        """The engine died in the normal flow with `died` in it; `caught`, those of them the
        death points at."""
        return self._implicate(died, caught, now, solo_deaths=0, risky=False)

    def died(self, caught: Sequence[J], now: float) -> Convictions[J]:
        """The engine died running the cohort on turn (and nothing else)."""
        cohort = self.on_turn
        if cohort is None:
            return Convictions()
        self._end_turn()
        self._cohorts.remove(cohort)
        for job in cohort.jobs:
            self._prints[self._fingerprint(job)] -= 1
        return self._implicate(cohort.jobs, caught, now, cohort.solo_deaths, risky=True)

    def _implicate(
        self, jobs: list[J], caught: Sequence[J], now: float, solo_deaths: int, *, risky: bool
    ) -> Convictions[J]:
        pointed_ids = {id(job) for job in caught}
        jobs = self._one_per_payload(jobs, pointed_ids)
        for job in jobs:
            self._prints[self._fingerprint(job)] += 1
        convictions: Convictions[J] = Convictions()
        pointed = [job for job in jobs if id(job) in pointed_ids]
        if len(jobs) == 1:
            deaths = solo_deaths + 1
            if deaths >= self.crash_attempts:
                self._convict(jobs[0], convictions)
            else:
                self._cohorts.append(Cohort(jobs, now, risky=True, solo_deaths=deaths))
        elif 0 < len(pointed) < len(jobs):
            self._split(pointed, now, risky=True, parts=len(pointed))  # alone, if they are few
            rest = [job for job in jobs if id(job) not in pointed_ids]
            self._cohorts.append(Cohort(rest, now, risky=False))
        else:
            self._split(jobs, now, risky=risky)
        self._clean()
        return convictions

    def _one_per_payload(self, jobs: list[J], pointed_ids: set[int]) -> list[J]:
        """Of the jobs that died with one payload, one stays a suspect (one the death points
        at, if any); the others wait beside it as twins, as do jobs whose payload is a suspect
        already. A repeated poison that died among others costs no extra death."""
        chosen: dict[Hashable, J] = {}
        for job in sorted(jobs, key=lambda j: id(j) not in pointed_ids):  # stable: pointed first
            key = self._fingerprint(job)
            if self._prints[key] <= 0:
                chosen.setdefault(key, job)
        kept = []
        for job in jobs:
            key = self._fingerprint(job)
            if chosen.get(key) is job:
                kept.append(job)
            else:
                self._twins.setdefault(key, []).append(job)
        return kept

    def _split(self, jobs: list[J], now: float, *, risky: bool, parts: int | None = None) -> None:
        parts = min(self.split, parts or len(jobs))
        for part in range(parts):
            self._cohorts.append(Cohort(jobs[part::parts], now, risky=risky))

    def _convict(self, job: J, convictions: Convictions[J]) -> None:
        """`job` killed the engine alone: it goes, with every suspect and twin of its payload."""
        key = self._fingerprint(job)
        convictions.killers.append(job)
        for cohort in self._cohorts:
            same = [j for j in cohort.jobs if self._fingerprint(j) == key]
            cohort.jobs = [j for j in cohort.jobs if self._fingerprint(j) != key]
            convictions.repeats += same
        convictions.repeats += self._twins.pop(key, [])
        del self._prints[key]

    # --- turns -----------------------------------------------------------------------------

    def due(self, now: float, *, others_waiting: bool) -> Cohort[J] | None:
        """The cohort to run apart now, if any: the engine empties of other jobs, then
        `begin`. Asked again at each step meanwhile, so a quiet moment that ends (others
        waiting again) gives the engine back to them."""
        if self.on_turn is not None:
            return self.on_turn
        if others_waiting and not self._others_ran:
            return None  # the others get the engine between two turns
        ranked = sorted(self._cohorts, key=lambda c: (c.risky, c.since))
        for cohort in ranked:
            wait = self.risky_wait_s if cohort.risky else self.mild_wait_s
            if not others_waiting or now - cohort.since >= wait:
                return cohort
        return None

    def begin(self, cohort: Cohort[J]) -> None:
        """`cohort` runs apart now, until its jobs are released or it dies."""
        self.on_turn = cohort
        self._others_ran = False

    def others_ran(self) -> None:
        """Other jobs entered the engine: the next turn may come."""
        self._others_ran = True

    def release(self, job: J) -> list[J]:
        """`job` is no longer a suspect: it ran to the end apart (or was answered without
        running). Returns the twins its payload no longer keeps waiting."""
        for cohort in self._cohorts:
            if any(j is job for j in cohort.jobs):
                cohort.jobs = [j for j in cohort.jobs if j is not job]
                break
        else:
            return []
        key = self._fingerprint(job)
        self._prints[key] -= 1
        self._clean()
        return self._twins.pop(key, []) if self._prints[key] <= 0 else []

    # --- twins, aborts, giving up ----------------------------------------------------------

    def resembles(self, job: J) -> bool:
        """`job` has the payload of a suspect."""
        return self._prints[self._fingerprint(job)] > 0

    def adopt(self, job: J) -> bool:
        """Keep `job` beside the suspect it resembles, if any."""
        key = self._fingerprint(job)
        if self._prints[key] <= 0:
            return False
        self._twins.setdefault(key, []).append(job)
        return True

    def withdraw(self, predicate: Callable[[J], bool], *, suspects: bool) -> list[J]:
        """Remove the matching twins, and (with `suspects`) the matching suspects."""
        removed: list[J] = []
        for key, jobs in list(self._twins.items()):
            removed += [job for job in jobs if predicate(job)]
            self._twins[key] = [job for job in jobs if not predicate(job)]
        if suspects:
            for cohort in self._cohorts:
                gone = [job for job in cohort.jobs if predicate(job)]
                for job in gone:
                    self._prints[self._fingerprint(job)] -= 1
                cohort.jobs = [job for job in cohort.jobs if not predicate(job)]
                removed += gone
        self._clean()
        return removed

    def orphans(self) -> list[J]:
        """Twins whose suspects all left (withdrawn): they wait for the engine as usual."""
        lonely = [key for key in self._twins if self._prints[key] <= 0]
        return [job for key in lonely for job in self._twins.pop(key)]

    def give_up(self) -> tuple[list[J], list[J]]:
        """Every suspect (to dead-letter) and every twin (to wait as usual): no more restarts."""
        suspects = list(self)
        twins = [job for jobs in self._twins.values() for job in jobs]
        self._cohorts.clear()
        self._twins.clear()
        self._prints.clear()
        self._end_turn()
        return suspects, twins

    def _clean(self) -> None:
        self._cohorts = [cohort for cohort in self._cohorts if cohort.jobs]
        self._twins = {key: jobs for key, jobs in self._twins.items() if jobs}
        if self.on_turn is not None and not self.on_turn.jobs:
            self._end_turn()
        for key in [key for key, count in self._prints.items() if count <= 0]:
            del self._prints[key]

    def _end_turn(self) -> None:
        self.on_turn = None


class KnownKillers:
    """Payloads proven to kill the engine, remembered for `memory_s` (at most `size`)."""

    def __init__(self, memory_s: float = KILLER_MEMORY_S, size: int = KILLER_MEMORY_SIZE) -> None:
        self.memory_s = memory_s
        self.size = size
        self._proven: OrderedDict[Hashable, float] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._proven)

    def remember(self, key: Hashable, now: float) -> None:
        self._proven[key] = now
        self._proven.move_to_end(key)
        while len(self._proven) > self.size:
            self._proven.popitem(last=False)

    def knows(self, key: Hashable, now: float) -> bool:
        while self._proven:
            oldest, at = next(iter(self._proven.items()))
            if now - at < self.memory_s:
                break
            del self._proven[oldest]
        return key in self._proven


class RestartBudget:
    """At most `per_minute` engine restarts in any minute: never a tight restart loop."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._times: deque[float] = deque()

    def allows(self, now: float) -> bool:
        while self._times and now - self._times[0] >= RESTART_WINDOW_S:
            self._times.popleft()
        return len(self._times) < self.per_minute

    def spend(self, now: float) -> None:
        self._times.append(now)

    def returns_in(self, now: float) -> float:
        """Seconds until a restart is allowed again."""
        if self.allows(now):
            return 0.0
        return self._times[0] + RESTART_WINDOW_S - now
