"""The base model by path or hub id (offline), and the engine values that follow the model,
the catalog and the platform (`workers.engine.model`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.unit.adapter_fixtures import copy_adapter
from workers.core.config import AdapterCatalog, AdapterEntry, ConfigError, EngineSettings
from workers.engine.model import Platform, engine_values, read_model_info, resolve_model

ZOO_MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-llama"
CPU = Platform(cpu=True, dtypes=("bfloat16", "float16", "float32"))
GPU = Platform(cpu=False, dtypes=("bfloat16", "float16", "float32"))


def fake_hub_cache(cache: Path, repo_id: str, config: dict | None = None) -> Path:
    """A model in the Hugging Face cache's layout (refs/main -> snapshots/<commit>)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(ZOO_MODEL, snapshot)
    if config is not None:
        (snapshot / "config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    return snapshot


def model_config(**changes: object) -> dict:
    return {**json.loads((ZOO_MODEL / "config.json").read_text()), **changes}


def test_a_hub_id_resolves_from_the_local_cache_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the code itself must not reach out
    snapshot = fake_hub_cache(tmp_path, "acme/tiny-chat")
    assert resolve_model("acme/tiny-chat") == snapshot
    info = read_model_info("acme/tiny-chat")
    assert info.name == "acme/tiny-chat"
    assert info.path == snapshot
    assert (info.architecture, info.hidden_size, info.vocab_size) == ("LlamaForCausalLM", 128, 512)
    assert info.max_position_embeddings == 512
    assert info.torch_dtype == "float32"
    assert info.weight_shapes["model.layers.0.self_attn.q_proj.weight"] == (128, 128)
    assert "q_proj" in info.lora_modules and "embed_tokens" not in info.lora_modules


def test_a_hub_id_not_in_the_cache_is_one_line_saying_how_to_fetch_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError) as error:
        resolve_model("acme/not-downloaded")
    message = str(error.value)
    assert "\n" not in message
    assert "hf download acme/not-downloaded" in message
    with pytest.raises(ConfigError, match="neither a directory"):
        resolve_model(str(tmp_path / "no-such-model"))


def test_the_zoo_keeps_serving_as_before_on_the_cpu() -> None:
    values = engine_values(EngineSettings(model=ZOO_MODEL), {"a": 8}, platform=CPU)
    assert (values.dtype, values.max_model_len, values.max_lora_rank) == ("float32", 512, 8)
    assert values.enforce_eager is True and values.identity_adapter is True
    kwargs = values.llm_kwargs()
    assert kwargs["kv_cache_memory_bytes"] == 2**30
    assert "gpu_memory_utilization" not in kwargs


def test_dtype_auto_is_the_models_own_and_float32_where_the_platform_lacks_it(
    tmp_path: Path,
) -> None:
    model = tmp_path / "bf16"
    shutil.copytree(ZOO_MODEL, model)
    (model / "config.json").write_text(json.dumps(model_config(dtype="bfloat16")))
    assert engine_values(EngineSettings(model=model), {}, platform=CPU).dtype == "bfloat16"
    no_bf16 = Platform(cpu=True, dtypes=("float16", "float32"))
    assert engine_values(EngineSettings(model=model), {}, platform=no_bf16).dtype == "float32"
    explicit = EngineSettings(model=model, dtype="float32")
    assert engine_values(explicit, {}, platform=CPU).dtype == "float32"


def test_rank_follows_the_catalog_and_a_lower_explicit_rank_names_the_adapter(
    tmp_path: Path,
) -> None:
    copy_adapter(tmp_path, "classifier", "small")
    copy_adapter(tmp_path, "summarizer", "wide", r=16)
    catalog = AdapterCatalog(
        base_model="tiny-llama",
        adapters=[
            AdapterEntry(name="small", version="1", path=tmp_path / "small"),
            AdapterEntry(name="wide", version="1", path=tmp_path / "wide"),
        ],
    )
    assert engine_values(EngineSettings(), catalog, platform=CPU).max_lora_rank == 16
    # Rounded up to a rank vLLM takes.
    assert engine_values(EngineSettings(), {"odd": 12}, platform=CPU).max_lora_rank == 16
    with pytest.raises(ConfigError, match=r"below the rank 16 of catalog adapter 'wide'"):
        engine_values(EngineSettings(max_lora_rank=8), catalog, platform=CPU)
    with pytest.raises(ValueError, match="vLLM takes"):
        EngineSettings(max_lora_rank=12)


def test_context_follows_the_model_capped_and_never_above_it(tmp_path: Path) -> None:
    model = tmp_path / "long"
    shutil.copytree(ZOO_MODEL, model)
    (model / "config.json").write_text(json.dumps(model_config(max_position_embeddings=32768)))
    assert engine_values(EngineSettings(model=model), {}, platform=CPU).max_model_len == 8192
    capped = EngineSettings(model=model, max_model_len_cap=2048)
    assert engine_values(capped, {}, platform=CPU).max_model_len == 2048
    explicit = EngineSettings(model=model, max_model_len=16384)
    assert engine_values(explicit, {}, platform=CPU).max_model_len == 16384
    with pytest.raises(ConfigError, match="above tiny-llama's context of 512"):
        engine_values(EngineSettings(model=ZOO_MODEL, max_model_len=1024), {}, platform=CPU)


def test_gpu_settings_pass_through_and_the_cpu_workarounds_stay_off() -> None:
    settings = EngineSettings(
        model=ZOO_MODEL,
        gpu_memory_utilization=0.8,
        tensor_parallel_size=2,
        max_num_batched_tokens=4096,
    )
    values = engine_values(settings, {}, platform=GPU)
    assert values.enforce_eager is None and values.identity_adapter is False
    kwargs = values.llm_kwargs()
    assert kwargs["gpu_memory_utilization"] == 0.8
    assert kwargs["tensor_parallel_size"] == 2
    assert kwargs["max_num_batched_tokens"] == 4096
    assert "enforce_eager" not in kwargs and "kv_cache_memory_bytes" not in kwargs
    forced = EngineSettings(model=ZOO_MODEL, enforce_eager=True, base_via_identity_adapter=True)
    values = engine_values(forced, {}, platform=GPU)
    assert values.llm_kwargs()["enforce_eager"] is True and values.identity_adapter is True
