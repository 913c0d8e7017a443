"""The client's bookkeeping, without I/O: which jobs are awaited, their answers as they arrive,
and a bounded memory of answers nobody awaits yet.

An answer for a job with a live handle goes to that handle (and stays with it); any other
answer (a job submitted by an earlier process, or whose handle was dropped) is kept in an LRU
of `max_kept` entries, so a later `result(job_id)` finds it while memory stays bounded.
Handles are held weakly: a handle its caller dropped costs nothing once collected.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

from workers.core.contracts import Result

DEFAULT_MAX_KEPT = 10_000


class JobFailed(Exception):
    """The job was dead-lettered (`code`: its `dlq.error.code`, docs/reliability.md), or could
    not be published at all (`code`: `publish_failed`)."""

    def __init__(self, job_id: str, code: str, message: str, topic: str | None = None) -> None:
        super().__init__(f"job {job_id}: {code}: {message}")
        self.job_id = job_id
        self.code = code
        self.message = message
        self.topic = topic  # where the dead letter was read (None: never published)


Outcome = Result | JobFailed
Listener = Callable[["JobHandle"], None]


class JobHandle:
    """One submitted (or awaited) job: `result(timeout)` returns its `Result` or raises its
    `JobFailed`; `TimeoutError` when neither came within `timeout` seconds."""

    def __init__(self, job_id: str, task: str | None = None) -> None:
        self.job_id = job_id
        self.task = task
        self._outcome: Outcome | None = None
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: float | None = None) -> Result:
        if not self._event.wait(timeout):
            raise TimeoutError(f"job {self.job_id}: no answer within {timeout} s")
        outcome = self._outcome
        if isinstance(outcome, JobFailed):
            raise outcome
        assert outcome is not None  # set before the event
        return outcome

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(handle)` once answered (at once if already answered), on the thread
        that delivers the answer."""
        with self._lock:
            if not self._event.is_set():
                self._listeners.append(listener)
                return
        listener(self)

    def _settle(self, outcome: Outcome) -> bool:
        with self._lock:
            if self._event.is_set():
                return False  # the first answer wins (a job published twice)
            self._outcome = outcome
            self._event.set()
            listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener(self)
        return True

    def __repr__(self) -> str:
        return f"JobHandle({self.job_id!r}, done={self.done()})"


class AnswerBook:
    """Thread-safe: the consumer thread calls `answered`, callers `expect` and `handle_for`."""

    def __init__(self, max_kept: int = DEFAULT_MAX_KEPT) -> None:
        if max_kept < 1:
            raise ValueError("max_kept must be at least 1")
        self.max_kept = max_kept
        self._lock = threading.Lock()
        self._awaited: dict[str, weakref.WeakSet[JobHandle]] = {}
        self._kept: OrderedDict[str, Outcome] = OrderedDict()
        self._pruned_at = 0  # size of `_awaited` after the last pruning

    def expect(self, job_id: str, task: str | None = None) -> JobHandle:
        """A handle for `job_id`, answered at once if its answer is already kept."""
        handle = JobHandle(job_id, task)
        with self._lock:
            kept = self._kept.pop(job_id, None)
            if kept is None:
                self._awaited.setdefault(job_id, weakref.WeakSet()).add(handle)
                if len(self._awaited) > 2 * self._pruned_at + 1000:
                    self._prune()
        if kept is not None:
            handle._settle(kept)
        return handle

    def answered(self, job_id: str, outcome: Outcome) -> None:
        with self._lock:
            handles = list(self._awaited.pop(job_id, ()))
            if not handles:
                self._kept[job_id] = outcome
                self._kept.move_to_end(job_id)
                while len(self._kept) > self.max_kept:
                    self._kept.popitem(last=False)  # the oldest nobody asked for
        for handle in handles:
            handle._settle(outcome)

    def _prune(self) -> None:
        # Handles dropped before their answer came leave empty sets behind: bounded by this.
        self._awaited = {job_id: h for job_id, h in self._awaited.items() if len(h)}
        self._pruned_at = len(self._awaited)

    def stats(self) -> dict[str, int]:
        """Jobs with a live handle still waiting, and answers kept for nobody yet."""
        with self._lock:
            self._prune()
            return {"awaited": len(self._awaited), "kept": len(self._kept)}


# The dead-letter headers (workers/kafka/sinks.py), restated: this module reads records only.
_DLQ_CODE = "dlq.error.code"
_DLQ_MESSAGE = "dlq.error.message"


def _job_id_of(key: bytes | None, value: bytes | None) -> str | None:
    """A record's job id: its key (every answer is keyed by job_id), else the payload's."""
    if key:
        return key.decode("utf-8", errors="replace")
    try:
        document = json.loads(value or b"")
    except (ValueError, RecursionError):
        return None
    job_id = document.get("job_id") if isinstance(document, dict) else None
    return job_id if isinstance(job_id, str) else None


def outcome_of(
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes | None]] | None,
) -> tuple[str, Outcome] | None:
    """A record from a result, dead-letter or reply topic as (job_id, outcome); None for one
    that is neither a result nor a dead letter with a job id."""
    found = {name: (raw or b"").decode("utf-8", errors="replace") for name, raw in headers or []}
    if _DLQ_CODE in found:
        job_id = _job_id_of(key, value)
        if job_id is None:
            return None
        return job_id, JobFailed(job_id, found[_DLQ_CODE], found.get(_DLQ_MESSAGE, ""), topic)
    try:
        result = Result.model_validate_json(value or b"")
    except ValueError:
        return None
    return result.job_id, result


def as_completed(handles: Iterable[JobHandle], timeout: float | None = None) -> Iterator[JobHandle]:
    """Yield each handle as its answer arrives (answered ones first); `TimeoutError` if some are
    still unanswered `timeout` seconds after the call. A yielded handle's `result(0)` returns
    its result or raises its `JobFailed`."""
    pending = list(handles)
    arrived: queue.SimpleQueue[JobHandle] = queue.SimpleQueue()
    for handle in pending:
        handle.add_listener(arrived.put)
    deadline = None if timeout is None else time.monotonic() + timeout
    for _ in range(len(pending)):
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            yield arrived.get(timeout=left)
        except queue.Empty:
            raise TimeoutError(f"jobs still unanswered after {timeout} s") from None
