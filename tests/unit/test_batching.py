from dataclasses import dataclass

from workers.core.batching import AdapterBatcher, BatchPolicy


@dataclass(frozen=True)
class Item:
    adapter_key: str | None
    arrived_at: float
    ident: int = 0


def test_nothing_due_before_linger_unless_full() -> None:
    batcher: AdapterBatcher[Item] = AdapterBatcher(max_batch_size=3, linger_s=1.0)
    batcher.add(Item("a", 0.0))
    assert batcher.next_batch(now=0.5) == []
    assert batcher.seconds_until_due(0.5) == 0.5
    batcher.add(Item("b", 0.6))
    batcher.add(Item("a", 0.7))
    assert batcher.seconds_until_due(0.7) == 0.0  # full
    assert len(batcher.next_batch(now=0.7)) == 3
    assert len(batcher) == 0


def test_batch_keeps_each_adapters_jobs_together_largest_group_first() -> None:
    batcher: AdapterBatcher[Item] = AdapterBatcher(max_batch_size=10, linger_s=0.0)
    for i, key in enumerate(["b", "a", "b", None, "a", "b"]):
        batcher.add(Item(key, float(i), i))
    batch = batcher.next_batch(now=10.0)
    assert [item.adapter_key for item in batch] == ["b", "b", "b", "a", "a", None]
    assert [item.ident for item in batch] == [0, 2, 5, 1, 4, 3]


def test_size_bound_splits_a_large_group_and_keeps_the_rest_waiting() -> None:
    batcher: AdapterBatcher[Item] = AdapterBatcher(max_batch_size=4, linger_s=0.0)
    for i in range(6):
        batcher.add(Item("a", float(i), i))
    batcher.add(Item("b", 6.0, 6))
    first = batcher.next_batch(now=10.0)
    second = batcher.next_batch(now=10.0)
    assert [i.ident for i in first] == [0, 1, 2, 3]
    assert [i.ident for i in second] == [4, 5, 6]
    assert batcher.next_batch(now=10.0) == []


def test_flush_ignores_linger() -> None:
    batcher: AdapterBatcher[Item] = AdapterBatcher(max_batch_size=10, linger_s=100.0)
    batcher.add(Item("a", 0.0))
    assert batcher.next_batch(now=1.0) == []
    assert len(batcher.next_batch(now=1.0, flush=True)) == 1


def test_discard_removes_matching_items_only() -> None:
    batcher: AdapterBatcher[Item] = AdapterBatcher(max_batch_size=10, linger_s=0.0)
    for i in range(4):
        batcher.add(Item("a" if i % 2 else "b", float(i), i))
    removed = batcher.discard(lambda item: item.ident >= 2)
    assert sorted(i.ident for i in removed) == [2, 3]
    assert len(batcher) == 2
    assert sorted(i.ident for i in batcher.next_batch(now=10.0)) == [0, 1]


def switch_aware(**options) -> AdapterBatcher[Item]:
    return AdapterBatcher(max_batch_size=100, linger_s=0.0, **options)


def test_switch_aware_takes_at_most_max_adapters_largest_groups_first() -> None:
    batcher = switch_aware(max_adapters=2)
    for i, key in enumerate(["a", "b", "b", "c", "c", "c"]):
        batcher.add(Item(key, float(i), i))
    assert [item.adapter_key for item in batcher.next_batch(now=10.0)] == ["c"] * 3 + ["b"] * 2
    assert [item.adapter_key for item in batcher.next_batch(now=10.0)] == ["a"]


def test_switch_aware_prefers_resident_adapters() -> None:
    batcher = switch_aware(max_adapters=1, is_resident=lambda key: key == "small")
    for i in range(5):
        batcher.add(Item("big-but-cold", float(i), i))
    batcher.add(Item("small", 5.0, 5))
    assert [item.adapter_key for item in batcher.next_batch(now=6.0)] == ["small"]


def test_no_job_waits_past_the_starvation_bound() -> None:
    batcher = switch_aware(max_adapters=1, max_wait_s=5.0, is_resident=lambda key: key != "rare")
    batcher.add(Item("rare", 0.0, 0))
    for i in range(1, 10):
        batcher.add(Item("popular", float(i), i))
    assert batcher.next_batch(now=4.0)[0].adapter_key == "popular"  # rare not overdue yet
    for i in range(10, 20):
        batcher.add(Item("popular", float(i), i))
    assert [item.adapter_key for item in batcher.next_batch(now=5.0)] == ["rare"]


def test_arrival_policy_is_plain_fifo() -> None:
    batcher: AdapterBatcher[Item] = AdapterBatcher(
        max_batch_size=3, linger_s=0.0, policy=BatchPolicy.ARRIVAL
    )
    for i, key in enumerate(["a", "b", "a", "c", "b"]):
        batcher.add(Item(key, float(i), i))
    assert [item.ident for item in batcher.next_batch(now=10.0)] == [0, 1, 2]
    assert [item.ident for item in batcher.next_batch(now=10.0)] == [3, 4]
    assert len(batcher) == 0
