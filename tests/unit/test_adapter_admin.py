from workers.adapters.admin import next_state
from workers.core.contracts import AdapterUpdate, AdapterVersionSpec

SHA = "a" * 64


def version(name: str, weight: float = 1.0) -> AdapterVersionSpec:
    return AdapterVersionSpec(version=name, path=f"/m/{name}", sha256=SHA, weight=weight)


def state(*versions: AdapterVersionSpec) -> AdapterUpdate:
    return AdapterUpdate(name="tone", base_model="tiny", versions=list(versions), tenants=["a"])


def shares(update: AdapterUpdate) -> dict[str, float]:
    return {v.version: round(v.weight, 6) for v in update.versions}


def test_full_weight_replaces_every_version() -> None:
    new = next_state(state(version("1")), "tone", version("2"), "tiny", None, False)
    assert shares(new) == {"2": 1.0}
    assert new.tenants == ["a"]  # kept unless given


def test_canary_takes_its_share_from_the_serving_versions() -> None:
    current = state(version("1", 0.6), version("2", 0.4))
    new = next_state(current, "tone", version("3", 0.1), "tiny", ["b"], True)
    assert shares(new) == {"1": 0.54, "2": 0.36, "3": 0.1}
    assert (new.tenants, new.hot) == (["b"], True)


def test_republishing_a_version_changes_its_weight() -> None:
    current = state(version("1", 0.7), version("2", 0.3))
    assert shares(next_state(current, "tone", version("2", 0.5), "tiny", None, False)) == {
        "1": 0.5,
        "2": 0.5,
    }


def test_first_announcement_serves_alone() -> None:
    assert shares(next_state(None, "tone", version("1", 0.2), "tiny", None, False)) == {"1": 1.0}
