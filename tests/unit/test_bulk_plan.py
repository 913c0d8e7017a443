"""The merged tier's plan, sample and agreement arithmetic. Plain data only (the probes' engine
is a fake that answers from a table)."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.bulk.agreement import Probe, compare, greedy, run_probes, sample_rows
from workers.bulk.plan import Costs, Demand, MergeMode, load_costs, plan_run, save_costs
from workers.core.contracts import ServedBy
from workers.core.engine_api import EngineDied, Generation, GenerationRequest

# Round numbers: the run's one engine start costs 10 s, LoRA makes 1,000 tok/s and merged
# 4,000 tok/s, a tier switch in place (merge and unmerge) 0.5 s; every job fills its whole
# 100-token budget.
COSTS = Costs(
    engine_start_s=10.0,
    lora_tokens_per_s=1_000.0,
    merged_tokens_per_s=4_000.0,
    switch_s=0.5,
    check_s=3.0,
    budget_fill={"dominant": 1.0, "rare": 1.0, "base": 1.0},
)


def demand(jobs: int) -> Demand:
    return Demand(jobs=jobs, token_budget=jobs * 100)


def test_never_serves_everything_on_one_lora_engine() -> None:
    plan = plan_run({"dominant": demand(4000), None: demand(10)}, MergeMode.NEVER, COSTS)
    assert [(p.served_by, set(p.adapters)) for p in plan.phases] == [
        (ServedBy.LORA, {"dominant", None})
    ]
    assert plan.estimate_s == pytest.approx(10 + 4010 * 100 / 1000)


def test_auto_merges_the_dominant_adapter_and_keeps_the_rare_one_on_lora() -> None:
    plan = plan_run({"dominant": demand(4000), "rare": demand(20)}, MergeMode.AUTO, COSTS)
    assert plan.merged == ["dominant"]
    # LoRA first: it answers the agreement check's probes, then serves the rest.
    assert [p.served_by for p in plan.phases] == [ServedBy.LORA, ServedBy.MERGED]
    # merged: switch 0.5 + check 3 + 400,000 tokens at 4,000/s; LoRA: the start 10 + 2 s
    assert plan.estimate_s == pytest.approx(0.5 + 3 + 100 + 10 + 2)
    assert plan.estimate_s <= min(plan.estimates[MergeMode.NEVER], plan.estimates[MergeMode.ALWAYS])


def test_a_merge_in_place_costs_a_switch_and_the_check_never_an_engine_start() -> None:
    # One engine serves both tiers: merging pays the switch and the check, so runs merge
    # that another engine start (10 s) would have cost more than they save.
    alone = plan_run({"dominant": demand(300)}, MergeMode.AUTO, COSTS)
    assert alone.merged == ["dominant"]  # 10 + (0.5+3+7.5) s vs 10+30 s on LoRA alone
    assert [(p.served_by, p.adapters) for p in alone.phases] == [
        (ServedBy.LORA, ()),
        (ServedBy.MERGED, ("dominant",)),
    ]
    assert alone.estimate_s == pytest.approx(10 + 0.5 + 3 + 7.5)
    pair = plan_run({"dominant": demand(100), "rare": demand(100)}, MergeMode.AUTO, COSTS)
    assert sorted(pair.merged) == ["dominant", "rare"]  # each 0.5+3+2.5 s vs 10 s on LoRA
    assert pair.estimate_s == pytest.approx(10 + 2 * (0.5 + 3 + 2.5))
    fewer = plan_run({"dominant": demand(40)}, MergeMode.AUTO, COSTS)
    assert fewer.merged == []  # 0.5+3+1 s merged is no gain on 4 s on LoRA


def test_always_merges_every_adapter_but_the_base_model_stays_on_lora() -> None:
    plan = plan_run({"a": demand(5), "b": demand(7), None: demand(3)}, MergeMode.ALWAYS, COSTS)
    assert sorted(plan.merged) == ["a", "b"]
    assert plan.phases[0].served_by is ServedBy.LORA and plan.phases[0].adapters == (None,)


def test_measured_costs_blend_into_the_stored_ones_and_survive_a_round_trip(
    tmp_path: Path,
) -> None:
    first = Costs().measured(lora_tokens_per_s=3_000.0)
    assert first.lora_tokens_per_s == 3_000.0  # a default is replaced outright
    second = first.measured(lora_tokens_per_s=1_000.0, switch_s=0.0)
    assert second.lora_tokens_per_s == 2_000.0  # a measurement is blended
    assert second.switch_s == Costs().switch_s  # zero means "not measured"
    path = tmp_path / "costs.json"
    save_costs(second.with_fill("dominant", 0.25), path)
    loaded = load_costs(path)
    assert loaded.lora_tokens_per_s == 2_000.0 and loaded.fill("dominant") == 0.25
    assert loaded.fill(None) == 0.5  # unknown: half the budget


def test_unreadable_stored_costs_fall_back_to_defaults(tmp_path: Path) -> None:
    path = tmp_path / "costs.json"
    path.write_text('{"engine_start_s": -4')
    assert load_costs(path) == Costs()


@pytest.mark.parametrize(
    ("rows", "expected"),
    [(10, 10), (32, 32), (1000, 32), (3200, 32), (6400, 64), (0, 0)],
)
def test_the_sample_is_at_least_32_jobs_or_one_percent(rows: int, expected: int) -> None:
    chosen = sample_rows(list(range(rows)), 32, 0.01)
    assert len(chosen) == expected == len(set(chosen))
    if rows > expected > 0:  # spread over the run, not its head
        assert chosen[-1] >= rows * (expected - 1) / expected - 1


def answers(*texts: str | None, schema: bool = True) -> dict[int, Probe]:
    return {row: Probe(text, schema) for row, text in enumerate(texts)}


def test_agreement_counts_identical_text_and_identical_parsed_output() -> None:
    merged = answers('{"label": "billing"}', '{"label":"billing"}', '{"label": "bug"}')
    merged[3] = Probe("free text", False)
    reference = answers('{"label": "billing"}', '{"label": "billing"}', '{"label": "other"}')
    reference[3] = Probe("free text!", False)
    agreement = compare("classifier@1", merged, reference, seconds=1.0)
    assert (agreement.identical_text, agreement.jobs) == (1, 4)
    assert (agreement.identical_output, agreement.parsed_jobs) == (2, 3)
    assert agreement.failure(min_text=0.2, min_output=0.6) is None
    assert "identical text" in (agreement.failure(min_text=0.3, min_output=0.0) or "")
    assert "parsed output" in (agreement.failure(min_text=0.0, min_output=0.7) or "")


def test_unparsable_outputs_never_agree() -> None:
    agreement = compare("a@1", answers("{oops"), answers("{oops"), seconds=0.0)
    assert agreement.identical_text == 1 and agreement.identical_output == 0


def test_a_check_that_compared_nothing_fails() -> None:
    # Every probe refused before the engine on both sides: nothing compared, nothing agreed.
    agreement = compare("a@1", {}, {}, seconds=0.0)
    assert agreement.jobs == 0 and agreement.text_rate == 0.0
    assert agreement.failure(min_text=0.0, min_output=0.0) == "compared 0 jobs, the check needs 1"


def test_a_check_that_compared_fewer_than_its_minimum_fails() -> None:
    same = answers('{"label": "bug"}', '{"label": "bug"}')
    agreement = compare("a@1", same, same, seconds=0.0, required=32)
    assert agreement.text_rate == 1.0
    assert agreement.failure(0.9, 0.95) == "compared 2 jobs, the check needs 32"


def test_a_crash_or_a_refusal_on_either_side_is_a_disagreement() -> None:
    # A checkpoint that crashes on every probe (or whose engine refuses them) does not agree,
    # even where the LoRA path failed the same way.
    reference = answers('{"label": "bug"}', None, '{"label": "bug"}', None)
    crashed = answers(None, None, None, None)
    agreement = compare("a@1", crashed, reference, seconds=0.0)
    assert (agreement.jobs, agreement.failed, agreement.identical_text) == (4, 4, 0)
    assert agreement.identical_output == 0
    assert agreement.failure(0.9, 0.95) == "identical text 0.0% < 90% (4 without an answer)"
    # A probe refused before the engine on one side only is missing there: a disagreement too.
    one_sided = compare("a@1", answers('{"label": "bug"}'), answers('{"label": "bug"}', "x"), 0.0)
    assert (one_sided.jobs, one_sided.failed, one_sided.identical_text) == (2, 1, 1)


class TableEngine:
    """Answers each probe from a table of prompts; refuses or dies on the ones it is told to."""

    def __init__(self, refuse: frozenset[int] = frozenset(), dies: bool = False) -> None:
        self.refuse, self.dies = refuse, dies
        self.batches: list[list[GenerationRequest]] = []

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        self.batches.append(requests)
        if self.dies:
            raise EngineDied("vLLM engine died during a batch")
        if any(r.prompt_token_ids[0] in self.refuse for r in requests):
            raise ValueError("the engine refused a request")
        return [Generation(f"answer {r.prompt_token_ids[0]}", 2, "stop") for r in requests]


def probe(token: int) -> GenerationRequest:
    return greedy(GenerationRequest([token], None, 8, temperature=0.8, seed=3, json_schema={}))


def test_probes_run_at_temperature_0_and_a_refused_one_fails_alone() -> None:
    assert (probe(1).temperature, probe(1).seed, probe(1).json_schema) == (0.0, None, {})
    requests = {row: probe(row) for row in (1, 2, 3)}
    engine = TableEngine(refuse=frozenset({2}))
    found, _ = run_probes(engine, requests, {row: True for row in requests})  # type: ignore[arg-type]
    assert {row: p.text for row, p in found.items()} == {1: "answer 1", 2: None, 3: "answer 3"}
    assert len(engine.batches) == 4  # the batch, then each probe alone to find the refused one
    dead, _ = run_probes(TableEngine(dies=True), requests, {row: True for row in requests})  # type: ignore[arg-type]
    assert {p.text for p in dead.values()} == {None}
