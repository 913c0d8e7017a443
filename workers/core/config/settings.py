"""Worker settings: defaults, then `LORA_WORKERS_*` environment variables (nested with `__`,
e.g. `LORA_WORKERS_ENGINE__MAX_LORAS=4`), then CLI flags."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from workers.core.admission import AdmissionPolicy
from workers.core.config.base import ConfigError, _Strict
from workers.core.config.engine import EngineSettings
from workers.core.config.sources import (
    CheckedEnvSource,
    ConfigFileSource,
    LoadedSettings,
    load_settings,
)
from workers.core.contracts import ADAPTER_NAME_PATTERN

# --- worker settings -------------------------------------------------------------------------


class AdmissionSettings(_Strict):
    """How jobs enter the engine (`workers.core.admission`) and how many the worker holds."""

    engine_depth: int | None = Field(
        default=None,
        ge=1,
        description="Requests kept in the engine at once; default: engine.max_num_seqs and an "
        "eighth more, waiting inside the engine for a freed slot.",
    )
    policy: AdmissionPolicy = AdmissionPolicy.SWITCH_AWARE
    max_adapters: int | None = Field(
        default=None,
        ge=1,
        description="Adapters fed at once (switch-aware); default: engine.max_loras.",
    )
    max_wait_ms: int = Field(
        default=10_000, ge=0, description="A job waiting this long goes first (no starvation)."
    )
    tenant_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Fair-share weight per tenant (default 1): a tenant of weight 2 is "
        "admitted twice as often as one of weight 1 when both have jobs waiting.",
    )
    latency_target_ms: int = Field(
        default=1000,
        ge=1,
        description="A request's time in the engine to aim for while a quiet tenant's jobs "
        "share it with a backlog: the engine loop then keeps fewer requests in the engine, "
        "never so few that throughput drops below min_throughput_share of full depth.",
    )
    min_throughput_share: float = Field(
        default=0.95,
        gt=0,
        le=1,
        description="The share of full depth's throughput the engine loop always keeps; 1: "
        "always full depth (latency_target_ms never applies).",
    )
    consume_batch: int = Field(default=500, ge=1, description="Messages per consume() call.")
    max_in_flight: int = Field(
        default=2000,
        ge=1,
        description="Pause fetching above this many jobs consumed and not yet committed.",
    )

    @field_validator("tenant_weights")
    @classmethod
    def _positive_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        bad = sorted(t for t, w in weights.items() if not 0 < w < float("inf"))
        if bad:
            raise ValueError(f"tenant weights must be positive and finite: {bad}")
        return weights


# LoRA target modules vLLM can serve on Llama-family models.
LLAMA_LORA_MODULES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
)


class AdapterSettings(_Strict):
    allowed_roots: list[Path] | None = Field(
        default=None,
        description="Adapter directories must resolve (symlinks followed) inside one of these "
        "(default: the catalog's folder).",
    )
    updates_topic: str = "adapters.updates"
    status_topic: str = "adapters.status"
    evaluations_topic: str = "adapters.evaluations"
    supported_target_modules: frozenset[str] = LLAMA_LORA_MODULES
    catch_up_timeout_s: float = Field(default=60.0, gt=0)
    prewarm: list[str] = Field(
        default_factory=list,
        description="Adapters run once at start-up so first jobs find them warm.",
    )


class ShadowSettings(_Strict):
    """Shadow evaluation (docs/adapters.md): a share of an adapter's jobs also runs on a shadow
    version, after the serving answer and at lower priority than any job."""

    max_engine_share: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description="At most this share of the engine's requests (admission.engine_depth) are "
        "shadow runs, and only when no job is waiting for the room.",
    )
    max_waiting: int = Field(
        default=2000,
        ge=0,
        description="Shadow runs waiting beyond this are skipped (counted in "
        "lora_workers_shadow_skipped_total): shadows never hold back the worker.",
    )
    summary_window: int = Field(
        default=500, ge=1, description="Evaluations in each rolling summary."
    )
    status_interval_s: float = Field(
        default=10.0, gt=0, description="How often summaries go to adapters.status."
    )


class DeliverySettings(_Strict):
    mode: Literal["exactly_once", "at_least_once"] = Field(
        default="exactly_once",
        description="exactly_once: results, dead letters and consumed offsets commit in one "
        "Kafka transaction. at_least_once: for brokers or sinks that cannot take transactions.",
    )
    transaction_timeout_ms: int = Field(
        default=60_000,
        ge=1000,
        description="How long the broker keeps a dead worker's open transaction before "
        "aborting it; a restarted worker with the same instance_id aborts it at once.",
    )
    shutdown_deadline_s: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM/SIGINT, wait this long for the requests in the engine, then "
        "abort them (their jobs are served again by the group).",
    )
    retry_backoff_max_s: float = Field(
        default=5.0, gt=0, description="Longest pause between retries of a failed commit."
    )


class SizeSettings(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_message_bytes: int = Field(default=1_000_000, ge=10_000)
    """Largest record the workers' producers write (librdkafka message.max.bytes); keep it at or
    below the broker's message.max.bytes (1,048,588 by default)."""
    max_job_bytes: int = Field(default=500_000, ge=1024)
    """A job whose message value is larger than this is dead-lettered as job_too_large."""
    dead_letter_prefix_bytes: int = Field(default=4096, ge=0)
    """A dead letter too large to write whole keeps this much of its payload; its headers give
    the original size and sha256."""

    @model_validator(mode="after")
    def _jobs_fit_in_answers(self) -> SizeSettings:
        # A dead letter carries the job back whole, and a result its metadata: both need room.
        if self.max_job_bytes > self.max_message_bytes // 2:
            raise ValueError("max_job_bytes must be at most half of max_message_bytes")
        return self


