"""Wire contracts: the job a producer publishes and the result a worker writes.

These pydantic models are the source of truth; `schemas/job.schema.json` and
`schemas/result.schema.json` are exported from them (`lora-workers schemas export`) and a test
keeps the files in sync, so non-Python producers and consumers can validate the same shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# Adapter names travel in jobs and in vLLM LoRA names; a path-like name must never get through.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# A Kafka topic name (its legal characters, at most 249), not starting with a dot (so never
# `.` or `..`): where a job's answer is also written (`reply_to`).
TOPIC_NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,248}$"


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _published_as(
    filename: str, amend: Callable[[dict[str, Any]], None] | None = None
) -> ConfigDict:
    """Config of a contract exported to schemas/: strict, immutable, with its schema $id;
    `amend` adds what pydantic cannot say itself (e.g. a oneOf between fields)."""

    def extra(schema: dict[str, Any]) -> None:
        schema["$id"] = f"https://lora-workers.dev/schemas/{filename}"
        if amend is not None:
            amend(schema)

    return ConfigDict(extra="forbid", frozen=True, json_schema_extra=extra)


def one_line(text: str) -> str:
    return " ".join(text.split())


def validation_details(exc: ValidationError) -> str:
    """A pydantic error as one line: `field.path: reason; ...` (the root is `(root)`)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: "
        f"{one_line(e['msg']).removeprefix('Value error, ')}"
        for e in exc.errors()
    )


# --- jobs ------------------------------------------------------------------------------------

# The sampling bounds vLLM's SamplingParams accepts (`_verify_args`), shared by job params and
# pipeline defaults, so a job that passes them never fails in the engine. NaN and infinities are
# refused everywhere: they pass every comparison check.
MAX_SEED = 2**63 - 1  # a signed 64-bit generator seed, kept non-negative
MAX_TOKENS = 4096
MAX_TOP_K = 1_000_000  # above any vocabulary (vLLM clamps to it); 0 = off
MAX_REPETITION_PENALTY = 100.0  # vLLM takes any finite value above 0; beyond this is noise
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256

MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=0, le=MAX_TOP_K)]
MinP = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=MAX_REPETITION_PENALTY, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]  # presence, frequency
MinTokens = Annotated[int, Field(ge=0, le=MAX_TOKENS)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]


class JobParams(_Contract):
    """Per-job sampling overrides; unset fields fall back to the pipeline's defaults and must stay
    within its limits. The bounds here are what the engine accepts."""

    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    seed: Seed | None = None
    top_p: TopP | None = None
    top_k: TopK | None = Field(default=None, description="0 turns top-k off.")
    min_p: MinP | None = None
    stop: StopList | None = Field(default=None, description="Strings that end generation.")
    repetition_penalty: RepetitionPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    min_tokens: MinTokens | None = None

    @model_validator(mode="after")
    def _min_within_max(self) -> JobParams:
        if (
            self.min_tokens is not None
            and self.max_tokens is not None
            and self.min_tokens > self.max_tokens
        ):
            raise ValueError(
                f"params.min_tokens {self.min_tokens} is above params.max_tokens {self.max_tokens}"
            )
        return self


# A job's text: one input, or each message's content. Far past any model's context; the
# worker's max_job_bytes is the tighter bound on a whole message.
MAX_TEXT_CHARS = 1_000_000
MAX_MESSAGES = 256


class ChatMessage(_Contract):
    """One turn of a conversation, as OpenAI's and vLLM's chat APIs take it (text only)."""

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_TEXT_CHARS)


def _input_or_messages(schema: dict[str, Any]) -> None:
    """In the JSON Schema: `input` and `messages` are never null, and exactly one is given."""
    for name in ("input", "messages"):
        prop = schema["properties"][name]
        (given,) = [v for v in prop.pop("anyOf") if v != {"type": "null"}]
        prop.pop("default", None)
        prop.update(given)
    schema["oneOf"] = [{"required": ["input"]}, {"required": ["messages"]}]


