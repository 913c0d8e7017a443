"""The engine's narrow interface and the values that cross it. Pure types, no vLLM.

The rest of the worker sees only `Engine`: tokenize a prompt or render a chat, register an
adapter, add `GenerationRequest`s and step the engine until each finishes (or run a whole batch
at once). `workers.engine.vllm_engine.VllmEngine` implements it with one offline vLLM `LLM`
holding many LoRA adapters on one base model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from workers.core.contracts import ServedBy


@dataclass(frozen=True)
class AdapterHandle:
    """One adapter version as the engine knows it.

    vLLM keys its LoRA caches by id and its prefix cache by name, so a new version must get a
    fresh id and name, never reuse them (docs/adapters.md). The files' sha256 is part of the
    name: the same version number with other files is another adapter to the engine.
    """

    name: str
    version: str
    path: str
    lora_id: int
    sha256: str | None = None  # checked again whenever the files are (re)loaded

    @property
    def engine_name(self) -> str:
        suffix = f"#{self.sha256[:12]}" if self.sha256 else ""
        return f"{self.name}@{self.version}{suffix}"


@dataclass(frozen=True)
class MergedModel:
    """A checkpoint with one adapter version merged into the base weights
    (`workers.adapters.merged`). An engine started on it serves that adapter, and only it."""

    adapter: AdapterHandle
    path: Path
    base_sha256: str
    merge_s: float  # how long merging took; 0 when it came from the cache

    def serves(self, adapter: AdapterHandle | None) -> bool:
        return (
            adapter is not None
            and adapter.name == self.adapter.name
            and adapter.sha256 == self.adapter.sha256
        )


@dataclass(frozen=True)
class GenerationRequest:
    prompt_token_ids: list[int]
    adapter: AdapterHandle | None
    max_tokens: int
    temperature: float
    seed: int | None
    json_schema: dict[str, Any] | None = None  # constrain the output to this JSON Schema
    # The rest of vLLM's SamplingParams a job may set (bounds: workers.core.contracts).
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0


@dataclass(frozen=True)
class Generation:
    text: str
    completion_tokens: int
    finish_reason: str | None
    served_by: ServedBy = ServedBy.LORA


class AdapterLoadError(Exception):
    """The engine refused an adapter; the message names it. The engine keeps serving."""


class ChatTemplateMissing(Exception):
    """`render_chat` without a template: the model's tokenizer has none and none was given."""


class ChatRenderError(Exception):
    """The chat template refused these messages (e.g. its `raise_exception` on roles that do not
    alternate); the message says why. The job is at fault, not the engine."""


class EngineNotEmpty(RuntimeError):
    """A tier switch (`merge`, `unmerge`) asked of an engine that still holds requests: they
    would be mis-served. Nothing changed; try again once it is empty."""


class EngineDied(Exception):
    """The engine process died during a call; `restart()` brings it back."""


class Engine(Protocol):
    max_model_len: int

    def tokenize(self, prompt: str) -> list[int]: ...

    def render_chat(
        self, messages: Sequence[Mapping[str, str]], chat_template: str | None
    ) -> list[int]:
        """The prompt token ids of a conversation with the generation prompt, as `LLM.chat`
        renders it; `chat_template` None: the tokenizer's own. Raises `ChatTemplateMissing`
        or `ChatRenderError`."""
        ...

    def register_adapter(self, adapter: AdapterHandle) -> None: ...

    def unregister_adapter(self, adapter: AdapterHandle) -> None: ...

    def pin_adapter(self, adapter: AdapterHandle) -> None: ...

    def resident_adapters(self) -> set[int]: ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]: ...

    # Continuous feeding: requests enter as they are admitted and leave as each finishes.
    # One thread owns these calls (vLLM's client is not thread-safe): `workers.engine.loop`.
    def add_request(self, request_id: str, request: GenerationRequest, priority: int = 0) -> None:
        """`priority`: lower is scheduled first among requests waiting in the engine (vLLM's
        priority scheduling); the loop gives a tenant's request the count of that tenant's
        requests already in the engine, so a quiet tenant's job is not queued behind a flood."""
        ...

    def step(self) -> list[tuple[str, Generation]]:
        """One engine step; the requests that finished in it. Call only while requests are
        unfinished: with none, vLLM's step blocks."""
        ...

    def abort_requests(self, request_ids: Sequence[str]) -> None: ...

    def has_unfinished_requests(self) -> bool: ...

    def restart(self) -> None: ...

    # The merged tier: an engine on a checkpoint with one adapter merged in serves only it.
    def serves_now(self, adapter: AdapterHandle | None) -> bool: ...

    def switch_merged(self, merged: MergedModel) -> None: ...

    # The merged tier in place, on a LoRA engine: one adapter folded into the running engine's
    # base weights and back, without an engine start (milliseconds on the zoo model).
    @property
    def merged_adapter(self) -> AdapterHandle | None:
        """The adapter merged in place now; None: LoRA mode."""
        ...

    def merge(self, adapter: AdapterHandle) -> float:
        """Merge `adapter` into the base weights (as PEFT merges, in the engine's dtype) and
        serve its requests without LoRA (`ServedBy.MERGED`); the seconds it took. Call only
        with nothing in the engine (`has_unfinished_requests()` False), e.g. between steps once
        the engine has drained; until `unmerge`, `serves_now` is True for this adapter version
        alone, and `add_request` refuses any other (`AdapterLoadError`), the base model's
        included. Raises `AdapterLoadError` with the engine unchanged, in LoRA mode, if the
        adapter cannot be merged. The prefix cache is emptied."""
        ...

    def unmerge(self) -> float:
        """Back to LoRA mode: the original weights restored bit for bit (the tensors kept at
        `merge`, never subtracted); the seconds it took; 0 with nothing merged. Call only with
        nothing in the engine. The prefix cache is emptied. `restart()` after an engine death
        also comes back in LoRA mode, nothing merged."""
        ...

    def close(self) -> None: ...