def _default_merge_cache() -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "lora-workers" / "merged"


class MergeSettings(_Strict):
    """The merged tier (`workers.adapters.merged`, `workers.bulk.plan`): adapters folded into
    the base weights and served without LoRA."""

    dedicated_adapter: str | None = Field(
        default=None,
        pattern=ADAPTER_NAME_PATTERN,
        description="The Kafka worker serves only this adapter, merged into the base weights. "
        "Every pipeline must route all its jobs to it (checked at start-up); a new version "
        "on the updates topic is merged and the engine switched to it.",
    )

    streaming: bool = Field(
        default=False,
        description="The Kafka worker merges an adapter that dominates the work into the "
        "engine's weights in place, serving it at the base model's speed in turns with the "
        "others on LoRA (docs/adapters.md). Off by default: merged answers can differ from the "
        "LoRA path's by rounding (checked against it before a version is first merged).",
    )
    streaming_share: float = Field(
        default=0.8, gt=0, le=1, description="The share of the work an adapter must have..."
    )
    streaming_after_s: float = Field(
        default=0.5, ge=0, description="...for this long, to be merged."
    )
    streaming_min_jobs: int = Field(
        default=64, ge=1, description="...and at least this many jobs waiting or running."
    )
    streaming_others_max_wait_ms: int = Field(
        default=2000,
        ge=0,
        description="While one adapter is merged, the others' jobs wait at most about this "
        "long before the engine switches back to serve them.",
    )

    cache_dir: Path = Field(
        default_factory=_default_merge_cache,
        description="Merged checkpoints and the measured costs the planner uses.",
    )
    cache_max_gib: float = Field(
        default=50.0, gt=0, description="Least recently used checkpoints go beyond this size."
    )
    cache_max_age_days: float = Field(
        default=30.0, gt=0, description="Checkpoints unused this long are removed."
    )
    max_num_seqs: int = Field(
        default=512,
        ge=1,
        description="Sequences per step of a bulk run's merged engines: without LoRA a larger "
        "batch pays (the LoRA path does not).",
    )
    agreement_min_jobs: int = Field(
        default=32, ge=1, description="Jobs of each merged adapter also run on the LoRA path."
    )
    agreement_fraction: float = Field(
        default=0.01, ge=0, le=1, description="...or this share of its jobs, if more."
    )
    min_identical_text: float = Field(
        default=0.9,
        ge=0,
        le=1,
        description="Below this share of identical outputs, an adapter is served on LoRA.",
    )
    min_identical_output: float = Field(
        default=0.95,
        ge=0,
        le=1,
        description="The same for parsed outputs, on tasks with an output schema.",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LORA_WORKERS_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        populate_by_name=True,
    )

    bootstrap_servers: str | None = Field(
        default=None,
        validation_alias=AliasChoices("LORA_WORKERS_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS"),
    )
    group_id: str = "lora-workers"
    worker_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="Names this worker in adapters.status messages.",
    )
    instance_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="A stable name per replica (e.g. the StatefulSet pod name): static group "
        "membership and a stable transactional.id, so a restarted worker gets its partitions "
        "back without a rebalance and aborts its predecessor's open transaction at once.",
    )
    # Relative defaults resolve against the configuration file's folder (without a file, the
    # current directory): a project folder made by `lora-workers init` works as it is.
    pipelines_dir: Path = Field(
        default=Path("pipelines"), description="The folder of pipeline YAML files, one per task."
    )
    catalog: Path = Field(
        default=Path("catalog.yaml"), description="The adapter catalog: what may be served."
    )
    unknown_task_dlq: str = "jobs.dlq"
    kafka: dict[str, str] = Field(
        default_factory=dict,
        description="librdkafka settings for every client (TLS, SASL, timeouts); in a "
        "variable's name `_` stands for `.`: LORA_WORKERS_KAFKA__SECURITY_PROTOCOL.",
    )
    kafka_secret_files: dict[str, Path] = Field(
        default_factory=dict,
        description="librdkafka settings read from files as each client is built, e.g. "
        "sasl.password: /run/secrets/kafka-password (never printed).",
    )
    commit_interval_ms: int = Field(
        default=100,
        ge=0,
        description="Commit answers at most this often: each result is visible to "
        "read_committed consumers within about this long of its job finishing.",
    )
    engine: EngineSettings = Field(default_factory=EngineSettings)
    adapters: AdapterSettings = Field(default_factory=AdapterSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)
    sizes: SizeSettings = Field(default_factory=SizeSettings)
    merge: MergeSettings = Field(default_factory=MergeSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags (init) > environment > configuration file > defaults.
        return init_settings, CheckedEnvSource(settings_cls), ConfigFileSource(settings_cls)

    @classmethod
    def load(
        cls, overrides: dict[str, Any] | None = None, config: Path | None = None
    ) -> LoadedSettings:
        """Settings from flags (`overrides`), environment, file and defaults, with where each
        value came from; any error is a `ConfigError` of one line naming its source."""
        return load_settings(cls, overrides or {}, config)

    @model_validator(mode="after")
    def _roots_default_to_the_catalogs_folder(self) -> Settings:
        if self.adapters.allowed_roots is None:
            roots = [self.catalog.resolve().parent]
            object.__setattr__(
                self, "adapters", self.adapters.model_copy(update={"allowed_roots": roots})
            )
        return self

    @property
    def allowed_roots(self) -> list[Path]:
        assert self.adapters.allowed_roots is not None  # filled in by the validator above
        return self.adapters.allowed_roots

    @property
    def transactional_id(self) -> str:
        return f"{self.group_id}.{self.instance_id or self.worker_id}"

    def require_bootstrap(self) -> str:
        if not self.bootstrap_servers:
            raise ConfigError(
                "no Kafka bootstrap servers: "
                "pass --bootstrap-servers or set KAFKA_BOOTSTRAP_SERVERS"
            )
        return self.bootstrap_servers
