"""Engine settings: the base model and how vLLM runs it."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator

from workers.core.config.base import _Strict

# LoRA ranks vLLM 0.32 accepts as max_lora_rank (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class EngineSettings(_Strict):
    """How vLLM runs the base model. Unset (None) values follow the model, the catalog or the
    platform: `workers.engine.model.engine_values` turns these into what the engine starts
    with."""

    model: str = Field(
        default="models/tiny-llama",  # the demo zoo of a project folder (`lora-workers init`)
        description="A model directory (relative: to the configuration file's folder), or a "
        "Hugging Face hub id already in the local cache (read offline: never downloaded at "
        "run time).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="auto: the model's own dtype (its config's), float32 where the platform "
        "cannot run that one.",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        description="Context length; default: the model's, capped by max_model_len_cap. An "
        "explicit value may not exceed the model's.",
    )
    max_model_len_cap: int = Field(
        default=8192,
        ge=16,
        description="The default max_model_len is at most this: a long context costs KV cache "
        "memory per sequence.",
    )
    max_num_seqs: int = Field(default=256, ge=1)
    max_loras: int = Field(default=5, ge=1)
    max_lora_rank: int | None = Field(
        default=None,
        description=f"Default: the catalog's largest adapter rank (rounded up to one vLLM "
        f"takes: {', '.join(map(str, VLLM_LORA_RANKS))}). Below a catalog adapter's rank: an "
        f"error naming it. Adapters published later above it are rejected (rank_too_large).",
    )
    max_cpu_loras: int | None = Field(default=None, ge=1)
    # On the CPU backend vLLM reserves this much host memory for the KV cache.
    kv_cache_gib: float = Field(default=1.0, gt=0)
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="GPU only: share of GPU memory vLLM may take (default: vLLM's, 0.9).",
    )
    enforce_eager: bool | None = Field(
        default=None,
        description="Default: True on the CPU backend, vLLM's default (CUDA graphs) on GPUs.",
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per engine.")
    max_num_batched_tokens: int | None = Field(
        default=None, ge=1, description="Tokens per engine step (default: vLLM's)."
    )
    seed: int = 0
    # Serve base-model jobs through a zero LoRA so they never share a batch as "no LoRA" rows,
    # which vLLM's CPU LoRA ops mis-serve (see engine.write_identity_adapter). It takes a slot.
    base_via_identity_adapter: bool | None = Field(
        default=None, description="Default: on for the CPU backend (which needs it), else off."
    )
    vllm_log_level: str = "WARNING"
    standby: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="A second engine kept started and idle by the Kafka worker, taken in place "
        "of a restart after an engine death (under a second instead of 13-15 s on the CPU "
        "backend here). It costs a second engine's memory, and its start a core for about "
        "13 s after start-up and after each death. auto: on for the CPU backend when the free "
        "memory holds 1.5x the running engine's processes; off on GPUs, where two engines "
        "rarely fit.",
    )
    crash_attempts: int = Field(
        default=2,
        ge=1,
        description="Engine deaths a single job may cause running alone before it is "
        "dead-lettered as engine_crash (the requests that died together become suspects, run "
        "apart in small cohorts until the job that kills the engine stands alone).",
    )
    max_restarts_per_minute: int = Field(
        default=6,
        ge=1,
        description="Engine restarts allowed in any minute. An engine death beyond them "
        "dead-letters every job still suspected of it (engine_crash) instead of running it "
        "again, and the engine restarts once the minute allows: never a tight restart loop.",
    )
    fault_injection_crash_marker: str | None = Field(
        default=None,
        min_length=1,
        description="FAULT INJECTION, for tests only: a request whose prompt contains this "
        "text kills vLLM's engine-core process as it enters the engine, as a job that crashes "
        "the engine would. Off (None) by default.",
    )
    fault_injection_merge_scale: float = Field(
        default=1.0,
        gt=0,
        description="FAULT INJECTION, for tests only: an in-place merge adds this many times "
        "each adapter's delta, as a wrong merge would (the agreement gate must refuse it). "
        "1 (a true merge) by default.",
    )
    step_stall_warning_s: float = Field(
        default=2.0,
        gt=0,
        description="Log engine_step_stalled when one engine step takes this long.",
    )

    @field_validator("model", mode="before")
    @classmethod
    def _path_as_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_vllm_takes(cls, value: int | None) -> int | None:
        if value is not None and value not in VLLM_LORA_RANKS:
            raise ValueError(f"vLLM takes a max_lora_rank of {list(VLLM_LORA_RANKS)}")
        return value
