import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.core.offsets import MAX_LEDGER_CHARS, CommitPoint, Ledger, OffsetTracker


def positions(points: dict[tuple[str, int], CommitPoint]) -> dict[tuple[str, int], int]:
    return {key: point.position for key, point in points.items()}


def test_commit_stops_at_the_first_unanswered_offset() -> None:
    tracker = OffsetTracker()
    for offset in range(5):
        tracker.track("t", 0, offset)
    tracker.mark_answered("t", 0, 0)
    tracker.mark_answered("t", 0, 2)
    tracker.mark_answered("t", 0, 3)
    assert positions(tracker.committable()) == {("t", 0): 1}
    tracker.mark_answered("t", 0, 1)
    assert positions(tracker.committable()) == {("t", 0): 4}
    tracker.mark_answered("t", 0, 4)
    assert positions(tracker.committable()) == {("t", 0): 5}


def test_the_ledger_says_what_is_finished_beyond_the_position() -> None:
    tracker = OffsetTracker()
    for offset in range(10, 16):
        tracker.track("t", 0, offset)
    for offset in (10, 12, 13, 15):
        tracker.mark_answered("t", 0, offset)
    (point,) = tracker.committable().values()
    assert point.position == 11
    covered = [o for o in range(8, 20) if point.ledger.covers(o)]
    assert covered == [12, 13, 15]


def test_nothing_to_commit_twice() -> None:
    tracker = OffsetTracker()
    tracker.track("t", 1, 10)
    tracker.mark_answered("t", 1, 10)
    points = tracker.committable()
    assert positions(points) == {("t", 1): 11}
    tracker.mark_committed(points)
    assert tracker.committable() == {}
    assert tracker.unanswered_count() == 0


def test_more_finished_beyond_the_same_position_is_committed_again() -> None:
    tracker = OffsetTracker()
    for offset in range(3):
        tracker.track("t", 0, offset)
    tracker.mark_answered("t", 0, 1)
    tracker.mark_committed(tracker.committable())
    assert tracker.committable() == {}
    tracker.mark_answered("t", 0, 2)
    (point,) = tracker.committable().values()
    assert point.position == 0 and point.ledger.covers(2)


def test_partitions_are_independent_and_forgettable() -> None:
    tracker = OffsetTracker()
    tracker.track("t", 0, 0)
    tracker.track("t", 1, 0)
    tracker.mark_answered("t", 1, 0)
    assert positions(tracker.committable()) == {("t", 1): 1}
    tracker.forget([("t", 0)])
    assert tracker.unanswered_count() == 0
    tracker.mark_answered("t", 0, 0)  # a late delivery for a revoked partition is harmless


def test_offsets_must_grow() -> None:
    tracker = OffsetTracker()
    tracker.track("t", 0, 5)
    with pytest.raises(ValueError):
        tracker.track("t", 0, 5)


def test_first_unanswered_outside_skips_excluded_offsets() -> None:
    tracker = OffsetTracker()
    for offset in range(4):
        tracker.track("t", 0, offset)
    tracker.mark_answered("t", 0, 0)
    assert tracker.first_unanswered_outside(("t", 0), {1}) == 2
    assert tracker.first_unanswered_outside(("t", 0), {1, 2, 3}) is None
    assert tracker.first_unanswered_outside(("t", 9), set()) is None


def test_a_new_owner_skips_what_the_previous_one_answered_and_keeps_the_rest_of_its_ledger() -> (
    None
):
    before = Ledger(100, 110, frozenset({100, 103, 104}))
    tracker = OffsetTracker()
    tracker.resume(("t", 0), Ledger.decode(100, before.metadata))
    answered = [o for o in range(100, 112) if tracker.already_answered("t", 0, o)]
    assert answered == [101, 102, 105, 106, 107, 108, 109, 110]
    # It reads 100 and 101 (skipped as answered, so finished) and finishes nothing else yet:
    tracker.track("t", 0, 100)
    tracker.track("t", 0, 101)
    tracker.mark_answered("t", 0, 101)
    (point,) = tracker.committable().values()
    # Its own commit still covers what the previous owner answered and it has not read yet.
    assert point.position == 100
    assert [o for o in range(100, 112) if point.ledger.covers(o)] == answered


def test_metadata_that_is_not_a_ledger_covers_nothing() -> None:
    for metadata in (None, "", "something else", "lw1 x", "lw1 5 1-"):
        assert Ledger.decode(7, metadata) == Ledger(7)
    # No committed offset at all (OFFSET_INVALID), whatever the metadata.
    assert Ledger.decode(-1001, "lw1 5 ").covered_count() == 0


def test_a_ledger_too_long_for_the_metadata_claims_less_never_more() -> None:
    tracker = OffsetTracker()
    for offset in range(4000):
        tracker.track("t", 0, offset)
    for offset in range(1, 4000, 2):  # every other one: as many ranges as can be
        tracker.mark_answered("t", 0, offset)
    (point,) = tracker.committable().values()
    assert len(point.ledger.metadata) <= MAX_LEDGER_CHARS
    covered = {o for o in range(4000) if point.ledger.covers(o)}
    assert covered and covered <= set(range(1, 4000, 2))


@given(
    position=st.integers(min_value=0, max_value=10**12),
    finished=st.sets(st.integers(min_value=1, max_value=300), max_size=200),
    highest=st.integers(min_value=0, max_value=300),
)
def test_a_ledger_survives_its_encoding(position: int, finished: set[int], highest: int) -> None:
    unanswered = frozenset(position + o for o in range(1, highest + 1) if o not in finished)
    ledger = Ledger(position, position + highest, unanswered | {position})
    decoded = Ledger.decode(position, ledger.metadata)
    span = range(position - 1, position + highest + 2)
    assert [o for o in span if decoded.covers(o)] == [o for o in span if ledger.covers(o)]
