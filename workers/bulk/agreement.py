"""The agreement check of a merged adapter: probes run on the LoRA path as served and on the
merged engine, and the merged answers must match closely enough, or the adapter is served on
LoRA after all.

A probe is one of the adapter's jobs at temperature 0, with everything else the job would get:
its prompt, max_tokens and, for a task with an output schema, the same schema-constrained
decoding (the job's own `GenerationRequest`, so the same vLLM `SamplingParams`). Both sides run
on vLLM: the LoRA side on an engine with the adapter loaded as LoRA, the merged side on the
engine started on the merged checkpoint. Sampled jobs are probed at temperature 0 too, so an
adapter whose jobs all sample is checked like any other.

The gate fails closed: no compared probe, fewer than required, or a probe that crashed, was
refused or errored on either side (a disagreement) all count against the merge.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog

from workers.core.engine_api import Engine, EngineDied, GenerationRequest

log = structlog.get_logger(__name__)

K = TypeVar("K")  # what identifies a probe: an input row, a probe's index

# How a generation may end and still be an answer; anything else ("abort", "error") is none.
ANSWER_FINISH_REASONS = frozenset({"stop", "length"})


@dataclass(frozen=True)
class Probe:
    """One probe's answer on one side: None when it crashed, was refused or errored."""

    text: str | None
    has_schema: bool


@dataclass(frozen=True)
class Agreement:
    adapter: str  # name@version
    jobs: int  # probes compared
    identical_text: int
    parsed_jobs: int  # probes of tasks with an output schema
    identical_output: int  # of those, the same parsed JSON value on both sides
    failed: int  # probes without an answer on one side or both (each a disagreement)
    seconds: float  # both sides' probes
    required: int = 1  # probes the check must compare to decide anything

    @property
    def text_rate(self) -> float:
        return self.identical_text / self.jobs if self.jobs else 0.0

    @property
    def output_rate(self) -> float | None:
        return self.identical_output / self.parsed_jobs if self.parsed_jobs else None

    def failure(self, min_text: float, min_output: float) -> str | None:
        """Why the merged adapter may not serve (None: it may)."""
        needed = max(self.required, 1)
        if self.jobs < needed:
            return f"compared {self.jobs} jobs, the check needs {needed}"
        if self.text_rate < min_text:
            failed = f" ({self.failed} without an answer)" if self.failed else ""
            return f"identical text {self.text_rate:.1%} < {min_text:.0%}{failed}"
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


def _parsed(text: str | None) -> object:
    if text is None:
        return _UNPARSABLE
    try:
        return json.loads(text)
    except ValueError:
        return _UNPARSABLE


_UNPARSABLE = object()


def compare(
    adapter: str,
    merged: Mapping[K, Probe],
    reference: Mapping[K, Probe],
    seconds: float,
    required: int = 1,
) -> Agreement:
    """The two sides' answers, probe by probe (keyed alike). A probe that has no answer on
    either side, or is missing on one (refused before the engine on one path only), disagrees."""
    keys = sorted(set(merged) | set(reference), key=repr)
    identical_text = parsed_jobs = identical_output = failed = 0
    for key in keys:
        mine, theirs = merged.get(key), reference.get(key)
        either = mine or theirs
        assert either is not None
        ours = mine.text if mine else None
        others = theirs.text if theirs else None
        if ours is None or others is None:
            failed += 1
        elif ours == others:
            identical_text += 1
        if either.has_schema:
            parsed_jobs += 1
            value = _parsed(ours)
            identical_output += value is not _UNPARSABLE and value == _parsed(others)
    return Agreement(
        adapter,
        len(keys),
        identical_text,
        parsed_jobs,
        identical_output,
        failed,
        seconds,
        required,
    )


def greedy(request: GenerationRequest) -> GenerationRequest:
    """The probe of a job: its own request at temperature 0 (seed irrelevant then)."""
    return dataclasses.replace(request, temperature=0.0, seed=None)


def run_probes(
    engine: Engine, probes: Mapping[K, GenerationRequest], has_schema: Mapping[K, bool]
) -> tuple[dict[K, Probe], float]:
    """Each probe's answer on `engine` (one batch; if it is refused, one probe at a time, so
    the refused ones are known), and how long that took."""
    started = time.monotonic()
    keys = list(probes)
    texts: list[str | None] = [None] * len(keys)
    try:
        texts = _texts(engine, [probes[key] for key in keys])
    except EngineDied as death:
        log.warning("agreement_probe_engine_died", error=str(death))
    except Exception as refused:
        log.warning("agreement_probes_refused", error=str(refused))
        for index, key in enumerate(keys):
            try:
                texts[index] = _texts(engine, [probes[key]])[0]
            except EngineDied as death:
                log.warning("agreement_probe_engine_died", error=str(death))
                break  # the rest stay unanswered
            except Exception as exc:
                log.warning("agreement_probe_refused", probe=str(key), error=str(exc))
    answers = {key: Probe(text, has_schema[key]) for key, text in zip(keys, texts, strict=True)}
    return answers, time.monotonic() - started


def _texts(engine: Engine, requests: list[GenerationRequest]) -> list[str | None]:
    if not requests:
        return []
    return [
        g.text if g.finish_reason in ANSWER_FINISH_REASONS else None
        for g in engine.generate(requests)
    ]
