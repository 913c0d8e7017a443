from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.adapter_fixtures import HOSTILE_FOLDERS, copy_adapter, read_as_non_root
from workers.adapters.checks import AdapterRequirements, adapter_digest, inspect_adapter
from workers.core.config import LLAMA_LORA_MODULES
from workers.core.errors import AdapterRejected


def check(
    path: Path | str,
    root: Path,
    expected_sha256: str | None = None,
    claimed_base_model: str = "tiny-llama",
    **requirements,
):
    served = {
        "base_model": "/opt/models/tiny-llama",
        "max_rank": 8,
        "supported_modules": LLAMA_LORA_MODULES,
        "allowed_roots": (root,),
        **requirements,
    }
    return inspect_adapter(
        str(path),
        AdapterRequirements(**served),
        expected_sha256=expected_sha256,
        claimed_base_model=claimed_base_model,
    )


def rejection_code(path: Path | str, root: Path, **overrides) -> str:
    with pytest.raises(AdapterRejected) as rejected:
        check(path, root, **overrides)
    return rejected.value.code


def test_a_good_adapter_passes_with_its_facts(tmp_path: Path) -> None:
    path = copy_adapter(tmp_path, "classifier")
    facts = check(path, tmp_path, expected_sha256=adapter_digest(path))
    assert facts.rank == 8
    assert facts.path == path.resolve()
    assert "q_proj" in facts.target_modules


def test_digest_changes_with_any_byte(tmp_path: Path) -> None:
    path = copy_adapter(tmp_path, "classifier")
    before = adapter_digest(path)
    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert adapter_digest(path) != before
    assert rejection_code(path, tmp_path, expected_sha256=before) == "checksum_mismatch"


def test_paths_outside_the_roots_are_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    copy_adapter(outside, "classifier")
    assert rejection_code(outside / "classifier", root) == "path_outside_roots"
    assert rejection_code(f"{root}/../outside/classifier", root) == "path_outside_roots"
    (root / "innocent").symlink_to(outside / "classifier")
    assert rejection_code(root / "innocent", root) == "path_outside_roots"


def test_missing_directory_and_files(tmp_path: Path) -> None:
    assert rejection_code(tmp_path / "nope", tmp_path) == "path_missing"
    path = copy_adapter(tmp_path, "classifier")
    (path / "adapter_model.safetensors").unlink()
    assert rejection_code(path, tmp_path) == "files_missing"


def test_other_base_model_is_refused_by_claim_or_by_config(tmp_path: Path) -> None:
    path = copy_adapter(tmp_path, "classifier")
    assert rejection_code(path, tmp_path, claimed_base_model="other-llama") == (
        "base_model_mismatch"
    )
    foreign = copy_adapter(tmp_path, "classifier", "foreign", base_model_name_or_path="org/big")
    assert rejection_code(foreign, tmp_path) == "base_model_mismatch"


def test_rank_and_modules_limits(tmp_path: Path) -> None:
    path = copy_adapter(tmp_path, "classifier")
    assert rejection_code(path, tmp_path, max_rank=4) == "rank_too_large"
    odd = copy_adapter(tmp_path, "classifier", "odd", target_modules=["q_proj", "lm_head"])
    assert rejection_code(odd, tmp_path) == "target_modules_unsupported"
    broken = copy_adapter(tmp_path, "classifier", "broken", r="eight")
    assert rejection_code(broken, tmp_path) == "invalid_adapter_config"


@pytest.mark.parametrize("case", sorted(HOSTILE_FOLDERS))
def test_hostile_folders_are_refused_with_their_code(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    path = copy_adapter(root, "classifier")
    breaks, code = HOSTILE_FOLDERS[case]
    breaks(path)
    read_as_non_root(monkeypatch)
    # Broken files are refused before their checksum is compared, a broken config after.
    before_checksum = {"files_missing", "path_missing", "files_unreadable", "path_outside_roots"}
    expected = "0" * 64 if code in before_checksum else adapter_digest(path)
    assert rejection_code(path, root, expected_sha256=expected) == code


def test_a_path_too_long_to_stat_is_unreadable(tmp_path: Path) -> None:
    assert rejection_code(tmp_path / ("x" * 5000), tmp_path) == "files_unreadable"


def test_the_digest_skips_what_is_not_a_regular_file(tmp_path: Path) -> None:
    path = copy_adapter(tmp_path, "classifier")
    before = adapter_digest(path)
    (path / "dangling").symlink_to(path / "gone")
    os.mkfifo(path / "pipe")  # a whole-file read of it would block forever
    assert adapter_digest(path) == before
