"""Pipelines: one YAML file per task (`pipelines/`); paths in it are relative to the file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from workers.core.config.base import ConfigError, _Strict
from workers.core.contracts import (
    ADAPTER_NAME_PATTERN,
    MAX_REPETITION_PENALTY,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKENS,
    MAX_TOP_K,
    ChatMessage,
    Job,
    JobParams,
    MaxTokens,
    MinP,
    MinTokens,
    Penalty,
    RepetitionPenalty,
    Seed,
    StopList,
    Temperature,
    TopK,
    TopP,
    one_line,
    validation_details,
)

# --- pipelines -------------------------------------------------------------------------------


class SamplingValues(_Strict):
    """The sampling parameters one job runs with."""

    max_tokens: MaxTokens = 64
    temperature: Temperature = 0.0
    seed: Seed | None = None
    top_p: TopP = 1.0
    top_k: TopK = 0  # off
    min_p: MinP = 0.0
    stop: StopList = Field(default_factory=list)
    repetition_penalty: RepetitionPenalty = 1.0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    min_tokens: MinTokens = 0

    @model_validator(mode="after")
    def _min_within_max(self) -> SamplingValues:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens {self.min_tokens} is above max_tokens {self.max_tokens}")
        return self


Finite = Annotated[float, Field(allow_inf_nan=False)]


class StopLimit(_Strict):
    count: int = Field(default=MAX_STOP_STRINGS, ge=0, le=MAX_STOP_STRINGS)
    length: int = Field(default=MAX_STOP_CHARS, ge=1, le=MAX_STOP_CHARS)


class SamplingLimits(_Strict):
    """What a job's params may ask for: inclusive [lowest, highest] ranges (unset: the engine's
    own bounds, which the job contract checks)."""

    max_tokens: tuple[int, int] = (1, MAX_TOKENS)
    temperature: tuple[Finite, Finite] = (0.0, 2.0)
    top_p: tuple[Finite, Finite] = (0.0, 1.0)
    top_k: tuple[int, int] = (0, MAX_TOP_K)
    min_p: tuple[Finite, Finite] = (0.0, 1.0)
    repetition_penalty: tuple[Finite, Finite] = (0.0, MAX_REPETITION_PENALTY)
    presence_penalty: tuple[Finite, Finite] = (-2.0, 2.0)
    frequency_penalty: tuple[Finite, Finite] = (-2.0, 2.0)
    min_tokens: tuple[int, int] = (0, MAX_TOKENS)
    stop: StopLimit = Field(default_factory=StopLimit)

    @field_validator(
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "min_tokens",
    )
    @classmethod
    def _lowest_first(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if bounds[0] > bounds[1]:
            raise ValueError(f"[{bounds[0]}, {bounds[1]}] is not [lowest, highest]")
        return bounds

    def violation(self, field: str, value: Any) -> str | None:
        """Why `value` of the sampling parameter `field` is outside these limits, or None."""
        if field == "stop":
            strings: Sequence[str] = value
            if len(strings) > self.stop.count:
                return (
                    f"{len(strings)} strings are more than the pipeline's limit {self.stop.count}"
                )
            for index, text in enumerate(strings):
                if len(text) > self.stop.length:
                    return (
                        f"string {index} has {len(text)} characters, more than the pipeline's "
                        f"limit {self.stop.length}"
                    )
            return None
        bounds = getattr(self, field, None)
        if bounds is None:  # no limit (seed)
            return None
        low, high = bounds
        if value < low:
            return f"{value} is below the pipeline's limit {low}"
        if value > high:
            return f"{value} is above the pipeline's limit {high}"
        return None


class SamplingOutOfBounds(ValueError):
    """A job's params leave the pipeline's limits; the message names the field and the bound."""


class SamplingDefaults(SamplingValues):
    """A pipeline's `sampling:`: the defaults of every parameter, and `limits` on what a job
    may ask for instead."""

    limits: SamplingLimits = Field(default_factory=SamplingLimits)

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> SamplingDefaults:
        for field in SamplingValues.model_fields:
            reason = self.limits.violation(field, getattr(self, field))
            if reason is not None:
                raise ValueError(f"{field}: the default {reason}")
        return self

    def for_job(self, params: JobParams | None) -> SamplingValues:
        """The values a job runs with: its params over these defaults; `SamplingOutOfBounds`
        when a param leaves the limits or min_tokens ends above max_tokens."""
        asked = {} if params is None else params.model_dump(exclude_none=True)
        for field, value in asked.items():
            reason = self.limits.violation(field, value)
            if reason is not None:
                raise SamplingOutOfBounds(f"params.{field}: {reason}")
        values = self.model_dump(exclude={"limits"}) | asked
        if values["min_tokens"] > values["max_tokens"]:
            raise SamplingOutOfBounds(
                f"params.min_tokens: {values['min_tokens']} is above max_tokens "
                f"{values['max_tokens']}"
            )
        return SamplingValues.model_validate(values)


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


class ChatRendering(_Strict):
    """A pipeline's `chat:`: jobs rendered as a conversation by the model's chat template."""

    system: str | None = Field(
        default=None,
        min_length=1,
        description="Put first, unless the job's messages start with a system message.",
    )
    template: str | None = Field(
        default=None,
        min_length=1,
        description="A Jinja chat template replacing the tokenizer's (in the pipeline file: its "
        "path, relative to the file).",
    )


class PipelineConfig(_Strict):
    task: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    input_topic: str | None = None
    result_topic: str | None = None
    prompt_template: str | None = Field(
        default=None, description="A text prompt with {input}; with `chat:`, the user message."
    )
    chat: ChatRendering | None = None
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

    @model_validator(mode="after")
    def _renders_prompts(self) -> PipelineConfig:
        if self.prompt_template is None and self.chat is None:
            raise ValueError("a pipeline needs prompt_template, chat, or both")
        classifier = self.routing.classifier
        if classifier is not None and (classifier.prompt_template or self.prompt_template) is None:
            # The classifier pass is a text prompt: a chat-only pipeline must give it one.
            raise ValueError("routing.classifier.prompt_template is required without a pipeline's")
        return self

    @field_validator("prompt_template")
    @classmethod
    def _template_has_input(cls, template: str | None) -> str | None:
        if template is not None and "{input}" not in template:
            raise ValueError("prompt_template must contain {input}")
        return template

    @property
    def dlq_topic(self) -> str:
        return f"{self.input_topic}.dlq"

    def render_prompt(self, text: str) -> str:
        """The text template filled with `text`; only for pipelines with a prompt_template."""
        if self.prompt_template is None:
            raise ValueError(f"pipeline {self.task!r} has no prompt_template")
        # Plain substitution: braces in the input or in a JSON example inside the template
        # must stay literal, which str.format would not allow.
        return self.prompt_template.replace("{input}", text)

    def conversation(self, job: Job) -> list[dict[str, str]]:
        """The messages a chat pipeline renders for `job`: its messages, or its input as one
        user message (through prompt_template, if any), after the pipeline's system message
        unless the job brings its own."""
        if self.chat is None:
            raise ValueError(f"pipeline {self.task!r} has no chat rendering")
        if job.messages is not None:
            turns = list(job.messages)
        else:
            assert job.input is not None  # one of the two, by validation
            text = job.input if self.prompt_template is None else self.render_prompt(job.input)
            turns = [ChatMessage(role="user", content=text)]
        if self.chat.system is not None and turns[0].role != "system":
            turns.insert(0, ChatMessage(role="system", content=self.chat.system))
        return [turn.model_dump() for turn in turns]


def load_pipeline(path: Path) -> PipelineConfig:
    """One pipeline file; `output_schema` and `chat.template` are paths relative to it."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {one_line(str(exc))}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    schema_ref = raw.pop("output_schema", None)
    if schema_ref is not None:
        schema_path = _beside(path, schema_ref, "output_schema")
        try:
            raw["output_schema"] = json.loads(schema_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"{path}: output_schema: {schema_path}: {one_line(str(exc))}"
            ) from exc
    chat = raw.get("chat")
    if isinstance(chat, dict) and chat.get("template") is not None:
        template_path = _beside(path, chat["template"], "chat.template")
        try:
            raw["chat"] = {**chat, "template": template_path.read_text()}
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: chat.template: {template_path}: {exc}") from exc
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {validation_details(exc)}") from exc


def _beside(pipeline_file: Path, ref: object, field: str) -> Path:
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{pipeline_file}: {field}: expected a file path, got {ref!r}")
    return pipeline_file.parent / ref


def load_pipelines(pipelines_dir: Path) -> dict[str, PipelineConfig]:
    """All `*.yaml` pipelines in a directory, keyed by task."""
    files = sorted(pipelines_dir.glob("*.yaml"))
    if not files:
        raise ConfigError(f"{pipelines_dir}: no pipeline files (*.yaml)")
    pipelines: dict[str, PipelineConfig] = {}
    for path in files:
        pipeline = load_pipeline(path)
        if pipeline.task in pipelines:
            raise ConfigError(f"{path}: task {pipeline.task!r} is defined twice")
        pipelines[pipeline.task] = pipeline
    topics = [p.input_topic for p in pipelines.values()]
    if len(set(topics)) != len(topics):
        raise ConfigError(f"{pipelines_dir}: two pipelines read the same input topic")
    return pipelines
