"""Engine settings: the base model and how vLLM runs it."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from workers.core.config.base import REPO_ROOT, _Strict


class EngineSettings(_Strict):
    model: Path = REPO_ROOT / "models" / "tiny-llama"
    dtype: str = "float32"
    max_model_len: int = Field(default=512, ge=16)
    max_num_seqs: int = Field(default=256, ge=1)
    max_loras: int = Field(default=5, ge=1)
    max_lora_rank: int = Field(default=8, ge=1)
    max_cpu_loras: int | None = Field(default=None, ge=1)
    # On the CPU backend vLLM reserves this much host memory for the KV cache.
    kv_cache_gib: float = Field(default=1.0, gt=0)
    enforce_eager: bool = True
    seed: int = 0
    # Serve base-model jobs through a zero LoRA so they never share a batch as "no LoRA" rows,
    # which vLLM's CPU LoRA ops mis-serve (see engine.write_identity_adapter). It takes a slot.
    base_via_identity_adapter: bool = True
    vllm_log_level: str = "WARNING"
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
    step_stall_warning_s: float = Field(
        default=2.0,
        gt=0,
        description="Log engine_step_stalled when one engine step takes this long.",
    )
