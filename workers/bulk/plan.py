"""Which adapters of a bulk run are served merged, from a cost model with measured inputs.
Pure logic, no I/O but the small JSON file the measurements live in.

A run has one multi-LoRA engine. An adapter served merged is folded into that engine's base
weights in place and unfolded after its jobs (`VllmEngine.merge` / `unmerge`): several times
the LoRA path's throughput, for the price of the tier switch and the agreement check. The check
compares with the LoRA path as served, so the LoRA phase comes first: it answers the check's
probes and serves everything else (the base model, rare adapters). The plan merges an adapter
when its jobs save more than that.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.core.contracts import BASE_MODEL_LABEL, ServedBy


class MergeMode(StrEnum):
    AUTO = "auto"  # merge where the cost model says it pays
    NEVER = "never"  # everything on the multi-LoRA engine
    ALWAYS = "always"  # every adapter of the run merged (the base model's jobs on LoRA)


# Smoothing of stored measurements: the latest run counts half.
MEASUREMENT_WEIGHT = 0.5


class Costs(BaseModel):
    """The cost model's inputs, measured by earlier runs on this machine and model (defaults:
    measured with the zoo model on a 2-core x86-64 machine, classify jobs, for a first run)."""

    model_config = ConfigDict(extra="ignore")

    engine_start_s: float = Field(default=20.0, gt=0, description="The run's engine start.")
    lora_tokens_per_s: float = Field(default=1_500.0, gt=0)
    merged_tokens_per_s: float = Field(default=4_500.0, gt=0)
    switch_s: float = Field(
        default=0.5,
        ge=0,
        description="A merged phase beyond serving and the check: merge and unmerge in place, "
        "and the phase's engine loop set up.",
    )
    check_s: float = Field(default=2.0, ge=0, description="One adapter's agreement check.")
    # Output tokens per token of max_tokens budget, per adapter label (default 0.5).
    budget_fill: dict[str, float] = Field(default_factory=dict)

    def fill(self, adapter: str | None) -> float:
        return self.budget_fill.get(adapter or BASE_MODEL_LABEL, 0.5)

    def measured(self, **observed: float) -> Costs:
        """These costs with the observed values blended in."""
        update = {
            name: value
            if name not in self.model_fields_set
            else (1 - MEASUREMENT_WEIGHT) * getattr(self, name) + MEASUREMENT_WEIGHT * value
            for name, value in observed.items()
            if value > 0
        }
        merged = self.model_copy(update=update)
        merged.model_fields_set.update(update)  # measured now, not defaults any more
        return merged

    def with_fill(self, adapter: str | None, fill: float) -> Costs:
        fills = {**self.budget_fill, adapter or BASE_MODEL_LABEL: fill}
        return self.model_copy(update={"budget_fill": fills})


def load_costs(path: Path) -> Costs:
    try:
        return Costs.model_validate_json(path.read_text())
    except (OSError, ValidationError, ValueError):
        return Costs()


def save_costs(costs: Costs, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
    staging.write_text(json.dumps(costs.model_dump(exclude_unset=True), indent=2))
    staging.replace(path)


@dataclass(frozen=True)
class Demand:
    """One adapter's share of the run (None: the base model)."""

    jobs: int
    token_budget: int  # sum of the jobs' max_tokens


@dataclass(frozen=True)
class Phase:
    """A part of the run on the engine: merged for one adapter, or LoRA for the rest (and the
    agreement check's probes of every merged adapter: then it may serve no adapter at all)."""

    served_by: ServedBy
    adapters: tuple[str | None, ...]
    jobs: int
    estimate_s: float


@dataclass(frozen=True)
class RunPlan:
    mode: MergeMode
    phases: tuple[Phase, ...]
    # What `never` and `always` would have cost, by the same model, beside the plan's choice.
    estimates: Mapping[MergeMode, float] = field(default_factory=dict)

    @property
    def merged(self) -> list[str]:
        return [p.adapters[0] for p in self.phases if p.served_by is ServedBy.MERGED]  # type: ignore[misc]

    @property
    def estimate_s(self) -> float:
        return sum(p.estimate_s for p in self.phases)


def _merged_phase(name: str, demand: Demand, costs: Costs) -> Phase:
    tokens = demand.token_budget * costs.fill(name)
    seconds = costs.switch_s + costs.check_s + tokens / costs.merged_tokens_per_s
    return Phase(ServedBy.MERGED, (name,), demand.jobs, seconds)


def _lora_phase(rest: Mapping[str | None, Demand], costs: Costs, probes: bool) -> Phase | None:
    if not rest and not probes:
        return None
    tokens = sum(d.token_budget * costs.fill(name) for name, d in rest.items())
    seconds = costs.engine_start_s + tokens / costs.lora_tokens_per_s  # the run's one start
    # Largest first: the order the phase's summary lists them in.
    names = tuple(sorted(rest, key=lambda n: (-rest[n].jobs, n or "")))
    return Phase(ServedBy.LORA, names, sum(d.jobs for d in rest.values()), seconds)


def _plan_merging(
    merged: list[str], demand: Mapping[str | None, Demand], costs: Costs
) -> tuple[Phase, ...]:
    phases = [_merged_phase(name, demand[name], costs) for name in merged]
    lora = _lora_phase({n: d for n, d in demand.items() if n not in merged}, costs, bool(merged))
    return (*([lora] if lora else []), *phases)


def plan_run(
    demand: Mapping[str | None, Demand],
    mode: MergeMode,
    costs: Costs,
) -> RunPlan:
    """The run's phases: one LoRA phase for the rest and the probes, then the merged adapters,
    largest gain first.

    `auto` tries merging the k adapters that gain most, for every k, and keeps the cheapest
    plan (every plan starts the one engine: merging in place never saves or costs a start)."""
    demand = {name: d for name, d in demand.items() if d.jobs > 0}
    adapters = [name for name in demand if name is not None]

    def gain(name: str) -> float:
        """Its seconds on LoRA less its merged phase's (which counts its merged serving)."""
        on_lora = demand[name].token_budget * costs.fill(name) / costs.lora_tokens_per_s
        return on_lora - _merged_phase(name, demand[name], costs).estimate_s

    by_gain = sorted(adapters, key=lambda n: (-gain(n), n))
    options = {k: _plan_merging(by_gain[:k], demand, costs) for k in range(len(by_gain) + 1)}
    total = {k: sum(p.estimate_s for p in phases) for k, phases in options.items()}
    estimates = {MergeMode.NEVER: total[0], MergeMode.ALWAYS: total[len(by_gain)]}
    if mode is MergeMode.NEVER:
        chosen = 0
    elif mode is MergeMode.ALWAYS:
        chosen = len(by_gain)
    else:
        chosen = min(total, key=lambda k: (total[k], k))
    estimates[MergeMode.AUTO] = total[chosen] if mode is MergeMode.AUTO else min(total.values())
    return RunPlan(mode, options[chosen], estimates)