class Job(_Contract):
    """One LLM job, published as JSON to the task's input topic (key: job_id). It carries
    exactly one of `input` (text) or `messages` (a conversation)."""

    model_config = _published_as("job.schema.json", _input_or_messages)

    job_id: str = Field(min_length=1, max_length=256)
    task: str = Field(min_length=1, max_length=128)
    input: str | None = Field(
        default=None, max_length=MAX_TEXT_CHARS, description="The text; or give `messages`."
    )
    messages: list[ChatMessage] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_MESSAGES,
        description="The conversation, on a pipeline with `chat:`; or give `input`.",
    )
    tenant: str | None = Field(default=None, min_length=1, max_length=128)
    adapter: str | None = Field(
        default=None,
        pattern=ADAPTER_NAME_PATTERN,
        description="A registered adapter name (never a path); overrides tenant and task routing.",
    )
    params: JobParams | None = None
    metadata: dict[str, Any] | None = Field(
        default=None, description="Opaque to the worker; copied to the result."
    )
    reply_to: str | None = Field(
        default=None,
        pattern=TOPIC_NAME_PATTERN,
        description="A topic that also gets the job's answer (its result, or its dead letter), "
        "in the same transaction as the result topic; it must exist and the worker must be "
        "allowed to write to it (docs/client.md).",
    )

    @model_validator(mode="before")
    @classmethod
    def _one_of_input_or_messages(cls, data: Any) -> Any:
        # Presence, not value: the schema's oneOf counts keys, and a null is refused below.
        if isinstance(data, dict):
            given = [key for key in ("input", "messages") if key in data]
            if len(given) != 1:
                raise ValueError(
                    f"input/messages: a job gives exactly one of them, got {given or 'neither'}"
                )
        return data

    @field_validator("input", "messages")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("must not be null")
        return value

    @field_validator("messages")
    @classmethod
    def _has_a_user_turn(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" for m in messages):
            raise ValueError("needs at least one user message")
        return messages

    @property
    def text(self) -> str:
        """What classifier and embedding routes read: the input, or the last user message."""
        if self.input is not None:
            return self.input
        assert self.messages is not None  # one of the two, by validation
        return next(m.content for m in reversed(self.messages) if m.role == "user")


class AdapterRef(_Contract):
    """The exact adapter version that produced a result: its name, version and files."""

    name: str
    version: str
    sha256: str | None = Field(default=None, description="The version's files (see adapters).")


class ResultStatus(StrEnum):
    OK = "ok"
    INVALID_OUTPUT = "invalid_output"
    ERROR = "error"


# What metrics, reports and summaries call the base model; adapters are labelled name@version,
# so no adapter name can collide with it.
BASE_MODEL_LABEL = "base"


def adapter_label(name: str | None, version: str | None) -> str:
    return BASE_MODEL_LABEL if name is None else f"{name}@{version}"


class ServedBy(StrEnum):
    """How an engine ran a job: through vLLM's LoRA path, on weights with the adapter merged
    in, or on the base model alone."""

    LORA = "lora"
    MERGED = "merged"
    BASE = "base"


class Usage(_Contract):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)


class RouteKind(StrEnum):
    """What picked a job's adapter (docs/routing.md), in order of precedence."""

    JOB = "job"  # the job's own `adapter`
    TENANT = "tenant"  # the pipeline's tenant map
    CLASSIFIER = "classifier"  # a classifier adapter's label for the input
    EMBEDDING = "embedding"  # the input's nearest adapter by example embeddings
    TASK = "task"  # the pipeline's adapter, or the base model


class RouteInfo(_Contract):
    """How a job was routed: by what, to which adapter (null: the base model) and why."""

    by: RouteKind
    adapter: str | None
    label: str | None = Field(default=None, description="The classifier's label.")
    similarity: float | None = Field(
        default=None, description="Cosine similarity to the nearest adapter's examples."
    )
    fallback: bool = Field(
        default=False, description="The classifier or embedding gave no usable route."
    )
    usage: Usage | None = Field(default=None, description="The classifier pass's tokens.")


class ErrorInfo(_Contract):
    code: str
    message: str


class Timings(_Contract):
    """Milliseconds since the Unix epoch, and durations in milliseconds."""

    enqueued_at_ms: int = Field(description="Kafka timestamp of the job message.")
    received_at_ms: int = Field(
        description="When the worker consumed and routed the job (after embedding its input, "
        "for embedding routes)."
    )
    completed_at_ms: int = Field(description="When the result was built.")
    queue_ms: float = Field(ge=0, description="Consumed until handed to the engine.")
    generate_ms: float = Field(ge=0, description="Wall time of the engine call holding the job.")


class Result(_Contract):
    """One result per job, written to the task's result topic (key: job_id)."""

    model_config = _published_as("result.schema.json")

    job_id: str
    task: str
    status: ResultStatus
    output: Any = Field(
        description="The parsed JSON value where the task has an output schema, else the text."
    )
    raw_output: str = Field(description="The generated text, exactly as the engine returned it.")
    adapter: AdapterRef | None = Field(description="null when the base model served the job.")
    served_by: ServedBy | None = Field(
        default=None,
        description="lora: vLLM's LoRA path; merged: weights with the adapter merged in; base: "
        "the base model. null when no engine ran the job (an error).",
    )
    usage: Usage
    route: RouteInfo | None = Field(default=None, description="How the adapter was chosen.")
    error: ErrorInfo | None = None
    metadata: dict[str, Any] | None = None
    timings: Timings


# --- adapter lifecycle -----------------------------------------------------------------------

SHA256_PATTERN = r"^[0-9a-f]{64}$"
VERSION_PATTERN = r"^[A-Za-z0-9._-]{1,32}$"


