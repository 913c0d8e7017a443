"""Registry logic with an engine double that only records calls (no generation involved)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.adapter_fixtures import HOSTILE_FOLDERS, copy_adapter, read_as_non_root
from workers.adapters.checks import AdapterRequirements, adapter_digest
from workers.adapters.registry import AdapterRegistry
from workers.adapters.updates import UpdateRecord, decode_update
from workers.core.config import LLAMA_LORA_MODULES
from workers.core.contracts import (
    AdapterState,
    AdapterStatus,
    AdapterUpdate,
    AdapterVersionSpec,
    Job,
    ShadowSpec,
)
from workers.core.engine_api import AdapterHandle, AdapterLoadError, EngineDied
from workers.core.errors import AdapterError, JobRejected
from workers.kafka.status import last_serving_states


class RecordingEngine:
    def __init__(self) -> None:
        self.registered: dict[int, AdapterHandle] = {}
        self.pinned: set[int] = set()
        self.refuse: set[str] = set()
        # What loading (or pinning) a version raises, by version.
        self.load_fails: dict[str, BaseException] = {}
        self.pin_fails: dict[str, BaseException] = {}

    def register_adapter(self, adapter: AdapterHandle) -> None:
        if adapter.name in self.refuse:
            raise AdapterLoadError(f"{adapter.engine_name}: refused")
        if adapter.version in self.load_fails:
            raise self.load_fails[adapter.version]
        assert adapter.lora_id not in self.registered, "LoRA ids must never be reused"
        self.registered[adapter.lora_id] = adapter

    def unregister_adapter(self, adapter: AdapterHandle) -> None:
        del self.registered[adapter.lora_id]

    def pin_adapter(self, adapter: AdapterHandle) -> None:
        if adapter.version in self.pin_fails:
            raise self.pin_fails[adapter.version]
        self.pinned.add(adapter.lora_id)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for version, source in (("1", "customer-tone"), ("2", "partner-tone"), ("3", "classifier")):
        copy_adapter(tmp_path, source, f"tone-v{version}")
    return tmp_path


@pytest.fixture
def engine() -> RecordingEngine:
    return RecordingEngine()


@pytest.fixture
def statuses() -> list[AdapterStatus]:
    return []


@pytest.fixture
def registry(root: Path, engine: RecordingEngine, statuses: list) -> AdapterRegistry:
    return AdapterRegistry(
        engine,
        AdapterRequirements("tiny-llama", 8, LLAMA_LORA_MODULES, (root,)),
        worker_id="w1",
        on_status=statuses.append,
    )


def spec(root: Path, version: str, weight: float = 1.0) -> AdapterVersionSpec:
    path = root / f"tone-v{version}"
    return AdapterVersionSpec(
        version=version, path=str(path), sha256=adapter_digest(path), weight=weight
    )


def update(*specs: AdapterVersionSpec, **fields) -> AdapterUpdate:
    return AdapterUpdate(name="tone", base_model="tiny-llama", versions=list(specs), **fields)


def job(job_id: str = "j", tenant: str | None = None) -> Job:
    return Job(job_id=job_id, task="reply", input="x", tenant=tenant)


def test_new_version_takes_new_jobs_and_old_leaves_once_drained(registry, root, engine) -> None:
    assert registry.apply(update(spec(root, "1")))
    old = registry.resolve("tone", job())
    assert registry.apply(update(spec(root, "2")))
    new = registry.resolve("tone", job())
    assert (old.version, new.version) == ("1", "2")
    assert new.lora_id != old.lora_id
    digest = adapter_digest(root / "tone-v2")
    assert new.engine_name == f"tone@2#{digest[:12]}"
    registry.release_unused(in_use={old.lora_id})  # a routed job still holds v1
    assert old.lora_id in engine.registered
    registry.release_unused(in_use=set())
    assert set(engine.registered) == {new.lora_id}


def test_announcing_an_older_version_rolls_back(registry, root, engine) -> None:
    registry.apply(update(spec(root, "1")))
    first = registry.resolve("tone", job())
    registry.apply(update(spec(root, "2")))
    registry.release_unused(set())
    registry.apply(update(spec(root, "1")))
    again = registry.resolve("tone", job())
    assert again.version == "1"
    assert again.lora_id != first.lora_id  # reloaded under a fresh id


def test_canary_split_is_close_to_its_weight_and_deterministic(registry, root) -> None:
    registry.apply(update(spec(root, "1", 0.7), spec(root, "2", 0.3)))
    picks = [registry.resolve("tone", job(f"job-{i}")).version for i in range(4000)]
    share = picks.count("2") / len(picks)
    assert 0.27 < share < 0.33
    assert picks == [registry.resolve("tone", job(f"job-{i}")).version for i in range(4000)]


def test_a_rejected_update_keeps_the_previous_version(registry, root, engine, statuses) -> None:
    registry.apply(update(spec(root, "1")))
    engine.refuse.add("tone")
    assert not registry.apply(update(spec(root, "2")))
    assert registry.resolve("tone", job()).version == "1"
    assert (statuses[-1].state, statuses[-1].code, statuses[-1].version) == (
        "rejected",
        "load_failed",
        "2",
    )


def test_same_version_with_other_files_is_a_conflict(registry, root, statuses) -> None:
    registry.apply(update(spec(root, "1")))
    other_files = AdapterVersionSpec(
        version="1", path=str(root / "tone-v2"), sha256=adapter_digest(root / "tone-v2")
    )
    assert not registry.apply(update(other_files))
    assert statuses[-1].code == "version_conflict"
    assert registry.resolve("tone", job()).path.endswith("tone-v1")


def test_tenant_allow_list(registry, root) -> None:
    registry.apply(update(spec(root, "1"), tenants=["acme"]))
    assert registry.resolve("tone", job(tenant="acme")).version == "1"
    for tenant in ("globex", None):
        with pytest.raises(JobRejected) as rejected:
            registry.resolve("tone", job(tenant=tenant))
        assert rejected.value.code == "adapter_forbidden"


def test_hot_adapters_are_pinned(registry, root, engine) -> None:
    registry.apply(update(spec(root, "1"), hot=True))
    assert engine.pinned == {registry.resolve("tone", job()).lora_id}


def test_tombstone_retires_and_malformed_records_are_reported(registry, root, statuses) -> None:
    registry.apply(update(spec(root, "1")))
    registry.apply_record(decode_update(b"tone", b"{not json"))
    assert statuses[-1].code == "malformed_update"
    assert registry.resolve("tone", job()).version == "1"
    registry.apply_record(decode_update(b"tone", None))
    with pytest.raises(JobRejected) as rejected:
        registry.resolve("tone", job())
    assert rejected.value.code == "unknown_adapter"


def test_update_key_must_match_its_name(root) -> None:
    record = decode_update(b"other", update(spec(root, "1")).model_dump_json().encode())
    assert record.update is None and "differs" in (record.error or "")


def test_weights_must_add_up_to_one(root) -> None:
    with pytest.raises(ValueError):
        update(spec(root, "1", 0.5), spec(root, "2", 0.3))


def test_a_version_number_keeps_its_files_after_it_is_unloaded(registry, root, statuses) -> None:
    assert registry.apply(update(spec(root, "1")))
    assert registry.apply(update(spec(root, "2")))
    registry.release_unused(in_use=set())  # v1 leaves the engine
    other_files = spec(root, "3").model_copy(update={"version": "1"})
    assert not registry.apply(update(other_files))
    assert statuses[-1].code == "version_conflict"
    assert registry.resolve("tone", job()).version == "2"


def test_an_adapter_whose_reload_fails_is_unavailable_until_an_update_loads(
    registry, root, engine, statuses
) -> None:
    assert registry.apply(update(spec(root, "1")))
    handle = registry.resolve("tone", job())
    registry.mark_unavailable(handle, "reloading tone@1: files changed")
    assert handle.lora_id not in engine.registered
    assert (statuses[-1].state, statuses[-1].code) == ("rejected", "load_failed")
    with pytest.raises(JobRejected) as refused:
        registry.resolve("tone", job())
    assert refused.value.code == "adapter_unavailable"
    assert registry.apply(update(spec(root, "2")))
    assert registry.resolve("tone", job()).version == "2"


def test_a_new_worker_restores_the_good_state_a_rejected_update_was_compacted_over(
    registry, root, statuses
) -> None:
    # A worker running all along: v2 serves, then a bad update (wrong checksum) is rejected.
    good = update(spec(root, "2"), published_at_ms=1_000)
    bad_spec = spec(root, "3").model_copy(update={"sha256": "0" * 64})
    bad = update(bad_spec, published_at_ms=2_000)
    assert registry.apply(good) and not registry.apply(bad)
    assert registry.resolve("tone", job()).version == "2"
    fleet = last_serving_states(statuses)
    assert fleet["tone"] == good

    # A worker started after compaction sees the catalog's v1, then only the bad record.
    late = AdapterRegistry(
        RecordingEngine(),
        AdapterRequirements("tiny-llama", 8, LLAMA_LORA_MODULES, (root,)),
        worker_id="w2",
        on_status=lambda status: None,
    )
    assert late.apply(update(spec(root, "1")))  # published_at_ms 0, as the catalog's
    late.apply_record(decode_update(b"tone", bad.model_dump_json().encode()))
    assert late.resolve("tone", job()).version == "1"  # not what the fleet serves
    assert late.restore_last_good(fleet) == ["tone"]
    assert late.resolve("tone", job()).version == "2"


def test_a_state_newer_than_the_rejection_is_not_rolled_back(registry, root, statuses) -> None:
    newer = update(spec(root, "2"), published_at_ms=5_000)
    assert registry.apply(update(spec(root, "1"), published_at_ms=1_000))
    bad_spec = spec(root, "3").model_copy(update={"sha256": "0" * 64})
    assert not registry.apply(update(bad_spec, published_at_ms=2_000))
    assert registry.restore_last_good({"tone": newer}) == []
    assert registry.resolve("tone", job()).version == "1"


def test_a_worker_dedicated_to_one_adapter_ignores_others_and_refuses_a_canary(
    root, engine, statuses
) -> None:
    dedicated = AdapterRegistry(
        engine,
        AdapterRequirements("tiny-llama", 8, LLAMA_LORA_MODULES, (root,)),
        worker_id="w1",
        on_status=statuses.append,
        only="tone",
    )
    assert dedicated.apply(update(spec(root, "1")))
    other = update(spec(root, "2")).model_copy(update={"name": "other"})
    dedicated.apply_record(UpdateRecord(name="other", update=other, error=None))
    assert set(dedicated.served()) == {"tone"} and len(engine.registered) == 1
    assert not dedicated.apply(update(spec(root, "1", 0.8), spec(root, "2", 0.2)))
    assert (statuses[-1].state, statuses[-1].code) == ("rejected", "merged_one_version")
    assert dedicated.resolve("tone", job()).version == "1"  # the serving version stays


def shadow_of(root: Path, version: str, share: float) -> ShadowSpec:
    path = root / f"tone-v{version}"
    return ShadowSpec(version=version, path=str(path), sha256=adapter_digest(path), share=share)


def test_a_shadow_serves_no_one_and_shadows_its_share(registry, root, engine, statuses) -> None:
    assert registry.apply(update(spec(root, "1"), shadow=shadow_of(root, "2", 0.2)))
    handles = [registry.resolve("tone", job(f"job-{i}")) for i in range(2000)]
    assert {h.version for h in handles} == {"1"}
    shadows = [registry.shadow_for(h, job(f"job-{i}")) for i, h in enumerate(handles)]
    picked = [s for s in shadows if s is not None]
    assert {s.version for s in picked} == {"2"}
    assert abs(len(picked) / len(handles) - 0.2) < 0.03
    again = [registry.shadow_for(handles[i], job(f"job-{i}")) for i in range(2000)]
    assert again == shadows  # a stable choice per job
    states = {(s.version, s.state) for s in statuses}
    assert {("1", AdapterState.SERVING), ("2", AdapterState.SHADOW)} <= states
    # Loaded, and kept while it is the shadow: no route serves it, but it is in use.
    registry.release_unused(set())
    assert picked[0].lora_id in engine.registered


def test_a_shadow_that_fails_its_checks_rejects_the_update(registry, root, engine) -> None:
    assert registry.apply(update(spec(root, "1")))
    bad = shadow_of(root, "2", 0.5).model_copy(update={"sha256": "0" * 64})
    assert not registry.apply(update(spec(root, "1"), shadow=bad))
    handle = registry.resolve("tone", job())
    assert handle.version == "1" and registry.shadow_for(handle, job()) is None


def test_a_shadow_lost_on_reload_stops_shadowing_not_serving(registry, root) -> None:
    registry.apply(update(spec(root, "1"), shadow=shadow_of(root, "2", 1.0)))
    serving = registry.resolve("tone", job())
    shadow = registry.shadow_for(serving, job())
    assert shadow is not None
    registry.mark_unavailable(shadow, "files changed")
    assert registry.resolve("tone", job()) == serving
    assert registry.shadow_for(serving, job()) is None


# --- hostile update records: rejected with a code, the serving state untouched ---------------


def serving_only_v1(registry: AdapterRegistry, engine: RecordingEngine) -> None:
    handles = {registry.resolve("tone", job(f"job-{i}")) for i in range(50)}
    assert {h.version for h in handles} == {"1"}
    assert set(engine.registered) == {h.lora_id for h in handles}


def _record(key: bytes | None, value: dict | bytes | None) -> tuple[bytes | None, bytes | None]:
    return key, json.dumps(value).encode() if isinstance(value, dict) else value


def hostile_records(root: Path) -> dict[str, tuple[bytes | None, bytes | None]]:
    good = json.loads(update(spec(root, "2")).model_dump_json())
    version = good["versions"][0]
    return {
        "10 MB value": _record(b"tone", {**good, "tenants": ["x" * 10_000_000]}),
        "nested 100000 deep": _record(
            b"tone", b'{"name": "tone", "tenants": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        ),
        "invalid UTF-8": _record(b"tone", json.dumps(good).encode().replace(b"tone", b"t\xff")),
        "key and name differ": _record(b"tone", {**good, "name": "other"}),
        "a list": _record(b"tone", b"[1, 2]"),
        "NaN weight": _record(
            b"tone", json.dumps(good).encode().replace(b'"weight": 1.0', b'"weight": NaN')
        ),
        "a 5000-digit time": _record(
            b"tone",
            json.dumps(good)
            .encode()
            .replace(b'"published_at_ms": 0', b'"published_at_ms": ' + b"9" * 5000),
        ),
        "a path of 100 kB": _record(
            b"tone", {**good, "versions": [{**version, "path": "/" + "a" * 100_000}]}
        ),
        "a path that is NUL": _record(
            b"tone", {**good, "versions": [{**version, "path": "/srv/a\u0000b"}]}
        ),
        "a tombstone without a key": (None, None),
        "a 1 MB key": _record(b"k" * 1_000_000, None),
        "invalid UTF-8 key": _record(b"\xff\xfe", good),
    }


@pytest.mark.parametrize("case", sorted(hostile_records(Path("/r"))))
def test_hostile_records_are_rejected_and_the_serving_state_stays(
    registry, root, engine, statuses, case: str
) -> None:
    assert registry.apply(update(spec(root, "1")))
    key, value = hostile_records(root)[case]
    registry.apply_record(decode_update(key, value))
    rejected = statuses[-1]
    assert rejected.state == "rejected" and rejected.code in set(AdapterError)
    assert len(rejected.name) <= 300 and len(rejected.message or "") <= 1100
    serving_only_v1(registry, engine)


def test_a_tombstone_for_an_unknown_adapter_changes_nothing(
    registry, root, engine, statuses
) -> None:
    assert registry.apply(update(spec(root, "1")))
    reported = len(statuses)
    registry.apply_record(decode_update(b"never-announced", None))
    assert len(statuses) == reported
    serving_only_v1(registry, engine)


@pytest.mark.parametrize("case", sorted(HOSTILE_FOLDERS))
def test_hostile_folders_are_rejected_and_the_serving_state_stays(
    registry, root, engine, statuses, monkeypatch, case: str
) -> None:
    assert registry.apply(update(spec(root, "1")))
    path = root / "tone-v9"
    copy_adapter(root, "classifier", path.name)
    breaks, code = HOSTILE_FOLDERS[case]
    breaks(path)
    try:
        sha256 = adapter_digest(path)
    except OSError:  # a link loop has no digest: any will do, it is refused before
        sha256 = "0" * 64
    read_as_non_root(monkeypatch)
    hostile = AdapterVersionSpec(version="9", path=str(path), sha256=sha256)
    registry.apply_record(decode_update(b"tone", update(hostile).model_dump_json().encode()))
    assert (statuses[-1].state, statuses[-1].code, statuses[-1].version) == (
        "rejected",
        code,
        "9",
    )
    serving_only_v1(registry, engine)


# --- all or nothing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "code"),
    [
        (AdapterLoadError("refused"), "load_failed"),
        (RuntimeError("a bug"), "update_failed"),
        (MemoryError(), "update_failed"),
        (OSError(5, "I/O error"), "update_failed"),
    ],
)
def test_a_load_that_fails_midway_unloads_what_the_update_loaded(
    registry, root, engine, statuses, raised: BaseException, code: str
) -> None:
    assert registry.apply(update(spec(root, "1")))
    engine.load_fails["3"] = raised
    record = update(spec(root, "2", 0.5), spec(root, "3", 0.5))
    registry.apply_record(UpdateRecord("tone", record))
    assert (statuses[-1].state, statuses[-1].code) == ("rejected", code)
    serving_only_v1(registry, engine)  # v2, loaded for this update, left the engine
    # Nothing of the rejected update was kept: the same versions load once the engine takes them.
    engine.load_fails.clear()
    assert registry.apply(record)
    assert {registry.resolve("tone", job(f"j{i}")).version for i in range(50)} == {"2", "3"}


@pytest.mark.parametrize("raised", [AdapterLoadError("slots full"), ValueError("pinning")])
def test_a_pin_that_fails_midway_switches_nothing(
    registry, root, engine, statuses, raised: BaseException
) -> None:
    assert registry.apply(update(spec(root, "1")))
    engine.pin_fails["3"] = raised
    assert not registry.apply(update(spec(root, "2", 0.5), spec(root, "3", 0.5), hot=True))
    assert (statuses[-1].state, statuses[-1].code) == ("rejected", "load_failed")
    assert not any(s.state == "serving" and s.version in {"2", "3"} for s in statuses)
    serving_only_v1(registry, engine)


def test_an_engine_death_while_applying_propagates_and_switches_nothing(
    registry, root, engine
) -> None:
    assert registry.apply(update(spec(root, "1")))
    engine.load_fails["2"] = EngineDied("engine-core died")
    with pytest.raises(EngineDied):
        registry.apply_record(UpdateRecord("tone", update(spec(root, "2"))))
    assert registry.resolve("tone", job()).version == "1"
    engine.load_fails.clear()  # the worker restarts the engine and applies the record again
    registry.apply_record(UpdateRecord("tone", update(spec(root, "2"))))
    assert registry.resolve("tone", job()).version == "2"


@pytest.mark.parametrize("deaths", [1, 2, 3])
def test_a_record_that_kills_the_engine_is_applied_once_more_then_refused(
    registry, root, engine, statuses, deaths: int
) -> None:
    """At start-up (catching up the compacted topic) and between steps alike: one death is
    the engine's, a second the record's; neither leaves the caller."""
    assert registry.apply(update(spec(root, "1")))
    restarts: list[EngineDied] = []

    def restart(death: EngineDied) -> None:
        restarts.append(death)
        if len(restarts) >= deaths:
            engine.load_fails.clear()

    engine.load_fails["2"] = EngineDied("engine-core died")
    registry.apply_record_surviving(UpdateRecord("tone", update(spec(root, "2"))), restart)
    if deaths == 1:
        assert len(restarts) == 1
        assert registry.resolve("tone", job()).version == "2"
    else:
        assert len(restarts) == 2
        assert registry.resolve("tone", job()).version == "1"
        assert (statuses[-1].state, statuses[-1].code) == ("rejected", "load_failed")


def test_a_status_that_cannot_be_written_does_not_stop_the_update(root, engine) -> None:
    def unwritable(status: AdapterStatus) -> None:
        raise BufferError("local queue full")

    registry = AdapterRegistry(
        engine,
        AdapterRequirements("tiny-llama", 8, LLAMA_LORA_MODULES, (root,)),
        worker_id="w1",
        on_status=unwritable,
    )
    registry.apply_record(UpdateRecord("tone", update(spec(root, "1"))))
    registry.apply_record(decode_update(b"tone", b"{not json"))
    assert registry.resolve("tone", job()).version == "1"


# --- a version that fails a reload -------------------------------------------------------------


def test_a_failing_canary_leaves_every_stable_job_on_the_stable_version(
    registry, root, engine, statuses
) -> None:
    assert registry.apply(update(spec(root, "1", 0.9), spec(root, "2", 0.1)))
    before = {i: registry.resolve("tone", job(f"job-{i}")) for i in range(2000)}
    canary = next(h for h in before.values() if h.version == "2")
    stable = next(h for h in before.values() if h.version == "1")
    registry.mark_unavailable(canary, "reloading tone@2: files changed")
    after = {i: registry.resolve("tone", job(f"job-{i}")) for i in range(2000)}
    assert set(after.values()) == {stable}  # the canary's share went to the stable version
    assert canary.lora_id not in engine.registered and stable.lora_id in engine.registered
    assert (statuses[-1].state, statuses[-1].code, statuses[-1].version) == (
        "rejected",
        "load_failed",
        "2",
    )
    # Only when no version is left does the adapter become unavailable.
    registry.mark_unavailable(stable, "reloading tone@1: files changed")
    with pytest.raises(JobRejected) as refused:
        registry.resolve("tone", job())
    assert refused.value.code == "adapter_unavailable"


def test_a_failed_versions_share_is_spread_over_the_others_by_their_weights(registry, root) -> None:
    assert registry.apply(update(spec(root, "1", 0.5), spec(root, "2", 0.2), spec(root, "3", 0.3)))
    before = {i: registry.resolve("tone", job(f"job-{i}")) for i in range(4000)}
    failed = next(h for h in before.values() if h.version == "2")
    registry.mark_unavailable(failed, "files changed")
    after = {i: registry.resolve("tone", job(f"job-{i}")) for i in range(4000)}
    # A job on a surviving version keeps it (a retried job lands where it did).
    assert all(after[i] == h for i, h in before.items() if h.version != "2")
    share = [h.version for h in after.values()].count("1") / len(after)
    assert abs(share - 0.5 / 0.8) < 0.03
    weights = {r.handle.version: r.weight for r in registry.served()["tone"].routes}
    assert weights == pytest.approx({"1": 0.625, "3": 0.375})


@pytest.mark.parametrize("raised", [RecursionError(), MemoryError()])
def test_decoding_never_raises(root, monkeypatch, raised: BaseException) -> None:
    def parser_gives_up(_value: bytes) -> AdapterUpdate:
        raise raised

    monkeypatch.setattr(AdapterUpdate, "model_validate_json", parser_gives_up)
    record = decode_update(b"tone", update(spec(root, "1")).model_dump_json().encode())
    assert record.update is None and type(raised).__name__ in (record.error or "")


def test_an_oversized_update_is_refused_before_it_is_parsed(root, monkeypatch) -> None:
    def must_not_parse(_value: bytes) -> AdapterUpdate:
        raise AssertionError("parsed")

    monkeypatch.setattr(AdapterUpdate, "model_validate_json", must_not_parse)
    record = decode_update(b"tone", b"{" + b" " * 10_000_000 + b"}")
    assert record.update is None and "bytes" in (record.error or "")


def test_a_bug_applying_a_record_refuses_the_record(registry, root, statuses, monkeypatch) -> None:
    assert registry.apply(update(spec(root, "1")))

    def buggy_retire(name: str) -> None:
        raise KeyError(name)

    monkeypatch.setattr(registry, "retire", buggy_retire)
    registry.apply_record(decode_update(b"tone", None))
    assert (statuses[-1].state, statuses[-1].code) == ("rejected", "update_failed")
    assert registry.resolve("tone", job()).version == "1"
