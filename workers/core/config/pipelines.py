"""Pipelines: one YAML file per task (`pipelines/`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from workers.core.config.base import ConfigError, _Strict
from workers.core.contracts import ADAPTER_NAME_PATTERN, MAX_SEED

# --- pipelines -------------------------------------------------------------------------------


class SamplingDefaults(_Strict):
    max_tokens: int = Field(default=64, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)


# In classifier and embedding routes, this target means the base model (an adapter's name
# means that adapter).
BASE_TARGET = "base"


class ClassifierRouting(_Strict):
    """Route by a classifier adapter's label: a first pass on `adapter`, constrained to the
    labels, then the job runs on the adapter its label maps to."""

    adapter: str = Field(pattern=ADAPTER_NAME_PATTERN, description="The classifier adapter.")
    labels: dict[str, str] = Field(
        min_length=1, description="Label -> adapter name, or `base` for the base model."
    )
    fallback: str = Field(
        default=BASE_TARGET, description="Where a job goes when no label can be read."
    )
    prompt_template: str | None = Field(
        default=None,
        description="The classifier's prompt, with {input}; default: the pipeline's.",
    )
    label_field: str | None = Field(
        default="label",
        description='The classifier answers {"<label_field>": LABEL}; null: a bare JSON string.',
    )
    max_tokens: int = Field(default=16, ge=1, le=256)

    @field_validator("prompt_template")
    @classmethod
    def _template_has_input(cls, template: str | None) -> str | None:
        if template is not None and "{input}" not in template:
            raise ValueError("classifier prompt_template must contain {input}")
        return template

    def output_schema(self) -> dict[str, Any]:
        """The JSON Schema the classifier pass is constrained to: one of the labels."""
        label = {"enum": sorted(self.labels)}
        if self.label_field is None:
            return label
        return {
            "type": "object",
            "properties": {self.label_field: label},
            "required": [self.label_field],
            "additionalProperties": False,
        }


class EmbeddingRouting(_Strict):
    """Route by embedding similarity: the adapter whose examples' centroid is nearest to the
    input, if at least `threshold` (cosine), else `fallback`."""

    examples: dict[str, list[str]] = Field(
        min_length=1, description="Adapter name (or `base`) -> example inputs."
    )
    threshold: float = Field(default=0.5, ge=-1.0, le=1.0)
    fallback: str = Field(default=BASE_TARGET)

    @field_validator("examples")
    @classmethod
    def _examples_given(cls, examples: dict[str, list[str]]) -> dict[str, list[str]]:
        empty = sorted(name for name, texts in examples.items() if not texts)
        if empty:
            raise ValueError(f"adapters without example texts: {empty}")
        return examples


class RoutingConfig(_Strict):
    """Rules first (the job's adapter, then the tenant's), then one of: a classifier, an
    embedding router, or the task's adapter (none: the base model)."""

    adapter: str | None = Field(default=None, pattern=ADAPTER_NAME_PATTERN)
    tenants: dict[str, str] = Field(default_factory=dict)
    classifier: ClassifierRouting | None = None
    embedding: EmbeddingRouting | None = None

    @model_validator(mode="after")
    def _one_default_route(self) -> RoutingConfig:
        given = [k for k in ("adapter", "classifier", "embedding") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"routing takes one of adapter, classifier, embedding; got {given}")
        return self

    def targets(self) -> set[str | None]:
        """Every adapter name this routing can send a job to (None: the base model)."""
        names: set[str | None] = {self.adapter, *self.tenants.values()}
        if self.classifier is not None:
            names |= {self.classifier.adapter, self.classifier.fallback}
            names |= set(self.classifier.labels.values())
        if self.embedding is not None:
            names |= {self.embedding.fallback, *self.embedding.examples}
        return {None if name in (None, BASE_TARGET) else name for name in names}


class ParquetSinkConfig(_Strict):
    path: Path = Field(description="Root of the Hive-partitioned dataset.")
    rows_per_file: int = Field(default=1000, ge=1)
    row_group_size: int = Field(default=10_000, ge=1)
    max_file_age_ms: int = Field(
        default=10_000, ge=0, description="Write a partition's waiting rows at least this often."
    )


class PipelineConfig(_Strict):
    task: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    input_topic: str | None = None
    result_topic: str | None = None
    prompt_template: str
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    output_schema: dict[str, Any] | None = Field(
        default=None, description="The task's JSON Schema (2020-12), loaded from `output_schema`."
    )
    structured_output: bool = Field(
        default=True, description="Constrain generation to output_schema (vLLM structured outputs)."
    )
    invalid_output_retries: int = Field(
        default=1, ge=0, le=5, description="Retries of an invalid or truncated output."
    )
    retry_token_factor: float = Field(
        default=2.0, gt=1.0, le=16.0, description="Each retry multiplies max_tokens by this."
    )
    sinks: list[Literal["kafka", "parquet"]] = Field(
        default_factory=lambda: ["kafka"], min_length=1
    )
    parquet: ParquetSinkConfig | None = None

    @model_validator(mode="after")
    def _default_topics(self) -> PipelineConfig:
        object.__setattr__(self, "input_topic", self.input_topic or f"jobs.{self.task}")
        object.__setattr__(self, "result_topic", self.result_topic or f"results.{self.task}")
        return self

    @model_validator(mode="after")
    def _parquet_sink_configured(self) -> PipelineConfig:
        if "parquet" in self.sinks and self.parquet is None:
            raise ValueError("sinks names parquet but the pipeline has no `parquet:` section")
        return self

    @field_validator("prompt_template")
    @classmethod
    def _template_has_input(cls, template: str) -> str:
        if "{input}" not in template:
            raise ValueError("prompt_template must contain {input}")
        return template

    @property
    def dlq_topic(self) -> str:
        return f"{self.input_topic}.dlq"

    def render_prompt(self, text: str) -> str:
        # Plain substitution: braces in the input or in a JSON example inside the template
        # must stay literal, which str.format would not allow.
        return self.prompt_template.replace("{input}", text)


def load_pipeline(path: Path, schemas_dir: Path) -> PipelineConfig:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    schema_ref = raw.pop("output_schema", None)
    if schema_ref is not None:
        schema_path = schemas_dir / schema_ref
        try:
            raw["output_schema"] = json.loads(schema_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: output_schema {schema_path}: {exc}") from exc
    try:
        return PipelineConfig.model_validate(raw)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def load_pipelines(pipelines_dir: Path, schemas_dir: Path) -> dict[str, PipelineConfig]:
    """All `*.yaml` pipelines in a directory, keyed by task."""
    files = sorted(pipelines_dir.glob("*.yaml"))
    if not files:
        raise ConfigError(f"{pipelines_dir}: no pipeline files (*.yaml)")
    pipelines: dict[str, PipelineConfig] = {}
    for path in files:
        pipeline = load_pipeline(path, schemas_dir)
        if pipeline.task in pipelines:
            raise ConfigError(f"{path}: task {pipeline.task!r} is defined twice")
        pipelines[pipeline.task] = pipeline
    topics = [p.input_topic for p in pipelines.values()]
    if len(set(topics)) != len(topics):
        raise ConfigError(f"{pipelines_dir}: two pipelines read the same input topic")
    return pipelines
