"""When a live stream's engine serves one adapter merged into its weights. Pure logic, no I/O.

An adapter merged into the base weights runs at the base model's speed (3x the LoRA path on
this project's CPU), but while it is merged the engine serves nothing else, and every switch
(merge or unmerge) needs an empty engine. `TierPolicy` decides, each turn of the engine loop,
which adapter the engine should serve merged (`Tiering.target`; None: LoRA, every adapter), and
which adapter's jobs to hold back meanwhile (`Tiering.held`):

- **Merge** an adapter whose jobs (waiting and in the engine) have been at least `share` of all
  the work for `sustain_s`, with at least `min_backlog` of them, unless it was refused (its
  merge failed, or its merged answers did not agree with the LoRA path's).
- **While merged**, switch back when the adapter's work is done, or before another adapter's
  oldest waiting job would wait longer than `others_max_wait_s` (the time to drain the engine,
  `drain_s`, is counted in).
- **After switching back for the others**, the adapter stays held while the others' jobs that
  waited when the turn began enter the engine (those arriving meanwhile wait for the next
  turn, so a steady trickle cannot hold the adapter back for ever); then it is merged again
  (no second `sustain_s`): the engine alternates between short LoRA turns for the others and
  merged turns for the flood.

The key of an adapter is `PreparedJob.adapter_key` (a name and version): a new version is
another key, so a merged version is never used for a job routed to the next one.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Tiering(Generic[K]):
    target: K | None  # the adapter to serve merged; None: LoRA
    held: K | None = None  # in LoRA mode, this adapter's jobs wait (its merged turn comes next)


@dataclass(frozen=True)
class Moment(Generic[K]):
    """What the policy sees at one turn of the engine loop."""

    now: float
    merged: K | None  # the adapter merged now
    work: Mapping[K | None, int]  # jobs waiting or in the engine per adapter key (None: base)
    # the wait so far of the oldest waiting job of any other adapter than the merged (or held)
    oldest_other_wait_s: float
    drain_s: float  # about how long emptying the engine takes


@dataclass
class TierPolicy(Generic[K]):
    share: float
    sustain_s: float
    others_max_wait_s: float
    min_backlog: int
    refused: set[K] = field(default_factory=set)
    _candidate: K | None = None
    _since: float = 0.0
    _interlude: K | None = None  # switched back for the others; merged again after them
    _interlude_since: float = 0.0
    _pending: Tiering[K] | None = None  # a switch decided and not made yet

    def decide(self, at: Moment[K]) -> Tiering[K]:
        """The tier wanted now. A switch once decided stands until it is made (jobs arriving
        while the engine drains wait for the next turn), unless the adapter to merge has no
        work left."""
        pending = self._pending
        if pending is not None:
            if at.merged == pending.target:
                self._pending = None  # made
            elif pending.target is None or at.work.get(pending.target):
                return pending
            else:
                self._pending = None
        decision = self._decide(at)
        if decision.target != at.merged:
            self._pending = decision
        return decision

    def _decide(self, at: Moment[K]) -> Tiering[K]:
        now, work = at.now, at.work
        if at.merged is not None:
            return self._while_merged(at, at.merged)
        if self._interlude is not None:
            held = self._interlude
            if not work.get(held) or held in self.refused:
                self._interlude = None
            elif at.oldest_other_wait_s > now - self._interlude_since:
                return Tiering(None, held)  # the others' turn: some waited since it began
            else:
                return Tiering(held, held)  # they are in: drain them, merge again
        top = self._dominant(work)
        if top is None:
            self._candidate = None
            return Tiering(None)
        if top != self._candidate:
            self._candidate, self._since = top, now
        if now - self._since < self.sustain_s:
            return Tiering(None)
        return Tiering(top)

    def refuse(self, key: K) -> None:
        """Never merge `key` again (its merge failed, or its answers disagreed)."""
        self.refused.add(key)
        if self._pending is not None and self._pending.target == key:
            self._pending = None
        if self._candidate == key:
            self._candidate = None
        if self._interlude == key:
            self._interlude = None

    def reset(self) -> None:
        """The engine is back in LoRA mode unplanned (it died and restarted)."""
        self._interlude = None
        self._candidate = None
        self._pending = None

    def _while_merged(self, at: Moment[K], merged: K) -> Tiering[K]:
        if not at.work.get(merged):
            self._candidate = self._interlude = None
            return Tiering(None)
        if at.oldest_other_wait_s + at.drain_s >= self.others_max_wait_s:
            self._interlude, self._interlude_since = merged, at.now
            return Tiering(None, merged)
        return Tiering(merged)

    def _dominant(self, work: Mapping[K | None, int]) -> K | None:
        total = sum(work.values())
        candidates = [(count, key) for key, count in work.items() if key is not None]
        if not total or not candidates:
            return None
        count, key = max(candidates, key=lambda item: item[0])
        if key in self.refused or count < self.min_backlog or count < self.share * total:
            return None
        return key
