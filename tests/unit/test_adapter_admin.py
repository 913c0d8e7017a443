import pytest

from workers.adapters.admin import encoded, next_state, promoted, with_shadow
from workers.adapters.updates import decode_update
from workers.core.config import ConfigError
from workers.core.contracts import AdapterUpdate, AdapterVersionSpec, ShadowSpec

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


def shadow(name: str, share: float = 0.2) -> ShadowSpec:
    return ShadowSpec(version=name, path=f"/m/{name}", sha256=SHA, share=share)


def test_a_shadow_joins_the_serving_state_unchanged() -> None:
    current = state(version("1", 0.6), version("2", 0.4))
    shadowed = with_shadow(current, "tone", shadow("3"))
    assert shares(shadowed) == shares(current) and shadowed.shadow == shadow("3")
    with pytest.raises(ConfigError, match="already serves"):
        with_shadow(current, "tone", shadow("2"))
    with pytest.raises(ConfigError, match="serves no version"):
        with_shadow(None, "tone", shadow("3"))
    # A later canary keeps the shadow running.
    canary = next_state(shadowed, "tone", version("4", 0.1), "tiny", None, False)
    assert canary.shadow == shadow("3")


def test_promoting_a_shadow_makes_it_serve_and_ends_the_shadow() -> None:
    shadowed = with_shadow(state(version("1")), "tone", shadow("2"))
    everyone = promoted(shadowed, "tone", "2", 1.0)
    assert shares(everyone) == {"2": 1.0} and everyone.shadow is None
    assert everyone.versions[0].path == "/m/2" and everyone.tenants == ["a"]
    canary = promoted(shadowed, "tone", "2", 0.25)
    assert shares(canary) == {"1": 0.75, "2": 0.25} and canary.shadow is None
    # A canary can be promoted the same way.
    assert shares(promoted(canary, "tone", "2", 1.0)) == {"2": 1.0}
    with pytest.raises(ConfigError, match="no version '9'"):
        promoted(shadowed, "tone", "9", 1.0)


def test_a_state_workers_would_refuse_for_its_size_is_not_published() -> None:
    fits = state(version("1"))
    assert decode_update(b"tone", encoded(fits)).update == fits
    crowded = fits.model_copy(update={"tenants": [f"tenant-{i:06d}" for i in range(50_000)]})
    with pytest.raises(ConfigError, match="bytes"):
        encoded(crowded)
    assert decode_update(b"tone", crowded.model_dump_json().encode()).update is None
