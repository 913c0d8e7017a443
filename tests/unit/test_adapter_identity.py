"""Same base by identity: an adapter's shapes must fit the served model and any base it names
that resolves locally must be the same model (architecture, hidden size, vocabulary); the
name alone need not match."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.unit.adapter_fixtures import ZOO_ADAPTERS, copy_adapter
from workers.adapters.checks import AdapterRequirements, inspect_adapter
from workers.core.config import AdapterSettings
from workers.core.errors import AdapterRejected
from workers.engine.model import identify, read_model_info

ZOO_MODEL = ZOO_ADAPTERS.parent / "tiny-llama"


def requirements(root: Path) -> AdapterRequirements:
    settings = AdapterSettings(allowed_roots=[root])
    return AdapterRequirements.of(settings, read_model_info(str(ZOO_MODEL)), 8, identify)


def check(path: Path, root: Path, claimed: str = "tiny-llama"):
    return inspect_adapter(
        str(path), requirements(root), expected_sha256=None, claimed_base_model=claimed
    )


def rejection(path: Path, root: Path, claimed: str = "tiny-llama") -> AdapterRejected:
    with pytest.raises(AdapterRejected) as rejected:
        check(path, root, claimed)
    return rejected.value


def other_base(directory: Path, **config: object) -> Path:
    """A model folder whose config differs from tiny-llama's by `config`."""
    shutil.copytree(ZOO_MODEL, directory)
    original = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**original, **config}))
    return directory


def test_every_zoo_adapter_fits_the_zoo_model(tmp_path: Path) -> None:
    for adapter in sorted(p.name for p in ZOO_ADAPTERS.iterdir()):
        facts = check(copy_adapter(tmp_path, adapter), tmp_path)
        assert facts.rank == 8


def test_an_adapter_whose_shapes_do_not_fit_names_both_sides(tmp_path: Path) -> None:
    path = copy_adapter(tmp_path, "classifier")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {  # trained on a model 64 wide
            f"{prefix}.lora_A.weight": np.zeros((8, 64), dtype=np.float32),
            f"{prefix}.lora_B.weight": np.zeros((64, 8), dtype=np.float32),
        },
        str(path / "adapter_model.safetensors"),
    )
    rejected = rejection(path, tmp_path)
    assert rejected.code == "base_model_mismatch"
    assert "\n" not in rejected.message
    assert "was trained on 'tiny-llama' (its model.layers.0.self_attn.q_proj.lora_A is 8x64" in (
        rejected.message
    )
    assert "this worker serves tiny-llama (LlamaForCausalLM, hidden 128, vocab 512)" in (
        rejected.message
    )


def test_an_adapter_of_a_module_the_model_lacks_is_refused(tmp_path: Path) -> None:
    path = copy_adapter(tmp_path, "classifier")
    save_file(
        {"base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": np.zeros((8, 128))},
        str(path / "adapter_model.safetensors"),
    )
    assert "model.layers.7.self_attn.q_proj, which the model does not have" in (
        rejection(path, tmp_path).message
    )


def test_a_local_base_of_another_identity_is_refused_naming_both(tmp_path: Path) -> None:
    qwen = other_base(
        tmp_path / "models" / "tiny-qwen", architectures=["Qwen2ForCausalLM"], vocab_size=600
    )
    path = copy_adapter(tmp_path, "classifier", base_model_name_or_path=str(qwen))
    message = rejection(path, tmp_path).message
    assert message == (
        f"adapter {path} was trained on tiny-qwen (Qwen2ForCausalLM, hidden 128, vocab 600); "
        "this worker serves tiny-llama (LlamaForCausalLM, hidden 128, vocab 512)"
    )


def test_a_local_base_of_the_same_identity_passes_under_another_name(tmp_path: Path) -> None:
    renamed = other_base(tmp_path / "models" / "my-llama-copy")
    path = copy_adapter(tmp_path, "classifier", base_model_name_or_path=str(renamed))
    assert check(path, tmp_path, claimed=str(renamed)).rank == 8


def test_an_unresolvable_base_of_another_name_is_still_refused(tmp_path: Path) -> None:
    path = copy_adapter(tmp_path, "classifier", base_model_name_or_path="org/big")
    rejected = rejection(path, tmp_path)
    assert rejected.code == "base_model_mismatch"
    assert "was trained on 'org/big'; this worker serves tiny-llama (LlamaForCausalLM" in (
        rejected.message
    )


def test_target_modules_follow_the_model(tmp_path: Path) -> None:
    model = read_model_info(str(ZOO_MODEL))
    assert model.lora_modules == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    narrowed = AdapterSettings(allowed_roots=[tmp_path], supported_target_modules={"q_proj"})
    reqs = AdapterRequirements.of(narrowed, model, 8)
    assert reqs.supported_modules == {"q_proj"}
