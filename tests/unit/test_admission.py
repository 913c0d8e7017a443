"""Admission into the engine: which waiting jobs enter now. Plain data only."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from workers.core.admission import Admission, AdmissionPolicy


@dataclass(frozen=True, eq=False)
class Item:
    adapter_key: Hashable
    arrived_at: float
    tenant: str | None = None


def fill(
    admission: Admission[Item], spec: list[tuple[Hashable, str | None, int]], start: float = 0.0
) -> None:
    """(adapter, tenant, count) groups, arriving in the order given from `start` on."""
    clock = start
    for adapter, tenant, count in spec:
        for _ in range(count):
            admission.add(Item(adapter, clock, tenant))
            clock += 0.001


def test_feeds_at_most_max_adapters_preferring_those_in_the_engine() -> None:
    admission: Admission[Item] = Admission(max_adapters=2)
    fill(admission, [("a", None, 50), ("b", None, 5), ("c", None, 30)])
    taken = admission.take(now=1.0, room=100, in_engine={"b": 3})
    assert {item.adapter_key for item in taken} == {"b", "a"}  # b is in, a is the larger
    assert len(taken) == 55 and len(admission) == 30


def test_an_adapter_not_chosen_gets_no_new_jobs_so_its_slot_drains() -> None:
    admission: Admission[Item] = Admission(max_adapters=1)
    fill(admission, [("a", None, 3), ("b", None, 40)])
    # a is in the engine, but b's group is far larger and not resident: a still wins while
    # in the engine; once a's requests finish, b is chosen.
    assert {i.adapter_key for i in admission.take(1.0, 10, {"a": 1})} == {"a"}
    assert {i.adapter_key for i in admission.take(1.0, 10, {"a": 1})} == {"b"}


def test_an_overdue_job_goes_first_whatever_its_group() -> None:
    admission: Admission[Item] = Admission(max_adapters=1, max_wait_s=5.0)
    admission.add(Item("rare", 0.0))
    fill(admission, [("busy", None, 100)], start=3.0)
    assert [i.adapter_key for i in admission.take(now=1.0, room=4, in_engine={"busy": 4})] == [
        "busy"
    ] * 4
    first = admission.take(now=6.0, room=4, in_engine={"busy": 4})
    assert first[0].adapter_key == "rare"
    assert {i.adapter_key for i in first} == {"rare"}  # the only adapter fed now


def test_a_flooding_tenant_does_not_starve_another_on_the_same_adapter() -> None:
    admission: Admission[Item] = Admission()
    fill(admission, [("a", "flood", 200), ("a", "quiet", 10)])
    taken = admission.take(now=1.0, room=20, in_engine={})
    assert Counter(i.tenant for i in taken) == {"flood": 10, "quiet": 10}


def test_tenant_weights_share_the_room() -> None:
    admission: Admission[Item] = Admission(tenant_weights={"gold": 3.0})
    fill(admission, [("a", "gold", 100), ("a", "basic", 100)])
    taken = admission.take(now=1.0, room=40, in_engine={})
    assert Counter(i.tenant for i in taken) == {"gold": 30, "basic": 10}


def test_a_tenant_back_from_idle_gets_no_saved_credit() -> None:
    admission: Admission[Item] = Admission()
    fill(admission, [("a", "steady", 100)])
    assert len(admission.take(now=1.0, room=60, in_engine={})) == 60  # steady alone
    fill(admission, [("a", "late", 100)], start=1.0)
    taken = admission.take(now=1.0, room=20, in_engine={})
    # Level from its return on: turns alternate, it does not get the next 60 to catch up.
    assert Counter(i.tenant for i in taken) == {"steady": 10, "late": 10}


def test_arrival_policy_is_oldest_first_across_adapters() -> None:
    admission: Admission[Item] = Admission(policy=AdmissionPolicy.ARRIVAL, max_adapters=1)
    items = [Item(key, float(t)) for t, key in enumerate("abcabc")]
    for item in items:
        admission.add(item)
    assert admission.take(now=10.0, room=4, in_engine={}) == items[:4]


def test_discard_removes_matching_jobs_only() -> None:
    admission: Admission[Item] = Admission()
    fill(admission, [("a", "x", 5), ("b", "y", 5)])
    removed = admission.discard(lambda item: item.tenant == "x")
    assert len(removed) == 5 and len(admission) == 5
    assert {i.tenant for i in admission.take(1.0, 100, {})} == {"y"}


@settings(max_examples=200, deadline=None)
@given(
    arrivals=st.lists(
        st.tuples(st.sampled_from("abcde"), st.sampled_from([None, "t1", "t2", "t3"])),
        max_size=80,
    ),
    rooms=st.lists(st.integers(min_value=0, max_value=16), min_size=1, max_size=30),
    policy=st.sampled_from(list(AdmissionPolicy)),
    max_adapters=st.one_of(st.none(), st.integers(min_value=1, max_value=3)),
)
def test_every_job_is_admitted_exactly_once(
    arrivals: list[tuple[str, str | None]],
    rooms: list[int],
    policy: AdmissionPolicy,
    max_adapters: int | None,
) -> None:
    admission: Admission[Item] = Admission(policy=policy, max_adapters=max_adapters, max_wait_s=1)
    items = [Item(key, float(n), tenant) for n, (key, tenant) in enumerate(arrivals)]
    taken: list[Item] = []
    in_engine: Counter[Hashable] = Counter()
    half = len(items) // 2
    for item in items[:half]:
        admission.add(item)
    for step, room in enumerate(rooms):
        batch = admission.take(now=float(step), room=room, in_engine=in_engine)
        assert len(batch) <= room
        taken += batch
        in_engine = Counter(item.adapter_key for item in batch)
        if step == 0:
            for item in items[half:]:
                admission.add(item)
    while len(admission):
        taken += admission.take(now=1e9, room=7, in_engine={})
    assert sorted(map(id, taken)) == sorted(map(id, items))


def test_a_heavy_tenant_back_from_idle_starts_level_with_a_light_one_back_first() -> None:
    # Both go idle; the light tenant's total is far below the heavy one's. Whoever returns
    # first, each starts at the current virtual time: turns alternate at once, and the heavy
    # tenant does not wait (until overdue) for the light one to catch up its old total.
    admission: Admission[Item] = Admission(max_wait_s=1000.0)
    fill(admission, [("a", "heavy", 100)])
    assert len(admission.take(now=1.0, room=100, in_engine={})) == 100
    fill(admission, [("a", "light", 5)], start=1.0)
    assert len(admission.take(now=2.0, room=5, in_engine={})) == 5
    fill(admission, [("a", "light", 50)], start=3.0)
    fill(admission, [("a", "heavy", 50)], start=4.0)
    taken = admission.take(now=5.0, room=20, in_engine={})
    counts = Counter(i.tenant for i in taken)
    assert abs(counts["heavy"] - counts["light"]) <= 1, counts


def test_overdue_jobs_are_taken_in_fair_order_among_themselves() -> None:
    admission: Admission[Item] = Admission(max_wait_s=5.0)
    fill(admission, [("a", "flood", 100)])
    fill(admission, [("a", "quiet", 10)], start=1.0)
    # Everything is overdue: the quiet tenant's jobs are not kept behind the flood's older ones.
    taken = admission.take(now=10.0, room=20, in_engine={})
    assert Counter(i.tenant for i in taken) == {"flood": 10, "quiet": 10}


def test_overdue_jobs_still_go_before_those_not_overdue() -> None:
    admission: Admission[Item] = Admission(max_wait_s=5.0)
    fill(admission, [("a", "old", 5)])
    fill(admission, [("a", "new", 100)], start=8.0)
    taken = admission.take(now=9.0, room=5, in_engine={})
    assert {i.tenant for i in taken} == {"old"}


def test_slots_bound_the_distinct_adapters_in_the_engine() -> None:
    # Shadow runs: arrival order, but a new adapter enters only while the engine has a free
    # adapter slot (max_loras); the others wait rather than exceed it.
    admission: Admission[Item] = Admission(policy=AdmissionPolicy.ARRIVAL)
    for t, key in enumerate(["s1", "s2", "s1", "s3", "s2"]):
        admission.add(Item(key, float(t)))
    in_engine = {"a": 3, "b": 1, "gone": 0}
    taken = admission.take(now=10.0, room=10, in_engine=in_engine, slots=3)
    assert [i.adapter_key for i in taken] == ["s1", "s1"]
    # An adapter already in the engine takes no new slot.
    taken = admission.take(now=10.0, room=10, in_engine={**in_engine, "s2": 1}, slots=3)
    assert [i.adapter_key for i in taken] == ["s2", "s2"]
    assert admission.take(now=10.0, room=10, in_engine=in_engine, slots=2) == []
    assert len(admission) == 1
