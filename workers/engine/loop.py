"""The engine loop: one thread owns the engine and feeds it continuously.

vLLM's `LLM.generate` is a loop of `add_request` and `step`; this is that loop, kept running:
jobs are admitted (`workers.core.admission`) whenever requests finish and room frees, each
finished request is checked (`workers.core.processing`) and handed out at once, so a job never
waits for the slowest request of a batch. vLLM's client is not thread-safe: only this thread
calls the engine, and adapter loads, unloads, updates and restarts run here too, between steps
(`between_steps`).

Other threads talk to it through `submit`, `outcomes`, `abort` and `stop`. A job submitted here
comes out exactly once, as an `Answered` or `Unserved` outcome, unless it is aborted first.

Shadow runs: a job whose adapter has a shadow version (`PreparedJob.shadow_request`) runs on
it after its answer is out, compared with that answer (`Evaluated`). They wait in their own
queue and enter only room no job is waiting for, within `shadow_share` of the engine's depth.

Engine deaths: every request in the engine dies together. The loop stops admitting, restarts
the engine and runs the dead set again in halves (`workers.core.crashes`): a job that kills the
engine on its own `crash_attempts` times comes out as `engine_crash`, every other one is served.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import structlog

from workers import metrics
from workers.core.admission import Admission, AdmissionPolicy
from workers.core.contracts import Result
from workers.core.crashes import run_isolating_crashes
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

log = structlog.get_logger(__name__)

IDLE_WAIT_S = 0.05  # with nothing in the engine, wake at least this often for housekeeping


class EngineLoopFailed(Exception):
    """The loop thread stopped on an error it cannot serve past (the engine cannot restart)."""


@dataclass(frozen=True)
class LoopLimits:
    engine_depth: int  # requests kept in the engine, about its max_num_seqs
    crash_attempts: int
    stall_warning_s: float
    shadow_share: float = 0.25  # of engine_depth, at most, for shadow runs
    shadow_max_waiting: int = 2000  # shadow runs beyond this are skipped

    @property
    def shadow_depth(self) -> int:
        return max(1, int(self.engine_depth * self.shadow_share))


@dataclass
class LoopStats:
    steps: int = 0
    engine_restarts: int = 0
    finished: int = 0


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
        self._between_steps: Callable[[], None] | None = None
        self._crash_rejection = JobRejected(
            JobError.ENGINE_CRASH,
            f"the engine died {limits.crash_attempts} times running this job alone",
        )
        self.stats = LoopStats()
        # Shared with other threads, under the lock.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[PreparedJob] = []
        self._outbox: list[Outcome] = []
        self._aborts: list[tuple[Callable[[PreparedJob], bool], bool]] = []
        self._holding: Counter[Hashable] = Counter()  # adapter key -> jobs not yet out
        self._unfinished = 0
        self._shadow_runs = 0  # shadow runs not out yet
        self._failure: BaseException | None = None
        self._stopping = False
        # The loop thread's own.
        self._running: dict[str, tuple[PreparedJob, float]] = {}
        self._in_engine: Counter[Hashable] = Counter()
        self._busy_since = (0.0, 0)  # (when, jobs finished before) of the current busy period
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
        with self._lock:
            self._inbox.extend(jobs)
            for job in jobs:
                self._holding.update(job.holds)
            self._unfinished += len(jobs)
        self._wake.set()

    def outcomes(self) -> list[Outcome]:
        """Jobs finished since the last call; raises if the loop has failed."""
        with self._lock:
            out, self._outbox = self._outbox, []
            self._unfinished -= sum(not isinstance(outcome, Evaluated) for outcome in out)
            failure = self._failure
        if failure is not None and not out:
            raise EngineLoopFailed(str(failure)) from failure
        return out

    def unfinished(self) -> int:
        """Jobs submitted whose outcome has not been taken by `outcomes` yet (or aborted)."""
        with self._lock:
            return self._unfinished

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
        (unless `waiting_only`) those in it, aborted there at the next step boundary. Jobs
        submitted later are not affected."""
        with self._lock:
            kept = [job for job in self._inbox if not predicate(job)]
            self._drop([job for job in self._inbox if predicate(job)])
            self._inbox = kept
            self._aborts.append((predicate, waiting_only))
        self._wake.set()

    def running(self) -> int:
        """Requests in the engine now."""
        return len(self._running)

    def in_engine(self) -> int:
        """Requests in the engine, plus one per abort not applied yet (it may reach more)."""
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
                    self._between()
                    self._admit()
                    if self._running:
                        self._step()
                    else:
                        self._wake.wait(IDLE_WAIT_S)
                        self._wake.clear()
                except EngineDied as death:
                    if self._stopping:
                        break  # the engine is being closed under us
                    self.recover(death)
            self._abort_running()
        except BaseException as exc:  # handed to the owner through outcomes()
            log.exception("engine_loop_failed")
            with self._lock:
                self._failure = exc

    def _between(self) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, []
        for predicate, waiting_only in aborts:
            self._apply_abort(predicate, waiting_only)
        with self._lock:
            arrived, self._inbox = self._inbox, []
        for job in arrived:
            self._admission.add(job)
        if self._between_steps is not None:
            self._between_steps()
        metrics.ADMISSION_WAITING.set(len(self._admission))

    def _apply_abort(self, predicate: Callable[[PreparedJob], bool], waiting_only: bool) -> None:
        dropped = self._admission.discard(predicate) + self._shadows.discard(predicate)
        running = {} if waiting_only else self._running
        ids = [rid for rid, (job, _) in running.items() if predicate(job)]
        if ids:
            self._engine.abort_requests(ids)
        for rid in ids:
            job, _ = self._running.pop(rid)
            self._in_engine[job.adapter_key] -= 1
            dropped.append(job)
        with self._lock:
            self._drop(dropped)
        if dropped:
            log.info("jobs_aborted", waiting=len(dropped) - len(ids), in_engine=len(ids))

    def _admit(self) -> None:
        room = self._limits.engine_depth - len(self._running)
        now = time.monotonic()
        jobs = self._admission.take(now, room, self._in_engine)
        if self._switch_model is not None:
            jobs = self._servable_now(jobs)
        if not self._admission and len(jobs) < room and self._shadows:
            # Room no job is waiting for, within the shadows' share of the engine.
            in_engine = sum(job.shadow_of is not None for job, _ in self._running.values())
            shadow_room = min(room - len(jobs), self._limits.shadow_depth - in_engine)
            jobs += self._shadows.take(now, shadow_room, self._in_engine)
        if not jobs:
            return
        if not self._running:  # an event per busy period, not per step
            log.info("engine_running", admitting=len(jobs), waiting=len(self._admission))
            self._busy_since = (time.monotonic(), self.stats.finished)
        try:
            unavailable = self._cache.ensure_loaded(job.adapter for job in jobs)
        except EngineDied:
            for job in jobs:  # not in the engine yet: they wait for the restarted one
                self._wait(job)
            raise
        reported: set[Hashable] = set()
        for taken, job in enumerate(jobs, start=1):
            if job.adapter is not None and job.adapter_key in unavailable:
                reason = unavailable[job.adapter.lora_id]
                if job.adapter_key not in reported:
                    reported.add(job.adapter_key)
                    self._on_unavailable(job.adapter, reason)
                self._emit(Unserved(job, JobRejected(JobError.ADAPTER_UNAVAILABLE, reason)))
                continue
            try:
                self._add(job)
            except EngineDied:
                for later in jobs[taken:]:  # not in the engine yet: they wait for the next one
                    self._wait(later)
                raise

    def _servable_now(self, jobs: list[PreparedJob]) -> list[PreparedJob]:
        """A merged engine serves one adapter version. Jobs routed to another one (a new
        version announced meanwhile) wait until the engine is empty, then it switches to
        theirs: no job is served by a version other than the one it was routed to."""
        later = [job for job in jobs if not self._engine.serves_now(job.adapter)]
        if not later:
            return jobs
        now = [job for job in jobs if self._engine.serves_now(job.adapter)]
        if now or self._running:
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

    def _add(self, job: PreparedJob) -> None:
        request_id = str(next(self._ids))
        # In the running set before the call: if the engine dies under it, it died with it.
        self._running[request_id] = (job, time.monotonic())
        self._in_engine[job.adapter_key] += 1
        try:
            self._engine.add_request(request_id, job.request)
        except EngineDied:
            raise
        except Exception as exc:  # this request alone (vLLM refused it): dead-letter it
            log.exception("request_refused", job_id=job.job.job_id, **traced(job.source))
            self._running.pop(request_id)
            self._in_engine[job.adapter_key] -= 1
            self._emit(Unserved(job, JobRejected.internal(exc)))
            return
        metrics.ENGINE_REQUESTS.set(len(self._running))

    def _step(self) -> None:
        started = time.monotonic()
        finished = self._engine.step()
        elapsed = time.monotonic() - started
        self.stats.steps += 1
        metrics.ENGINE_STEP_SECONDS.observe(elapsed)
        if elapsed >= self._limits.stall_warning_s:
            log.warning(
                "engine_step_stalled", step_s=round(elapsed, 2), requests=len(self._running)
            )
        for request_id, generation in finished:
            entry = self._running.pop(request_id, None)
            if entry is None:
                continue  # aborted meanwhile
            job, admitted_at = entry
            self._in_engine[job.adapter_key] -= 1
            self.stats.finished += 1
            self._finish(job, generation, admitted_at)
        if finished and not self._running:
            began, finished_before = self._busy_since
            log.info(
                "engine_idle",
                finished=self.stats.finished - finished_before,
                busy_s=round(time.monotonic() - began, 3),
            )
        if self._running and not finished and not self._engine.has_unfinished_requests():
            # The engine forgot requests we think it holds: run them again rather than wait.
            log.error("engine_lost_requests", requests=len(self._running))
            for job, _ in self._running.values():
                self._wait(job)
            self._running.clear()
            self._in_engine.clear()
        metrics.ENGINE_REQUESTS.set(len(self._running))

    def _wait(self, job: PreparedJob) -> None:
        """Back to waiting for admission: a retry, a routed classifier pass, or a job that
        could not enter the engine."""
        (self._admission if job.shadow_of is None else self._shadows).add(job)

    def _finish(self, job: PreparedJob, generation: Generation, admitted_at: float) -> None:
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
            self._wait(checked)  # still held
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
        self._unfinished -= len(jobs) - shadows

    def _abort_running(self) -> None:
        if not self._running:
            return
        log.warning("requests_abandoned", requests=len(self._running))
        with contextlib.suppress(EngineDied):  # a dead engine has nothing left to abort
            self._engine.abort_requests(list(self._running))
        self._running.clear()

    # --- engine deaths (the loop thread, or `between_steps` on it) -------------------------------

    def recover(self, death: EngineDied) -> None:
        """Restart the engine after `death` and serve the requests that died with it."""
        dead = [job for job, _ in self._running.values()]
        self._running.clear()
        self._in_engine.clear()
        log.error("engine_died", requests=len(dead), error=str(death))
        self._restart()
        if not dead:
            return
        guarded = run_isolating_crashes(
            dead,
            self._run_alone,
            self._restart,
            self._limits.crash_attempts,
            died_once=True,
        )
        for finished in guarded.outcomes:
            for job, generation, admitted_at in finished:
                self._finish(job, generation, admitted_at)
        for job in guarded.crashed:
            self._emit(Unserved(job, self._crash_rejection))
        for job, error in guarded.failed:
            rejection = error if isinstance(error, JobRejected) else JobRejected.internal(error)
            self._emit(Unserved(job, rejection))

    def _restart(self) -> None:
        metrics.ENGINE_RESTARTS.inc()
        self._restart_engine()
        self.stats.engine_restarts += 1

    def _run_alone(self, jobs: list[PreparedJob]) -> list[tuple[PreparedJob, Generation, float]]:
        """Run `jobs` by themselves to the end (quarantine): nothing else is admitted meanwhile."""
        unavailable = self._cache.ensure_loaded(job.adapter for job in jobs)
        if any(job.adapter_key in unavailable for job in jobs):
            lost = next(job for job in jobs if job.adapter_key in unavailable)
            raise JobRejected(JobError.ADAPTER_UNAVAILABLE, unavailable[lost.adapter_key])
        started = time.monotonic()
        waiting = {f"q{next(self._ids)}": job for job in jobs}
        try:
            for request_id, job in waiting.items():
                self._engine.add_request(request_id, job.request)
        except EngineDied:
            raise
        except Exception:
            self._engine.abort_requests(list(waiting))  # the halves run without them
            raise
        finished: list[tuple[PreparedJob, Generation, float]] = []
        while waiting:
            done = self._engine.step()
            if not done and not self._engine.has_unfinished_requests():
                raise EngineDied("the engine lost the quarantined requests")
            for request_id, generation in done:
                job = waiting.pop(request_id, None)
                if job is not None:
                    finished.append((job, generation, started))
        return finished
