"""A benchmark double of `VllmEngine` that answers every request at once (bench/overhead.py).

It implements `workers.core.engine_api.Engine` and the few `VllmEngine` attributes serving
uses, tokenizes with the model's real Hugging Face tokenizer, and gives each request a canned
output that is valid for the JSON Schema it was constrained to (plain text without one). So the
worker's own per-job cost is all that is left to measure. Never used by tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from workers.core.engine_api import (
    AdapterHandle,
    AdapterLoadError,
    Generation,
    GenerationRequest,
    MergedModel,
)
from workers.engine.model import EngineValues
from workers.engine.vllm_engine import render_chat

CANNED_TEXT = "Thank you for writing; we are looking into it."


def instance_of(schema: Mapping[str, Any]) -> Any:
    """A small value valid for the plain JSON Schemas pipelines use (objects, enums, strings,
    numbers, arrays); enough for the shipped schemas and the classifier's label schema."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return instance_of(schema[key][0])
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next(k for k in kind if k != "null")
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: instance_of(properties.get(name, {})) for name in schema.get("required", [])}
    if kind == "array":
        return [instance_of(schema.get("items", {}))] * schema.get("minItems", 0)
    if kind == "string":
        return "ok" + "k" * max(0, schema.get("minLength", 0) - 2)
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return True
    return None


class InstantEngine:
    """Every request added finishes in the next `step()` with its canned output."""

    def __init__(self, values: EngineValues, merged: MergedModel | None = None) -> None:
        import json

        from transformers import AutoTokenizer

        self._json = json
        self.values = values
        self.merged = merged
        self.max_model_len: int = values.max_model_len
        self._tokenizer = AutoTokenizer.from_pretrained(str(values.model.path))
        self._resident: set[int] = set()
        self._pending: list[tuple[str, GenerationRequest]] = []
        self._texts: dict[int, str] = {}  # by id of the request's schema: computed once

    # --- prompts -----------------------------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        return list(self._tokenizer.encode(prompt))

    def tokenize_many(self, prompts: Sequence[str]) -> list[list[int]]:
        """As `tokenize`, one call for the batch (the fast tokenizer encodes it in Rust)."""
        return [list(ids) for ids in self._tokenizer(list(prompts))["input_ids"]]

    def render_chat(
        self, messages: Sequence[Mapping[str, str]], chat_template: str | None
    ) -> list[int]:
        return render_chat(self._tokenizer, messages, chat_template)

    # --- adapters ----------------------------------------------------------------------------

    def register_adapter(self, adapter: AdapterHandle) -> None:
        if self.merged is not None and adapter.name != self.merged.adapter.name:
            raise AdapterLoadError(f"adapter {adapter.engine_name}: a merged engine")
        self._resident.add(adapter.lora_id)

    def unregister_adapter(self, adapter: AdapterHandle) -> None:
        self._resident.discard(adapter.lora_id)

    def pin_adapter(self, adapter: AdapterHandle) -> None:
        """Always resident."""

    def resident_adapters(self) -> set[int]:
        return set(self._resident)

    # --- generation --------------------------------------------------------------------------

    def _answer(self, request: GenerationRequest) -> Generation:
        schema = request.json_schema
        if schema is None:
            text = CANNED_TEXT
        else:
            text = self._texts.get(id(schema)) or self._texts.setdefault(
                id(schema), self._json.dumps(instance_of(schema))
            )
        return Generation(text=text, completion_tokens=8, finish_reason="stop")

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return [self._answer(request) for request in requests]

    def add_request(self, request_id: str, request: GenerationRequest, priority: int = 0) -> None:
        self._pending.append((request_id, request))

    def step(self) -> list[tuple[str, Generation]]:
        done, self._pending = self._pending, []
        return [(request_id, self._answer(request)) for request_id, request in done]

    def abort_requests(self, request_ids: Sequence[str]) -> None:
        gone = set(request_ids)
        self._pending = [(rid, r) for rid, r in self._pending if rid not in gone]

    def has_unfinished_requests(self) -> bool:
        return bool(self._pending)

    # --- lifecycle ---------------------------------------------------------------------------

    def restart(self) -> None:
        self._pending = []

    def keep_standby(self) -> bool:
        return False

    def serves_now(self, adapter: AdapterHandle | None) -> bool:
        return self.merged is None or self.merged.serves(adapter)

    def switch_merged(self, merged: MergedModel) -> None:
        self.merged = merged

    def close(self) -> None:
        self._pending = []
