"""The engine loop: one thread owns the engine and feeds it continuously.

vLLM's `LLM.generate` is a loop of `add_request` and `step`; this is that loop, kept running:
jobs are admitted (`workers.core.admission`) whenever requests finish and room frees, each
finished request is checked (`workers.core.processing`) and handed out at once, so a job never
waits for the slowest request of a batch. vLLM's client is not thread-safe: only this thread
calls the engine, and adapter loads, unloads, updates and restarts run here too, between steps
(`between_steps`).

Depth: how many requests are kept in the engine is `workers.core.depth`'s call: full depth
(`max_num_seqs` and a few ready beyond), less while a quiet tenant's jobs share the engine with
a backlog. Requests waiting inside the engine carry a priority (a tenant below an equal share
of the engine first). With merged turns (`workers.engine.merge_turns`), a dominant adapter is
merged into the weights in place and only its jobs enter until the others' turn.

Other threads talk to it through `submit`, `outcomes`, `abort` and `stop`. A job submitted here
comes out exactly once, as an `Answered` or `Unserved` outcome, unless it is aborted first.

Shadow runs: a job whose adapter has a shadow version (`PreparedJob.shadow_request`) runs on
it after its answer is out, compared with that answer (`Evaluated`). They wait in their own
queue and enter only room no job is waiting for, within `shadow_share` of the engine's depth.

Engine deaths: every request in the engine dies together. They become suspects
(`workers.core.crashes`): the engine is restarted (at most `max_restarts_per_minute` times a
minute) and the suspects run apart from the other jobs in small cohorts, on turns between which
the loop keeps admitting, aborting and running `between_steps`. A job that kills the engine on
its own `crash_attempts` times comes out as `engine_crash`, and so does any repeat of its payload
(waiting beside it, or arriving within the hour); every other job is served.

Words: a *request* is in the engine; a job *waits* in admission (or, beside a suspect with its
payload, as a *twin*); a job is *owed* an outcome from `submit` until `outcomes` hands it over;
a job *holds* the adapter versions it still needs (`holding`).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import structlog

from workers import metrics
from workers.core.admission import Admission, AdmissionPolicy
from workers.core.contracts import Result
from workers.core.crashes import (
    Cohort,
    Convictions,
    KnownKillers,
    Quarantine,
    RestartBudget,
    fingerprint,
)
from workers.core.depth import DepthController
from workers.core.engine_api import AdapterHandle, Engine, EngineDied, Generation
from workers.core.errors import JobError, JobRejected
from workers.core.messages import traced
from workers.core.prepare import PreparedJob
from workers.core.processing import (
    AdapterLoader,
    Answered,
    Evaluated,
    Outcome,
    OutputChecker,
    Unserved,
)
from workers.engine.merge_turns import MergeTurns

log = structlog.get_logger(__name__)

IDLE_WAIT_S = 0.05  # with nothing in the engine, wake at least this often for housekeeping
CONTENTION_HOLD_S = 1.0  # how long a quiet tenant's contention keeps the depth lowered


class EngineLoopFailed(Exception):
    """The loop thread stopped on an error it cannot serve past (the engine cannot restart)."""


@dataclass(frozen=True)
class LoopLimits:
    engine_depth: int  # requests kept in the engine: its max_num_seqs and a few ready beyond
    crash_attempts: int
    stall_warning_s: float
    shadow_share: float = 0.25  # of engine_depth, at most, for shadow runs
    shadow_max_waiting: int = 2000  # shadow runs beyond this are skipped
    max_restarts_per_minute: int = 6  # beyond, the suspects are given up (engine_crash)
    engine_slots: int | None = None  # requests a step runs (max_num_seqs); None: the depth
    latency_target_s: float = 1.0  # a request's time in the engine, when depth can buy it
    min_throughput_share: float = 0.95  # of full depth's, kept whatever the latency target

    @property
    def shadow_depth(self) -> int:
        return max(1, int(self.engine_depth * self.shadow_share))


@dataclass
class LoopStats:
    steps: int = 0
    engine_restarts: int = 0
    finished: int = 0  # requests that finished in the engine
    isolation_runs: int = 0  # suspect cohorts run apart
    killers: int = 0  # jobs convicted of killing the engine


class _Request(NamedTuple):
    job: PreparedJob
    admitted_at: float
    apart: bool  # a suspect running apart, on its cohort's turn
    admitted_step: int  # the loop's step count when it entered


def _payload(job: PreparedJob) -> str:
    return fingerprint(job.request)


class EngineLoop:
    def __init__(
        self,
        engine: Engine,
        cache: AdapterLoader,
        checker: OutputChecker,
        admission: Admission[PreparedJob],
        limits: LoopLimits,
        *,
        restart_engine: Callable[[], None],
        on_unavailable: Callable[[AdapterHandle, str], None],
        switch_model: Callable[[AdapterHandle | None], None] | None = None,
        merge_turns: MergeTurns | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._cache = cache
        self._checker = checker
        self._admission = admission
        self._shadows = Admission[PreparedJob](policy=AdmissionPolicy.ARRIVAL)
        self._limits = limits
        self._restart_engine = restart_engine
        self._on_unavailable = on_unavailable
        self._switch_model = switch_model
        self._turns = merge_turns
        self._clock = clock
        self._between_steps: Callable[[], None] | None = None
        self._quarantine = Quarantine[PreparedJob](
            limits.crash_attempts, admission.max_wait_s, _payload
        )
        self._killers = KnownKillers()
        self._budget = RestartBudget(limits.max_restarts_per_minute)
        self._depth = DepthController(
            limits.engine_depth,
            limits.latency_target_s,
            limits.min_throughput_share,
            limits.engine_slots,
        )
        self.stats = LoopStats()
        # Shared with other threads, under the lock.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[PreparedJob] = []
        self._outbox: list[Outcome] = []
        self._aborts: list[tuple[Callable[[PreparedJob], bool], bool]] = []
        self._holding: Counter[Hashable] = Counter()  # adapter key -> jobs owed that need it
        self._owed = 0  # jobs submitted whose outcome has not been taken (shadows aside)
        self._shadow_runs = 0  # shadow runs not out yet
        self._failure: BaseException | None = None
        self._stopping = False
        # Written by the loop thread, read by any: suspects not in the engine now.
        self._suspects_out = 0
        # The loop thread's own.
        self._requests: dict[str, _Request] = {}
        self._adapters_in_engine: Counter[Hashable] = Counter()  # requests per adapter key
        self._tenants_in_engine: Counter[str | None] = Counter()  # requests per tenant
        self._quiet: set[str | None] = set()  # tenants in the engine not part of a backlog
        self._contended_until = 0.0  # a quiet tenant shared the engine with a backlog lately
        self._adding: PreparedJob | None = None  # the job whose request is being added
        self._fresh: list[PreparedJob] = []  # added since the engine's last step
        self._apart: Cohort[PreparedJob] | None = None  # the cohort running apart now
        self._engine_down = False  # dead, and not restarted yet (the budget is spent)
        self._busy_since = (0.0, 0)  # (when, requests finished before) of the busy period
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # --- any thread ----------------------------------------------------------------------------

    def start(self, between_steps: Callable[[], None] | None = None) -> None:
        """`between_steps` runs on the loop thread between engine steps (adapter updates)."""
        self._between_steps = between_steps
        self._thread.start()

    def submit(self, jobs: Iterable[PreparedJob]) -> None:
        jobs = list(jobs)
        if not jobs:
            return
        holds = [key for job in jobs for key in job.holds]
        with self._lock:
            self._inbox.extend(jobs)
            self._holding.update(holds)
            self._owed += len(jobs)
        self._wake.set()

    def outcomes(self) -> list[Outcome]:
        """Jobs finished since the last call; raises if the loop has failed."""
        with self._lock:
            out, self._outbox = self._outbox, []
            self._owed -= sum(not isinstance(outcome, Evaluated) for outcome in out)
            failure = self._failure
        if failure is not None and not out:
            raise EngineLoopFailed(str(failure)) from failure
        return out

    def unfinished(self) -> int:
        """Jobs submitted whose outcome has not been taken by `outcomes` yet (or aborted)."""
        with self._lock:
            return self._owed

    def shadow_runs(self) -> int:
        """Shadow runs waiting or in the engine."""
        with self._lock:
            return self._shadow_runs

    def holding(self) -> set[Hashable]:
        """Adapter keys some submitted job still needs: a version leaves the engine only when
        none holds it."""
        with self._lock:
            return {key for key, count in self._holding.items() if count > 0}

    def abort(
        self, predicate: Callable[[PreparedJob], bool], *, waiting_only: bool = False
    ) -> None:
        """Drop the matching jobs without an outcome: those waiting to enter the engine, and
        (unless `waiting_only`) those in it and the suspects of an engine death, aborted at the
        next step boundary. Jobs submitted later are not affected."""
        with self._lock:
            kept = [job for job in self._inbox if not predicate(job)]
            self._drop([job for job in self._inbox if predicate(job)])
            self._inbox = kept
            self._aborts.append((predicate, waiting_only))
        self._wake.set()

    def running(self) -> int:
        """Requests in the engine now, plus the suspects of an engine death still to run apart
        and their twins: they were in the engine (or are settled with those that were), and are
        served like its requests."""
        return len(self._requests) + self._suspects_out

    def in_engine(self) -> int:
        """`running()`, plus one per abort not applied yet (it may reach more)."""
        with self._lock:
            pending = len(self._aborts)
        return self.running() + pending

    def stop(self, timeout_s: float) -> None:
        """Abort what is still in the engine and end the thread."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # --- the loop thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                try:
                    self._housekeeping()
                    if self._engine_down:
                        self._restart_if_allowed()
                    if not self._engine_down:
                        self._feed()
                    if self._requests:
                        self._step()
                    else:
                        self._wake.wait(IDLE_WAIT_S)
                        self._wake.clear()
                except EngineDied as death:
                    if self._stopping:
                        break  # the engine is being closed under us
                    self._after_death(death)
                finally:
                    self._count_suspects()
            self._abort_all()
        except BaseException as exc:  # handed to the owner through outcomes()
            log.exception("engine_loop_failed")
            with self._lock:
                self._failure = exc

    def _housekeeping(self) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, []
        for predicate, waiting_only in aborts:
            self._apply_abort(predicate, waiting_only)
        with self._lock:
            arrived, self._inbox = self._inbox, []
        now = self._clock()
        for job in arrived:
            if self._killers and self._killers.knows(_payload(job), now):
                self._emit(Unserved(job, self._repeat_rejection()))
            elif not (self._quarantine and self._quarantine.adopt(job)):
                self._admission.add(job)
        if self._between_steps is not None and not self._engine_down:
            self._between_steps()  # adapter updates need a live engine
        metrics.ADMISSION_WAITING.set(len(self._admission))

    def _apply_abort(self, predicate: Callable[[PreparedJob], bool], waiting_only: bool) -> None:
        dropped = self._admission.discard(predicate) + self._shadows.discard(predicate)
        dropped += self._quarantine.withdraw(predicate, suspects=not waiting_only)
        self._requeue_all(self._quarantine.orphans())
        requests = {} if waiting_only else self._requests
        ids = [rid for rid, request in requests.items() if predicate(request.job)]
        if ids:
            self._engine.abort_requests(ids)
        for rid in ids:
            dropped.append(self._leave(rid).job)
        self._end_turn_if_over()
        with self._lock:
            self._drop(dropped)
        if dropped:
            log.info("jobs_aborted", waiting=len(dropped) - len(ids), in_engine=len(ids))

    def _feed(self) -> None:
        """Admit waiting jobs; or, on a suspect cohort's turn, empty the engine of the others
        and run the cohort apart."""
        if self._apart is not None:
            return  # a cohort runs apart: nothing joins it
        turn = None
        if self._quarantine:
            turn = self._quarantine.due(self._clock(), others_waiting=bool(self._admission))
        if turn is None:
            if self._turns is None or self._tier_settled():
                self._admit()
        elif not self._requests:  # the others are out: its turn
            self._quarantine.begin(turn)
            self._apart = turn
            self.stats.isolation_runs += 1
            log.info("suspects_run_apart", jobs=len(turn.jobs), risky=turn.risky)
            self._enter(list(turn.jobs), apart=True)
            self._end_turn_if_over()

    def _tier_settled(self) -> bool:
        """Merged turns: whether the engine serves in the tier wanted now. If not, admission
        stops until the engine is empty, then it switches (`workers.engine.merge_turns`)."""
        assert self._turns is not None
        if self._quarantine:
            return True  # suspects run in the tier they died in; no switch meanwhile
        drain = self._drain_s()
        now = self._clock()
        if not self._turns.decide(now, self._admission, self._adapters_in_engine, drain):
            return True
        if self._requests:
            return False
        self._turns.switch(self._engine, self._admission)
        return True

    def _drain_s(self) -> float:
        """About how long the engine takes to empty if nothing more enters: the youngest
        request's steps left (a request takes `steps_per_request` on average) at the last
        steps' pace (merged steps are faster than LoRA ones)."""
        if not self._requests:
            return 0.0
        youngest = max(request.admitted_step for request in self._requests.values())
        left = max(1.0, self._depth.steps_per_request - (self.stats.steps - youngest))
        return left * self._depth.recent_step_s

    def _admit(self) -> None:
        room = self._target_depth() - len(self._requests)
        if self._quiet:
            # A lower depth holds back the backlog, never a quiet tenant's jobs: they enter
            # (fair admission takes them first) while the engine drains to the new depth.
            quiet = sum(self._admission.waiting_of(tenant) for tenant in self._quiet)
            room = max(room, min(quiet, self._limits.engine_depth - len(self._requests)))
        now = self._clock()
        admits = None if self._turns is None else self._turns.admits
        jobs = self._admission.take(now, room, self._adapters_in_engine, admits=admits)
        if self._switch_model is not None:
            jobs = self._servable_now(jobs)
        if not self._admission and len(jobs) < room and self._shadows:
            # Room no job is waiting for, within the shadows' share of the engine, and within
            # the engine's adapter slots (max_loras): a shadow waits rather than add one more.
            in_engine = sum(
                request.job.shadow_of is not None for request in self._requests.values()
            )
            shadow_room = min(room - len(jobs), self._limits.shadow_depth - in_engine)
            busy = self._adapters_in_engine + Counter(job.adapter_key for job in jobs)
            jobs += self._shadows.take(
                now, shadow_room, busy, slots=self._admission.max_adapters, admits=admits
            )
        if not jobs:
            return
        self._quarantine.others_ran()
        if not self._requests:  # an event per busy period, not per step
            log.info("engine_running", admitting=len(jobs), waiting=len(self._admission))
            self._busy_since = (self._clock(), self.stats.finished)
        self._enter(jobs, apart=False)

    def _enter(self, jobs: list[PreparedJob], *, apart: bool) -> None:
        """Add `jobs`' requests to the engine. Should it die meanwhile, those not in it yet wait
        again (suspects stay in their cohort)."""
        try:
            unavailable = self._cache.ensure_loaded(job.adapter for job in jobs)
        except EngineDied:
            if not apart:
                self._requeue_all(jobs)
            raise
        reported: set[Hashable] = set()
        for taken, job in enumerate(jobs, start=1):
            if job.adapter is not None and job.adapter_key in unavailable:
                reason = unavailable[job.adapter.lora_id]
                if job.adapter_key not in reported:
                    reported.add(job.adapter_key)
                    self._on_unavailable(job.adapter, reason)
                self._settle(job, Unserved(job, JobRejected(JobError.ADAPTER_UNAVAILABLE, reason)))
                continue
            try:
                self._add(job, apart)
            except EngineDied:
                if not apart:
                    self._requeue_all(jobs[taken:])
                raise

    def _servable_now(self, jobs: list[PreparedJob]) -> list[PreparedJob]:
        """A merged engine serves one adapter version. Jobs routed to another one (a new
        version announced meanwhile) wait until the engine is empty, then it switches to
        theirs: no job is served by a version other than the one it was routed to."""
        later = [job for job in jobs if not self._engine.serves_now(job.adapter)]
        if not later:
            return jobs
        now = [job for job in jobs if self._engine.serves_now(job.adapter)]
        if now or self._requests or self._quarantine:  # suspects run on the current version
            for job in later:
                self._admission.add(job)
            return now
        target = later[0].adapter
        try:
            assert self._switch_model is not None
            self._switch_model(target)
        except EngineDied:
            for job in later:
                self._admission.add(job)
            raise
        except Exception as exc:  # the new version cannot be served merged: say so per job
            reason = f"switching the merged engine: {exc}"
            log.error("merged_switch_failed", error=str(exc))
            if target is not None:
                self._on_unavailable(target, reason)
            for job in later:
                self._emit(Unserved(job, JobRejected(JobError.ADAPTER_UNAVAILABLE, reason)))
            return []
        servable = [job for job in later if self._engine.serves_now(job.adapter)]
        for job in later:
            if not self._engine.serves_now(job.adapter):
                self._admission.add(job)
        return servable

    def _add(self, job: PreparedJob, apart: bool) -> None:
        request_id = str(next(self._ids))
        # Requests beyond max_num_seqs wait inside the engine for a slot: a tenant below an
        # equal share of the engine goes first (0), so a quiet tenant's job is not queued
        # behind a flood's; the rest (1) keep arrival order, so none is overtaken for ever.
        tenants = sum(count > 0 for count in self._tenants_in_engine.values())
        below_share = self._tenants_in_engine[job.tenant] * max(1, tenants) < len(self._requests)
        priority = 0 if below_share or not self._requests else 1
        # In the engine before the call: if the engine dies under it, it died with it.
        self._requests[request_id] = _Request(job, self._clock(), apart, self.stats.steps)
        self._adapters_in_engine[job.adapter_key] += 1
        self._tenants_in_engine[job.tenant] += 1
        self._adding = job  # should the engine die now, it was caught adding this one
        try:
            self._engine.add_request(request_id, job.request, priority)
        except EngineDied:
            raise
        except Exception as exc:  # this request alone (vLLM refused it): dead-letter it
            self._adding = None
            log.exception("request_refused", job_id=job.job.job_id, **traced(job.source))
            self._leave(request_id)
            self._settle(job, Unserved(job, JobRejected.internal(exc)))
            return
        self._adding = None
        self._fresh.append(job)
        metrics.ENGINE_REQUESTS.set(len(self._requests))

    def _step(self) -> None:
        started = self._clock()
        stepped = len(self._requests)
        finished = self._engine.step()
        self._fresh.clear()
        elapsed = self._clock() - started
        self.stats.steps += 1
        self._depth.observe_step(stepped, elapsed)
        metrics.ENGINE_STEP_SECONDS.observe(elapsed)
        if elapsed >= self._limits.stall_warning_s:
            log.warning(
                "engine_step_stalled", step_s=round(elapsed, 2), requests=len(self._requests)
            )
        for request_id, generation in finished:
            if request_id not in self._requests:
                continue  # aborted meanwhile
            request = self._leave(request_id)
            self._depth.observe_finished(self.stats.steps - request.admitted_step)
            self.stats.finished += 1
            if request.apart:  # it ran to the end: cleared
                self._requeue_all(self._quarantine.release(request.job))
            self._handle_output(request.job, generation, request.admitted_at)
        self._end_turn_if_over()
        self._note_contention()
        if finished and not self._requests:
            began, finished_before = self._busy_since
            log.info(
                "engine_idle",
                finished=self.stats.finished - finished_before,
                busy_s=round(self._clock() - began, 3),
            )
        if self._requests and not finished and not self._engine.has_unfinished_requests():
            # The engine forgot requests we think it holds: run them again rather than wait
            # (suspects on their cohort's turn again).
            log.error("engine_lost_requests", requests=len(self._requests))
            self._requeue_all([r.job for r in self._requests.values() if not r.apart])
            self._leave_all()
            self._apart = None
        metrics.ENGINE_REQUESTS.set(len(self._requests))

    def _leave(self, request_id: str) -> _Request:
        """`request_id` is out of the engine (finished, aborted or refused)."""
        request = self._requests.pop(request_id)
        self._adapters_in_engine[request.job.adapter_key] -= 1
        self._tenants_in_engine[request.job.tenant] -= 1
        return request

    def _leave_all(self) -> None:
        self._requests.clear()
        self._adapters_in_engine.clear()
        self._tenants_in_engine.clear()

    def _target_depth(self) -> int:
        """Full depth, unless a quiet tenant's jobs would run in steps made slower by a
        backlog they are not part of (`workers.core.depth`)."""
        depth = self._depth.depth(contended=self._clock() < self._contended_until)
        metrics.ENGINE_DEPTH.set(depth)
        return depth

    def _note_contention(self) -> None:
        """After a step: jobs wait (a backlog), and some tenant in the engine is not part of
        it, *quiet*: what it has waiting is under a quarter of what it has in the engine (fair
        admission takes its jobs first). Tenants sharing a backlog evenly are not quiet: less
        depth would not help them. Contention holds for `CONTENTION_HOLD_S` after it was last
        seen, so the depth does not swing with every quiet job that comes and goes."""
        waiting = self._admission.waiting_of
        self._quiet = {
            tenant
            for tenant, count in self._tenants_in_engine.items()
            if count > 0 and 4 * waiting(tenant) < count
        }
        if self._admission and self._quiet:
            self._contended_until = self._clock() + CONTENTION_HOLD_S

    def _end_turn_if_over(self) -> None:
        if self._apart is not None and self._quarantine.on_turn is not self._apart:
            log.info("suspects_cleared", waiting=len(self._quarantine))
            self._apart = None

    def _requeue(self, job: PreparedJob) -> None:
        """Back to waiting for admission: a retry, a routed classifier pass, a job that could
        not enter the engine, or a twin whose suspect was cleared."""
        (self._admission if job.shadow_of is None else self._shadows).add(job)

    def _requeue_all(self, jobs: Iterable[PreparedJob]) -> None:
        for job in jobs:
            self._requeue(job)

    def _handle_output(self, job: PreparedJob, generation: Generation, admitted_at: float) -> None:
        """A request finished: check its output and hand out the job's outcome, or requeue it
        (a retry, or its classifier pass routed it)."""
        try:
            checked = self._checker.check(job, generation, admitted_at)
        except JobRejected as rejection:  # the adapter its classifier pass chose cannot serve
            self._emit(Unserved(job, rejection))
            return
        except Exception as exc:  # this job's answer alone is lost, as internal_error
            log.exception("result_failed", job_id=job.job.job_id, **traced(job.source))
            self._emit(Unserved(job, JobRejected.internal(exc)))
            return
        if isinstance(checked, PreparedJob):
            if checked.holds != job.holds:  # routed by its classifier pass
                with self._lock:
                    self._holding.update(checked.holds)
                    self._release([job])
            self._requeue(checked)  # still owed, still holding
        elif job.shadow_of is not None:
            self._emit(Evaluated(job, checked))
        else:
            self._spawn_shadow(job, checked)
            self._emit(Answered(job, checked))

    def _spawn_shadow(self, job: PreparedJob, result: Result) -> None:
        shadow = job.as_shadow_run(result)
        if shadow is None:
            return
        if len(self._shadows) >= self._limits.shadow_max_waiting:
            metrics.SHADOW_SKIPPED.labels(job.pipeline.task).inc()
            return
        with self._lock:
            self._holding.update(shadow.holds)
            self._shadow_runs += 1
        self._shadows.add(shadow)

    def _settle(self, job: PreparedJob, outcome: Outcome) -> None:
        """`job` is answered without running: a suspect among them is no longer one."""
        self._requeue_all(self._quarantine.release(job))
        self._emit(outcome)

    def _emit(self, outcome: Outcome) -> None:
        job = outcome.job
        if job.shadow_of is not None and isinstance(outcome, Unserved):
            # A shadow run that failed: only its evaluation is lost.
            log.warning("shadow_run_failed", job_id=job.job.job_id, code=outcome.rejection.code)
            metrics.SHADOW_FAILED.labels(job.pipeline.task).inc()
            with self._lock:
                self._drop([job])
            return
        with self._lock:
            self._outbox.append(outcome)
            self._release([job])
            if job.shadow_of is not None:
                self._shadow_runs -= 1

    def _release(self, jobs: list[PreparedJob]) -> None:
        """Under the lock: these jobs no longer hold their adapters."""
        for job in jobs:
            for key in job.holds:
                self._holding[key] -= 1
                if self._holding[key] <= 0:
                    del self._holding[key]

    def _drop(self, jobs: list[PreparedJob]) -> None:
        """Under the lock: these jobs leave without an outcome."""
        self._release(jobs)
        shadows = sum(job.shadow_of is not None for job in jobs)
        self._shadow_runs -= shadows
        self._owed -= len(jobs) - shadows

    def _abort_all(self) -> None:
        if not self._requests:
            return
        log.warning("requests_abandoned", requests=len(self._requests))
        with contextlib.suppress(EngineDied):  # a dead engine has nothing left to abort
            self._engine.abort_requests(list(self._requests))
        self._leave_all()

    def _count_suspects(self) -> None:
        apart = 0 if self._apart is None else len(self._apart.jobs)  # those are requests
        # Twins too: some died in the engine beside their suspect, and the rest are settled
        # with it.
        quarantined = len(self._quarantine) + self._quarantine.twins()
        self._suspects_out = max(0, quarantined - apart)

    # --- engine deaths (the loop thread, or `between_steps` on it) -------------------------------

    def recover(self, death: EngineDied) -> None:
        """After `death` met outside the loop's own calls (`between_steps`): what was in the
        engine becomes suspects, and the engine is restarted before this returns (waiting, if
        the restart budget is spent, until it allows one)."""
        self._after_death(death)
        while self._engine_down and not self._stopping:
            self._restart_if_allowed()
            if self._engine_down:
                time.sleep(IDLE_WAIT_S)
        self._count_suspects()

    def _after_death(self, death: EngineDied) -> None:
        died = [request.job for request in self._requests.values()]
        # Counted as suspects before they leave the requests: a shutdown waiting on running()
        # never sees a passing zero.
        self._suspects_out += len(died)
        apart = self._apart is not None
        # What the death points at: the job it came in adding, or those whose first step died.
        fresh = {id(job) for job in self._fresh}
        caught = [self._adding] if self._adding else [j for j in died if id(j) in fresh]
        self._adding = None
        self._fresh.clear()
        self._leave_all()
        self._apart = None
        self._engine_down = True
        if self._turns is not None:
            self._turns.engine_restarted()  # it comes back in LoRA mode
        now = self._clock()
        if apart:
            convictions = self._quarantine.died(caught, now)
        else:
            convictions = self._quarantine.suspect(died, caught, now)
            # Jobs waiting with a suspect's payload wait beside it, out of the engine.
            for twin in self._admission.discard(self._quarantine.resembles):
                self._quarantine.adopt(twin)
        log.error(
            "engine_died",
            requests=len(died),
            apart=apart,
            suspects=len(self._quarantine),
            error=str(death),
        )
        self._convict(convictions, now)
        if not self._budget.allows(now):
            self._give_up(now)
        self._count_suspects()

    def _convict(self, convictions: Convictions[PreparedJob], now: float) -> None:
        for job in convictions.killers:
            log.error("engine_killer_found", job_id=job.job.job_id, **traced(job.source))
            self._killers.remember(_payload(job), now)
            self.stats.killers += 1
            self._emit(Unserved(job, self._killer_rejection()))
        for job in convictions.repeats:
            self._emit(Unserved(job, self._repeat_rejection()))

    def _give_up(self, now: float) -> None:
        """The restart budget is spent: no suspect runs again; the engine restarts once the
        budget allows."""
        suspects, twins = self._quarantine.give_up()
        log.error(
            "restart_budget_spent",
            suspects=len(suspects),
            restart_in_s=round(self._budget.returns_in(now), 1),
        )
        rejection = JobRejected(
            JobError.ENGINE_CRASH,
            f"the engine died more than {self._limits.max_restarts_per_minute} times within a "
            "minute (engine.max_restarts_per_minute), this job in it: not run again",
        )
        for job in suspects:
            self._emit(Unserved(job, rejection))
        self._requeue_all(twins)

    def _restart_if_allowed(self) -> None:
        now = self._clock()
        if not self._budget.allows(now):
            return
        self._budget.spend(now)
        metrics.ENGINE_RESTARTS.inc()
        self._restart_engine()
        self.stats.engine_restarts += 1
        self._engine_down = False

    def _killer_rejection(self) -> JobRejected:
        return JobRejected(
            JobError.ENGINE_CRASH,
            f"the engine died {self._limits.crash_attempts} times running this job alone",
        )

    def _repeat_rejection(self) -> JobRejected:
        return JobRejected(
            JobError.ENGINE_CRASH,
            "the same payload (prompt, adapter and sampling parameters) killed the engine "
            "running alone: not run again",
        )