class AdapterVersionSpec(_Contract):
    """One version of an adapter and its share of the adapter's traffic."""

    version: str = Field(pattern=VERSION_PATTERN)
    path: str = Field(min_length=1, description="Directory under one of the allowed roots.")
    sha256: str = Field(
        pattern=SHA256_PATTERN, description="workers.adapters.checks.adapter_digest."
    )
    weight: float = Field(default=1.0, gt=0.0, le=1.0)


class ShadowSpec(_Contract):
    """A version that serves no one: a share of the adapter's jobs also runs on it, and the
    two answers are compared on `adapters.evaluations` (docs/adapters.md, shadow evaluation)."""

    version: str = Field(pattern=VERSION_PATTERN)
    path: str = Field(min_length=1)
    sha256: str = Field(pattern=SHA256_PATTERN)
    share: float = Field(gt=0.0, le=1.0, description="Share of the adapter's jobs shadowed.")


class AdapterUpdate(_Contract):
    """The whole desired state of one adapter, keyed by its name on the compacted topic
    `adapters.updates`. Whole state, not a delta, so compaction keeps what a worker needs;
    a tombstone (null value) retires the adapter."""

    model_config = _published_as("adapter-update.schema.json")

    name: str = Field(pattern=ADAPTER_NAME_PATTERN)
    base_model: str = Field(min_length=1, description="The base model the adapter was trained on.")
    versions: list[AdapterVersionSpec] = Field(min_length=1, max_length=8)
    tenants: list[str] | None = Field(
        default=None, description="Tenants that may use the adapter; absent means all."
    )
    hot: bool = Field(default=False, description="Pin in the engine's adapter slots.")
    shadow: ShadowSpec | None = Field(
        default=None, description="A version evaluated on a share of live jobs, never served."
    )
    published_at_ms: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _weights_cover_all_traffic(self) -> AdapterUpdate:
        total = sum(v.weight for v in self.versions)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"version weights must add up to 1, got {total:g}")
        versions = [v.version for v in self.versions]
        if self.shadow is not None:
            versions.append(self.shadow.version)
        if len(set(versions)) != len(versions):
            raise ValueError("a version appears twice")
        return self


class AdapterState(StrEnum):
    SERVING = "serving"
    SHADOW = "shadow"
    REJECTED = "rejected"
    RETIRED = "retired"


class EvaluationSummary(_Contract):
    """A worker's rolling comparison of a shadow version with the serving one, over its last
    `jobs` evaluations: shares in [0, 1], means per job."""

    jobs: int = Field(ge=0)
    identical_text: float
    identical_output: float
    serving_valid: float
    shadow_valid: float
    serving_tokens: float
    shadow_tokens: float
    serving_latency_ms: float
    shadow_latency_ms: float


class ShadowEvaluation(_Contract):
    """One job answered by the serving version and also run on a shadow version, on the topic
    `adapters.evaluations` (key: job_id). The shadow's answer is never published as a result."""

    model_config = _published_as("adapter-evaluation.schema.json")

    job_id: str
    task: str
    adapter: str
    serving: AdapterRef
    shadow: AdapterRef
    identical_text: bool
    identical_output: bool = Field(description="The parsed outputs are equal (JSON tasks).")
    serving_valid: bool = Field(description="The serving answer passed the task's checks.")
    shadow_valid: bool
    serving_tokens: int = Field(ge=0, description="Completion tokens.")
    shadow_tokens: int = Field(ge=0)
    serving_latency_ms: float = Field(ge=0, description="In the engine, all attempts.")
    shadow_latency_ms: float = Field(ge=0)
    serving_output: str = Field(description="The serving version's generated text.")
    shadow_output: str
    worker: str
    at_ms: int


class AdapterStatus(_Contract):
    """What a worker did with an update, on the compacted topic `adapters.status` (key:
    `name@version`, or the name alone when no version is known)."""

    name: str
    version: str | None
    state: AdapterState
    worker: str
    code: str | None = None
    message: str | None = None
    weight: float | None = None
    sha256: str | None = Field(default=None, description="The version's files, when known.")
    evaluation: EvaluationSummary | None = Field(
        default=None, description="With `shadow`: how its answers compare with the serving ones."
    )
    update: AdapterUpdate | None = Field(
        default=None,
        description="With `serving`: the whole state that serves, so a worker started after a "
        "rejected update was compacted over it can still serve the last good state.",
    )
    at_ms: int

    @property
    def key(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def contract_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema documents exported to `schemas/`, by file name."""
    documents: dict[str, dict[str, Any]] = {}
    for filename, model in (
        ("job.schema.json", Job),
        ("result.schema.json", Result),
        ("adapter-update.schema.json", AdapterUpdate),
        ("adapter-status.schema.json", AdapterStatus),
        ("adapter-evaluation.schema.json", ShadowEvaluation),
    ):
        schema = model.model_json_schema(mode="serialization")
        documents[filename] = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    return documents
