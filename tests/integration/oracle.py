"""The correctness oracle: Hugging Face transformers + PEFT, greedy, fp32.

FINDINGS.md: vLLM with a LoRA adapter in fp32 gives the same greedy tokens as PEFT on the same
adapter, so a match here proves the worker applied the right adapter to the right job.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel


@dataclass(frozen=True)
class OracleOutput:
    text: str
    token_count: int


class PeftOracle:
    def __init__(self, base_dir: Path, adapter_dirs: dict[str, Path]) -> None:
        self.base_dir = base_dir
        self.adapter_dirs = adapter_dirs
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)

    @cache  # noqa: B019 - one oracle per test module; models are tiny
    def _model(self, adapter: str | None) -> PreTrainedModel:
        base = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=torch.float32)
        if adapter is None:
            return base.eval()
        return PeftModel.from_pretrained(base, self.adapter_dirs[adapter]).eval()

    def generate(self, adapter: str | None, prompt: str, max_tokens: int) -> OracleOutput:
        inputs = self.tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = self._model(adapter).generate(
                **inputs,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
        return OracleOutput(
            text=self.tokenizer.decode(new_tokens, skip_special_tokens=True),
            token_count=len(new_tokens),
        )
