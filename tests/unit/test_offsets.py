import pytest

from workers.core.offsets import OffsetTracker


def test_commit_stops_at_the_first_unfinished_offset() -> None:
    tracker = OffsetTracker()
    for offset in range(5):
        tracker.track("t", 0, offset)
    tracker.finish("t", 0, 0)
    tracker.finish("t", 0, 2)
    tracker.finish("t", 0, 3)
    assert tracker.committable() == {("t", 0): 1}
    tracker.finish("t", 0, 1)
    assert tracker.committable() == {("t", 0): 4}
    tracker.finish("t", 0, 4)
    assert tracker.committable() == {("t", 0): 5}


def test_nothing_to_commit_twice() -> None:
    tracker = OffsetTracker()
    tracker.track("t", 1, 10)
    tracker.finish("t", 1, 10)
    positions = tracker.committable()
    assert positions == {("t", 1): 11}
    tracker.mark_committed(positions)
    assert tracker.committable() == {}
    assert tracker.unfinished_count() == 0


def test_partitions_are_independent_and_forgettable() -> None:
    tracker = OffsetTracker()
    tracker.track("t", 0, 0)
    tracker.track("t", 1, 0)
    tracker.finish("t", 1, 0)
    assert tracker.committable() == {("t", 1): 1}
    tracker.forget([("t", 0)])
    assert tracker.unfinished_count() == 0
    tracker.finish("t", 0, 0)  # a late delivery for a revoked partition is harmless


def test_offsets_must_grow() -> None:
    tracker = OffsetTracker()
    tracker.track("t", 0, 5)
    with pytest.raises(ValueError):
        tracker.track("t", 0, 5)


def test_first_unfinished_outside_skips_excluded_offsets() -> None:
    tracker = OffsetTracker()
    for offset in range(4):
        tracker.track("t", 0, offset)
    tracker.finish("t", 0, 0)
    assert tracker.first_unfinished_outside(("t", 0), {1}) == 2
    assert tracker.first_unfinished_outside(("t", 0), {1, 2, 3}) is None
    assert tracker.first_unfinished_outside(("t", 9), set()) is None
