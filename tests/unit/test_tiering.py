"""When a live stream's engine serves an adapter merged (`workers.core.tiering`), on plain data."""

from __future__ import annotations

from workers.core.tiering import Moment, Tiering, TierPolicy


def policy(**overrides: float) -> TierPolicy[str]:
    values = {"share": 0.8, "sustain_s": 2.0, "others_max_wait_s": 1.0, "min_backlog": 10}
    values.update(overrides)
    return TierPolicy[str](**values)  # type: ignore[arg-type]


def decide(
    p: TierPolicy[str], now: float, merged: str | None, work: dict, wait: float, drain: float
) -> Tiering[str]:
    return p.decide(Moment(now, merged, work, wait, drain))


def test_an_adapter_is_merged_only_after_dominating_for_the_sustain_time() -> None:
    p = policy()
    work = {"a": 90, "c": 10}
    assert decide(p, 0.0, None, work, 0.0, 0.1) == Tiering(None)
    assert decide(p, 1.9, None, work, 0.0, 0.1) == Tiering(None)
    assert decide(p, 2.0, None, work, 0.0, 0.1) == Tiering("a")


def test_no_adapter_dominates_below_the_share_or_the_backlog() -> None:
    p = policy(sustain_s=0.0)
    assert decide(p, 0.0, None, {"a": 70, "c": 30}, 0.0, 0.1) == Tiering(None)
    assert decide(p, 0.0, None, {"a": 9}, 0.0, 0.1) == Tiering(None)
    # The base model is never merged, however much of the work it has.
    assert decide(p, 0.0, None, {None: 100}, 0.0, 0.1) == Tiering(None)


def test_a_break_in_dominance_restarts_the_sustain_time() -> None:
    p = policy()
    assert decide(p, 0.0, None, {"a": 90, "c": 10}, 0.0, 0.1).target is None
    assert decide(p, 1.0, None, {"a": 50, "c": 50}, 0.0, 0.1).target is None
    assert decide(p, 2.5, None, {"a": 90, "c": 10}, 0.0, 0.1).target is None
    assert decide(p, 4.5, None, {"a": 90, "c": 10}, 0.0, 0.1).target == "a"


def test_merged_the_others_wait_at_most_their_bound_drain_included() -> None:
    p = policy(sustain_s=0.0)
    work = {"a": 90, "c": 5}
    assert decide(p, 0.0, "a", work, 0.5, 0.2) == Tiering("a")
    # 0.85 s waited + 0.2 s to empty the engine would pass 1 s: switch back now.
    assert decide(p, 0.0, "a", work, 0.85, 0.2) == Tiering(None, held="a")
    # The others' turn, with "a" held, while jobs that waited when it began still wait...
    assert decide(p, 0.1, None, work, 0.95, 0.2) == Tiering(None, held="a")
    # ...and once they are in (one arrived since: it waits for the next turn), merged again.
    assert decide(p, 0.2, None, work, 0.05, 0.2) == Tiering("a", held="a")


def test_a_switch_once_decided_stands_while_the_engine_drains() -> None:
    p = policy(sustain_s=0.0)
    work = {"a": 90, "c": 5}
    assert decide(p, 0.0, "a", work, 0.9, 0.2) == Tiering(None, held="a")
    # Still merged (draining): the others' wait looks short again, the decision stands.
    assert decide(p, 0.05, "a", work, 0.0, 0.2) == Tiering(None, held="a")


def test_a_merged_adapter_with_no_work_left_is_unmerged() -> None:
    p = policy(sustain_s=0.0)
    assert decide(p, 0.0, "a", {"c": 3}, 0.0, 0.1) == Tiering(None)
    # And nothing is held: the others are served at once.
    assert decide(p, 0.1, None, {"c": 3}, 0.0, 0.1) == Tiering(None)


def test_a_refused_adapter_is_never_merged() -> None:
    p = policy(sustain_s=0.0)
    p.refuse("a")
    assert decide(p, 0.0, None, {"a": 100}, 0.0, 0.1) == Tiering(None)


def test_after_an_unplanned_restart_nothing_is_held() -> None:
    p = policy(sustain_s=0.0)
    work = {"a": 90, "c": 5}
    assert decide(p, 0.0, "a", work, 0.95, 0.2).held == "a"
    p.reset()
    assert decide(p, 0.1, None, work, 0.0, 0.2) == Tiering("a")
