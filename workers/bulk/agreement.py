"""The agreement check of a merged adapter: a sample of its jobs also runs on the LoRA path, and
the merged answers must match closely enough, or the adapter is served on LoRA after all.

The LoRA path's answers come from Hugging Face transformers with PEFT (the adapter applied
unmerged, greedy decoding), which follows vLLM's LoRA path token for token, so the check costs no
second vLLM engine start. Only greedy jobs are sampled: sampled ones differ by design.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from workers.core.engine_api import AdapterHandle, GenerationRequest


@dataclass(frozen=True)
class Agreement:
    adapter: str  # name@version
    jobs: int
    identical_text: int
    parsed_jobs: int  # jobs of tasks with an output schema
    identical_output: int  # of those, the same parsed JSON value on both sides
    seconds: float

    @property
    def text_rate(self) -> float:
        return self.identical_text / self.jobs if self.jobs else 1.0

    @property
    def output_rate(self) -> float | None:
        return self.identical_output / self.parsed_jobs if self.parsed_jobs else None

    def failure(self, min_text: float, min_output: float) -> str | None:
        """Why the merged adapter may not serve (None: it may)."""
        if self.text_rate < min_text:
            return f"identical text {self.text_rate:.1%} < {min_text:.0%}"
        if self.output_rate is not None and self.output_rate < min_output:
            return f"identical parsed output {self.output_rate:.1%} < {min_output:.0%}"
        return None


def sample_rows(rows: Sequence[int], min_jobs: int, fraction: float) -> list[int]:
    """At least `min_jobs` rows or `fraction` of them, spread evenly over the run."""
    wanted = min(len(rows), max(min_jobs, round(len(rows) * fraction)))
    if wanted == 0:
        return []
    step = len(rows) / wanted
    return [rows[int(i * step)] for i in range(wanted)]


def _parsed(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return _UNPARSABLE


_UNPARSABLE = object()


def compare(
    adapter: str,
    merged_texts: Sequence[str],
    reference_texts: Sequence[str],
    has_schema: Sequence[bool],
    seconds: float,
) -> Agreement:
    identical_text = sum(m == r for m, r in zip(merged_texts, reference_texts, strict=True))
    parsed = [
        (_parsed(m), _parsed(r))
        for m, r, schema in zip(merged_texts, reference_texts, has_schema, strict=True)
        if schema
    ]
    identical_output = sum(m is not _UNPARSABLE and m == r for m, r in parsed)
    return Agreement(
        adapter, len(merged_texts), identical_text, len(parsed), identical_output, seconds
    )


class LoraReference:
    """The LoRA path's greedy answers, from transformers + PEFT on the CPU."""

    def __init__(self, base_model: Path, dtype: str) -> None:
        self._base_model = base_model
        self._dtype = dtype

    def answers(self, adapter: AdapterHandle, requests: Sequence[GenerationRequest]) -> list[str]:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self._base_model))
        base = AutoModelForCausalLM.from_pretrained(
            str(self._base_model), dtype=getattr(torch, self._dtype)
        )
        model = PeftModel.from_pretrained(base, adapter.path).eval()
        texts = []
        with torch.inference_mode():
            # One job at a time: padding a batch changes the arithmetic, and with it, now and
            # then, a greedy token.
            for request in requests:
                prompt = torch.tensor([request.prompt_token_ids])
                output = model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=request.max_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                )
                new_tokens = output[0, prompt.shape[1] :]
                texts.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
        return texts
