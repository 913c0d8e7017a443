"""`check`'s rows (`workers.check`): all ok on the repository's own configuration, and each
broken piece a failing row that names the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.adapter_fixtures import copy_adapter
from workers.check import CheckRow, run_checks
from workers.core.config import AdapterSettings, EngineSettings, Settings
from workers.engine.model import Platform

ROOT = Path(__file__).resolve().parents[2]
CPU = Platform(cpu=True, dtypes=("bfloat16", "float16", "float32"))


def settings(**changes: object) -> Settings:
    base: dict[str, object] = {
        "pipelines_dir": ROOT / "pipelines",
        "catalog": ROOT / "models" / "catalog.yaml",
        "engine": EngineSettings(model=ROOT / "models" / "tiny-llama"),
        "adapters": AdapterSettings(allowed_roots=[ROOT / "models"]),
    }
    return Settings(**{**base, **changes})


def failing(rows: list[CheckRow]) -> dict[tuple[str, str], str]:
    return {(row.area, row.item): row.detail for row in rows if not row.ok}


def test_the_repositorys_own_configuration_passes_every_check() -> None:
    rows = run_checks(settings(), CPU)
    assert failing(rows) == {}
    areas = {row.area for row in rows}
    assert areas == {"settings", "model", "catalog", "pipelines"}
    items = {row.item for row in rows}
    assert {"classifier@1", "summarize", "tokenizer", "engine"} <= items
    engine = next(row for row in rows if row.item == "engine")
    assert "dtype float32, max_model_len 512, max_lora_rank 8" in engine.detail


def test_a_model_not_in_the_cache_fails_its_row_saying_how_to_fetch_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    rows = run_checks(settings(engine=EngineSettings(model="acme/absent")), CPU)
    problems = failing(rows)
    assert "hf download acme/absent" in problems[("model", "acme/absent")]
    # What needs the model is not reported as passing.
    assert not any(row.ok for row in rows if row.area == "catalog" and "@" in row.item)
    assert all(not row.ok for row in rows if row.item in {"classify", "reply", "summarize"})


def test_a_rank_above_the_explicit_limit_and_a_foreign_adapter_are_named(
    tmp_path: Path,
) -> None:
    adapters = tmp_path / "adapters"
    copy_adapter(adapters, "summarizer", "wide", r=16)
    copy_adapter(adapters, "classifier", "foreign", base_model_name_or_path="org/big")
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        "base_model: tiny-llama\nadapters:\n"
        "  - {name: wide, version: '1', path: adapters/wide}\n"
        "  - {name: foreign, version: '1', path: adapters/foreign}\n"
    )
    explicit = EngineSettings(model=ROOT / "models" / "tiny-llama", max_lora_rank=8)
    rows = run_checks(
        settings(
            catalog=catalog,
            engine=explicit,
            adapters=AdapterSettings(allowed_roots=[tmp_path]),
        ),
        CPU,
    )
    problems = failing(rows)
    assert "below the rank 16 of catalog adapter 'wide'" in problems[("settings", "engine")]
    # Without the explicit limit the catalog's largest rank is taken; the foreign one fails.
    rows = run_checks(
        settings(catalog=catalog, adapters=AdapterSettings(allowed_roots=[tmp_path])), CPU
    )
    problems = failing(rows)
    assert ("catalog", "wide@1") not in problems
    assert "base_model_mismatch" in problems[("catalog", "foreign@1")]
    assert "'org/big'" in problems[("catalog", "foreign@1")]
    # The pipelines route to zoo adapters this catalog lacks.
    assert "not in the catalog" in problems[("pipelines", "summarize")]


def test_a_chat_pipeline_on_a_model_without_a_chat_template_fails_its_row(
    tmp_path: Path,
) -> None:
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "chat.yaml").write_text("task: chat\nchat:\n  system: Be brief.\n")
    (pipelines / "templated.yaml").write_text("task: templated\nchat:\n  template: chat.jinja\n")
    (pipelines / "chat.jinja").write_text(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    rows = run_checks(settings(pipelines_dir=pipelines), CPU)
    problems = failing(rows)
    assert "no chat template" in problems[("pipelines", "chat")]
    assert "sets no chat.template" in problems[("pipelines", "chat")]
    templated = next(row for row in rows if row.item == "templated")
    assert templated.ok and "as a chat" in templated.detail
