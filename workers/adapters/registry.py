"""The adapter registry: which versions of which adapters serve, and with what share of traffic.

Sources: the catalog file at start-up, then the compacted `adapters.updates` topic. An update is
the adapter's whole desired state (versions and weights). It is applied all or nothing: every
version is checked (`checks.py`), loaded into the engine (`add_lora`) and pinned if hot before
the switch, and a failed step unloads what the update loaded, so a bad update never serves and
the previous state keeps serving. Anyone can write to the topic: whatever a record holds, it is
applied or rejected with a code, never a reason for the worker to stop (only the engine's death
is raised, for the caller to restart it).

A version whose files fail a reload leaves serving alone; the adapter's other versions take its
share (`mark_unavailable`).

Hot reload: jobs are routed when they are prepared, so jobs already routed (waiting to enter
the engine or running in it) finish on the version they were routed to; jobs routed after the
switch get the new one. A version no route uses any more leaves the engine once no job holds it
(`release_unused`, with the engine loop's reference counts).

Thread-safe: jobs are routed on the worker's thread while updates are applied on the engine
loop's thread (it owns the engine), so every public method holds one lock.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import structlog

from workers import metrics
from workers.adapters.checks import AdapterRequirements, adapter_digest, inspect_adapter
from workers.adapters.updates import UpdateRecord
from workers.core.config import AdapterCatalog, AdapterEntry
from workers.core.contracts import (
    AdapterState,
    AdapterStatus,
    AdapterUpdate,
    AdapterVersionSpec,
    Job,
)
from workers.core.engine_api import AdapterHandle, AdapterLoadError, Engine, EngineDied
from workers.core.errors import (
    MAX_REASON_CHARS,
    AdapterError,
    AdapterRejected,
    JobError,
    JobRejected,
)

log = structlog.get_logger(__name__)

StatusCallback = Callable[[AdapterStatus], None]
P = ParamSpec("P")
R = TypeVar("R")


def _locked(method: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        registry: Any = args[0]
        with registry._lock:
            return method(*args, **kwargs)

    return call


def traffic_point(adapter: str, job_id: str) -> float:
    """A stable point in [0, 1) per (adapter, job): a retried job lands on the same version."""
    digest = hashlib.sha256(f"{adapter}\0{job_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def update_from_catalog(catalog: AdapterCatalog, entry: AdapterEntry) -> AdapterUpdate:
    """A catalog entry as the update that would announce it, so both sources share one path."""
    spec = AdapterVersionSpec(
        version=entry.version, path=str(entry.path), sha256=adapter_digest(entry.path)
    )
    return AdapterUpdate(
        name=entry.name,
        base_model=catalog.base_model,
        versions=[spec],
        tenants=entry.tenants,
        hot=entry.hot,
    )


def _as_rejection(error: Exception) -> AdapterRejected:
    """What applying an update raised, as the rejection reported for it."""
    if isinstance(error, AdapterRejected):
        return error
    log.error("adapter_update_failed", exc_info=error)  # not a check: a bug or a limit
    return AdapterRejected(AdapterError.UPDATE_FAILED, f"{type(error).__name__}: {error}")


@dataclass(frozen=True)
class Route:
    handle: AdapterHandle
    weight: float


def _by_point(routes: tuple[Route, ...], point: float) -> AdapterHandle:
    cumulative = 0.0
    for route in routes:
        cumulative += route.weight
        if point < cumulative:
            return route.handle
    return routes[-1].handle


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    routes: tuple[Route, ...]  # the versions serving, weights adding up to 1
    tenants: frozenset[str] | None
    hot: bool
    shadow: Route | None = None  # its weight: the share of jobs also run on it
    # The routes as announced, when a version has since failed a reload and left `routes`.
    announced: tuple[Route, ...] | None = None

    def handles(self) -> list[AdapterHandle]:
        shadow = [] if self.shadow is None else [self.shadow.handle]
        return [route.handle for route in self.routes] + shadow

    def pick(self, job_id: str) -> AdapterHandle:
        handle = _by_point(self.announced or self.routes, traffic_point(self.name, job_id))
        if self.announced is None or any(r.handle == handle for r in self.routes):
            return handle
        # The job's version was lost: pick again among the others, so a job of a version still
        # serving keeps it and the lost share is spread by their weights.
        return _by_point(self.routes, traffic_point(f"{self.name}#lost", job_id))

    def without(self, handle: AdapterHandle) -> ServedAdapter | None:
        """This state with `handle` gone from serving (its share to the other versions), or
        None if no version would be left."""
        if self.shadow is not None and self.shadow.handle == handle:
            return dataclasses.replace(self, shadow=None)  # jobs unaffected
        remaining = [route for route in self.routes if route.handle != handle]
        if not remaining:
            return None
        total = sum(route.weight for route in remaining)
        return dataclasses.replace(
            self,
            routes=tuple(Route(route.handle, route.weight / total) for route in remaining),
            announced=self.announced or self.routes,
        )

    def allows(self, tenant: str | None) -> bool:
        return self.tenants is None or (tenant is not None and tenant in self.tenants)


class AdapterRegistry:
    def __init__(
        self,
        engine: Engine,
        requirements: AdapterRequirements,
        *,
        worker_id: str,
        on_status: StatusCallback,
        only: str | None = None,
    ) -> None:
        self._engine = engine
        # A worker dedicated to one adapter (served merged) ignores updates of all others.
        self._only = only
        self._requirements = requirements
        self._worker_id = worker_id
        self._on_status = on_status
        self._served: dict[str, ServedAdapter] = {}
        # Every version the engine holds, by (name, version).
        self._loaded: dict[tuple[str, str], AdapterHandle] = {}
        # The files every version was first accepted with, kept after it is unloaded: a version
        # number stands for one set of files for the life of the worker.
        self._digests: dict[tuple[str, str], str] = {}
        # Adapters whose files failed a reload: jobs for them are refused with the reason.
        self._unavailable: dict[str, str] = {}
        # When each served state was published, and adapters whose latest update was rejected
        # (with its publication time): what `restore_last_good` needs.
        self._served_at: dict[str, int] = {}
        self._rejected_last: dict[str, int] = {}
        # LoRA ids are never reused, so no version can ever be served another's cached weights.
        self._lora_ids = itertools.count(1)
        self._lock = threading.RLock()

    # --- routing -------------------------------------------------------------------------------

    @_locked
    def resolve(self, name: str, job: Job) -> AdapterHandle:
        served = self._served.get(name)
        if served is None and name in self._unavailable:
            raise JobRejected(JobError.ADAPTER_UNAVAILABLE, self._unavailable[name])
        if served is None:
            raise JobRejected(
                JobError.UNKNOWN_ADAPTER, f"adapter {name!r} is not served by this worker"
            )
        if not served.allows(job.tenant):
            raise JobRejected(
                JobError.ADAPTER_FORBIDDEN, f"tenant {job.tenant!r} may not use adapter {name!r}"
            )
        return served.pick(job.job_id)

    @_locked
    def shadow_for(self, handle: AdapterHandle, job: Job) -> AdapterHandle | None:
        """The shadow version a job served by `handle` also runs on, if its adapter has one
        and the job falls in the shadow's share (a stable point per job)."""
        served = self._served.get(handle.name)
        if served is None or served.shadow is None:
            return None
        shadow = served.shadow
        if shadow.handle.lora_id == handle.lora_id:
            return None
        return (
            shadow.handle
            if traffic_point(f"{handle.name}#shadow", job.job_id) < shadow.weight
            else None
        )

    @_locked
    def served(self) -> dict[str, ServedAdapter]:
        return dict(self._served)

    # --- updates -------------------------------------------------------------------------------

    @_locked
    def load_catalog(self, catalog: AdapterCatalog) -> None:
        for entry in catalog.adapters:
            self.apply(update_from_catalog(catalog, entry))

    @_locked
    def apply(self, update: AdapterUpdate) -> bool:
        """Switch `update.name` to the update's versions; False (and old state kept) if any
        version is rejected or any step fails. Only `EngineDied` is raised: the caller restarts
        the engine and applies the update again."""
        if self._only is not None and (len(update.versions) > 1 or update.shadow is not None):
            rejection = AdapterRejected(
                AdapterError.MERGED_ONE_VERSION,
                f"this worker serves {update.name} merged, one version at a time: "
                "publish a canary or a shadow to a LoRA worker",
            )
            self._reject(update.name, update.versions[-1].version, rejection)
            self._rejected_last[update.name] = update.published_at_ms
            return False
        loaded_before = set(self._loaded)
        digests_before = set(self._digests)
        trying: list[str | None] = [None]  # the version being loaded or pinned, for the status
        try:
            served = self._prepare(update, trying)
        except EngineDied:
            raise  # what it loaded leaves the restarted engine by `release_unused`
        except Exception as exc:
            self._unload_new(loaded_before, digests_before)
            self._reject(update.name, trying[0], _as_rejection(exc))
            self._rejected_last[update.name] = update.published_at_ms
            return False
        # Nothing can fail from here on: the switch.
        self._unavailable.pop(update.name, None)
        self._served[update.name] = served
        self._served_at[update.name] = update.published_at_ms
        self._rejected_last.pop(update.name, None)
        for route in served.routes:
            self._status(route.handle, AdapterState.SERVING, route.weight, update)
        if served.shadow is not None:
            self._status(served.shadow.handle, AdapterState.SHADOW, served.shadow.weight, update)
        log.info(
            "adapter_serving",
            adapter=update.name,
            versions={r.handle.version: r.weight for r in served.routes},
            shadow=None
            if served.shadow is None
            else {served.shadow.handle.version: served.shadow.weight},
        )
        return True

    @_locked
    def apply_record(self, record: UpdateRecord) -> None:
        """One record of the updates topic: an update, a retirement or a malformed message.
        Whatever the record holds, it is applied or rejected with a code and the worker goes
        on; only `EngineDied` is raised (the caller restarts the engine and applies it again)."""
        if self._only is not None and record.name != self._only:
            return
        try:
            if record.error is not None:
                rejection = AdapterRejected(AdapterError.MALFORMED_UPDATE, record.error)
                self._reject(record.name, None, rejection)
                self._rejected_last[record.name] = 0  # when it was published is unknown
            elif record.update is None:
                self.retire(record.name)
            else:
                self.apply(record.update)
        except EngineDied:
            raise
        except Exception as exc:  # a bug: the record is refused, not the worker stopped
            self._reject(record.name, None, _as_rejection(exc))

    def apply_record_surviving(
        self, record: UpdateRecord, restart: Callable[[EngineDied], None]
    ) -> None:
        """`apply_record`, for callers that own the engine: an engine death under the record
        restarts the engine (`restart`) and applies it once more; a second death is the record's
        doing, and it is refused. Nothing escapes but a failed restart, so no record, replayed
        at every start from the compacted topic, can keep a worker from serving."""
        try:
            self.apply_record(record)
        except EngineDied as death:
            restart(death)
            try:
                self.apply_record(record)
            except EngineDied as again:
                restart(again)
                self.refuse(record, "the engine died twice applying it")

    @_locked
    def mark_unavailable(self, handle: AdapterHandle, reason: str) -> None:
        """A version's files failed a reload: it stops serving and its share of the traffic
        goes to the adapter's other versions; with none left, jobs for the adapter are refused
        until an update brings a version that loads. Said on the status topic."""
        if self._loaded.pop((handle.name, handle.version), None) is not None:
            self._engine.unregister_adapter(handle)  # never registered again on a restart
        served = self._served.get(handle.name)
        if served is not None and handle in served.handles():
            remaining = served.without(handle)
            if remaining is None:
                del self._served[handle.name]
                self._unavailable[handle.name] = reason
            else:
                self._served[handle.name] = remaining
                log.warning(
                    "adapter_version_lost",
                    adapter=handle.name,
                    version=handle.version,
                    versions={r.handle.version: r.weight for r in remaining.routes},
                )
        rejection = AdapterRejected(AdapterError.LOAD_FAILED, reason)
        self._reject(handle.name, handle.version, rejection)

    @_locked
    def refuse(self, record: UpdateRecord, reason: str) -> None:
        """Report an update as rejected for a reason found outside the checks."""
        version = None
        if record.update is not None and len(record.update.versions) == 1:
            version = record.update.versions[0].version
        self._reject(record.name, version, AdapterRejected(AdapterError.LOAD_FAILED, reason))

    @_locked
    def restore_last_good(self, last_serving: dict[str, AdapterUpdate]) -> list[str]:
        """After catching up with the updates topic: an adapter whose latest record was rejected,
        and whose good state before it is gone from the topic (compacted away), serves the last
        state a worker reported serving, as the workers that were running all along do.
        Returns the adapters restored."""
        restored: list[str] = []
        for name, rejected_at in sorted(self._rejected_last.items()):
            candidate = last_serving.get(name)
            if candidate is None:
                continue
            newer_than_rejected = rejected_at and candidate.published_at_ms > rejected_at
            already = self._served_at.get(name, -1) >= candidate.published_at_ms
            if newer_than_rejected or already:
                continue
            log.warning("adapter_state_restored", adapter=name, from_status=True)
            if self.apply(candidate):
                restored.append(name)
        return restored

    @_locked
    def retire(self, name: str) -> None:
        self._rejected_last.pop(name, None)
        self._served_at.pop(name, None)
        if self._served.pop(name, None) is not None:
            log.info("adapter_retired", adapter=name)

    @_locked
    def release_unused(self, in_use: Iterable[int]) -> list[int]:
        """Remove versions no route serves and no waiting job holds from the engine; returns
        their LoRA ids."""
        holding = set(in_use)
        routed = {h.lora_id for s in self._served.values() for h in s.handles()}
        released: list[int] = []
        for key, handle in list(self._loaded.items()):
            if handle.lora_id in routed or handle.lora_id in holding:
                continue
            self._engine.unregister_adapter(handle)
            del self._loaded[key]
            metrics.ADAPTER_UNLOADS.inc()
            log.info("adapter_unloaded", adapter=handle.name, version=handle.version)
            self._status(handle, AdapterState.RETIRED, None)
            released.append(handle.lora_id)
        return released

    # --- internals -----------------------------------------------------------------------------

    def _prepare(self, update: AdapterUpdate, trying: list[str | None]) -> ServedAdapter:
        """Every step of applying `update` that can fail: check and load each version, pin
        them if hot. `trying[0]`: the version at hand when it raised."""
        routes: list[Route] = []
        for spec in update.versions:
            trying[0] = spec.version
            routes.append(Route(self._load(update, spec), spec.weight))
        shadow: Route | None = None
        if update.shadow is not None:
            trying[0] = update.shadow.version
            spec = AdapterVersionSpec(
                version=update.shadow.version,
                path=update.shadow.path,
                sha256=update.shadow.sha256,
            )
            shadow = Route(self._load(update, spec), update.shadow.share)
        if update.hot:
            for route in routes:
                trying[0] = route.handle.version
                try:
                    self._engine.pin_adapter(route.handle)
                except EngineDied:
                    raise
                except Exception as exc:
                    message = f"pinning {route.handle.engine_name}: {exc}"
                    raise AdapterRejected(AdapterError.LOAD_FAILED, message) from exc
        return ServedAdapter(
            name=update.name,
            routes=tuple(routes),
            tenants=None if update.tenants is None else frozenset(update.tenants),
            hot=update.hot,
            shadow=shadow,
        )

    def _unload_new(
        self, loaded_before: set[tuple[str, str]], digests_before: set[tuple[str, str]]
    ) -> None:
        """Undo a failed update: the versions it loaded leave the engine (none serves: the
        switch never happened), and their files are not remembered as accepted."""
        for key in set(self._loaded) - loaded_before:
            handle = self._loaded[key]
            try:
                self._engine.unregister_adapter(handle)
            except EngineDied:
                raise  # still listed: `release_unused` removes it from the restarted engine
            except Exception:
                log.exception("adapter_unload_failed", adapter=handle.engine_name)
            del self._loaded[key]
        for key in set(self._digests) - digests_before:
            del self._digests[key]

    def _load(self, update: AdapterUpdate, spec: AdapterVersionSpec) -> AdapterHandle:
        first_digest = self._digests.get((update.name, spec.version))
        if first_digest is not None and first_digest != spec.sha256:
            raise AdapterRejected(
                AdapterError.VERSION_CONFLICT,
                f"{update.name}@{spec.version} was accepted with other files (sha256 "
                f"{first_digest}); publish a new version instead",
            )
        known = self._loaded.get((update.name, spec.version))
        if known is not None:
            return known
        facts = inspect_adapter(
            spec.path,
            self._requirements,
            expected_sha256=spec.sha256,
            claimed_base_model=update.base_model,
        )
        handle = AdapterHandle(
            update.name, spec.version, str(facts.path), next(self._lora_ids), spec.sha256
        )
        started = time.monotonic()
        try:
            self._engine.register_adapter(handle)
        except AdapterLoadError as exc:
            raise AdapterRejected(AdapterError.LOAD_FAILED, str(exc)) from exc
        metrics.ADAPTER_LOAD_SECONDS.labels(update.name).observe(time.monotonic() - started)
        self._loaded[(update.name, spec.version)] = handle
        self._digests[(update.name, spec.version)] = spec.sha256
        log.info(
            "adapter_loaded",
            adapter=update.name,
            version=spec.version,
            lora_id=handle.lora_id,
            rank=facts.rank,
            load_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return handle

    def _reject(self, name: str, version: str | None, rejection: AdapterRejected) -> None:
        metrics.ADAPTER_REJECTIONS.labels(rejection.code).inc()
        # The message may quote the record (a path of any length): bounded, as job errors are.
        message = rejection.message
        if len(message) > MAX_REASON_CHARS:
            message = message[:MAX_REASON_CHARS] + "..."
        log.error(
            "adapter_rejected", adapter=name, version=version, code=rejection.code, reason=message
        )
        status = AdapterStatus(
            name=name,
            version=version,
            state=AdapterState.REJECTED,
            worker=self._worker_id,
            code=rejection.code,
            message=message,
            at_ms=int(time.time() * 1000),
        )
        self._notify(status)

    def _notify(self, status: AdapterStatus) -> None:
        # Statuses are best effort: one that cannot be written never undoes or stops an update.
        try:
            self._on_status(status)
        except Exception:
            log.exception("adapter_status_not_written", adapter=status.name, state=status.state)

    def _status(
        self,
        handle: AdapterHandle,
        state: AdapterState,
        weight: float | None,
        update: AdapterUpdate | None = None,
    ) -> None:
        self._notify(
            AdapterStatus(
                name=handle.name,
                version=handle.version,
                state=state,
                worker=self._worker_id,
                weight=weight,
                sha256=handle.sha256,
                update=update,
                at_ms=int(time.time() * 1000),
            )
        )
