"""Merging an adapter into a running vLLM engine's weights and back (`VllmEngine.merge` /
`unmerge`), on one real engine for the whole module: the weights and every output come back bit
for bit, merged answers pass the bulk run's agreement gate against the LoRA path on the same
engine, only the merged adapter is served while merged, and an engine death while merged comes
back on LoRA with nothing merged."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator
from dataclasses import replace

import psutil
import pytest

from tests.integration.harness import ROOT
from workers.adapters.checks import adapter_digest
from workers.bulk.agreement import compare, greedy, run_probes
from workers.core.config import EngineSettings
from workers.core.contracts import ServedBy
from workers.core.engine_api import (
    AdapterHandle,
    AdapterLoadError,
    EngineDied,
    Generation,
    GenerationRequest,
)
from workers.engine.model import engine_values
from workers.engine.vllm_engine import VllmEngine, engine_core_pids

pytestmark = pytest.mark.integration

ZOO = ROOT / "models" / "adapters"
NAMES = ("classifier", "summarizer", "customer-tone")
PROMPTS = 48


@pytest.fixture(scope="module")
def engine() -> Iterator[VllmEngine]:
    values = engine_values(
        EngineSettings(model=ROOT / "models" / "tiny-llama"), {name: 8 for name in NAMES}
    )
    engine = VllmEngine(values)
    try:
        for lora_id, name in enumerate(NAMES, start=1):
            engine.register_adapter(handle(name, lora_id))
        yield engine
    finally:
        engine.close()


def handle(name: str, lora_id: int | None = None) -> AdapterHandle:
    lora_id = lora_id or NAMES.index(name) + 1
    return AdapterHandle(name, "1", str(ZOO / name), lora_id, adapter_digest(ZOO / name))


def prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(8, 60))] for _ in range(PROMPTS)]


def answers(engine: VllmEngine, adapter: AdapterHandle | None, seed: int) -> list[Generation]:
    return engine.generate([GenerationRequest(p, adapter, 16, 0.0, None) for p in prompts(seed)])


def texts(generations: list[Generation]) -> list[str]:
    return [g.text for g in generations]


def test_unmerge_restores_the_weights_and_every_output_bit_for_bit(engine: VllmEngine) -> None:
    classifier, summarizer = handle("classifier"), handle("summarizer")
    weights = engine.weight_digests()
    before = {
        "base": texts(answers(engine, None, 1)),
        "summarizer": texts(answers(engine, summarizer, 2)),
        "classifier": texts(answers(engine, classifier, 3)),
    }

    engine.merge(classifier)
    merged_weights = engine.weight_digests()
    # The classifier's target modules (q/k/v/o, gate/up/down on both layers) changed.
    changed = {name for name in weights if weights[name] != merged_weights[name]}
    assert changed == {
        f"model.layers.{layer}.{module}"
        for layer in (0, 1)
        for module in (
            "self_attn.qkv_proj",
            "self_attn.o_proj",
            "mlp.gate_up_proj",
            "mlp.down_proj",
        )
    }
    merged = answers(engine, classifier, 3)
    assert {g.served_by for g in merged} == {ServedBy.MERGED}
    assert engine.unmerge() > 0

    assert engine.merged_adapter is None
    assert engine.weight_digests() == weights
    after = {
        "base": texts(answers(engine, None, 1)),
        "summarizer": texts(answers(engine, summarizer, 2)),
        "classifier": texts(answers(engine, classifier, 3)),
    }
    assert after == before
    assert engine.unmerge() == 0.0  # nothing merged: nothing to do


def test_merged_answers_pass_the_agreement_gate_and_only_they_are_served(
    engine: VllmEngine,
) -> None:
    classifier = handle("classifier")
    requests = {
        row: greedy(GenerationRequest(p, classifier, 24, 0.7, 5))
        for row, p in enumerate(prompts(7))
    }
    schemas = dict.fromkeys(requests, False)
    lora = run_probes(engine, requests, schemas)
    engine.merge(classifier)
    try:
        assert engine.merged_adapter == classifier
        merged = run_probes(engine, requests, schemas)
        agreement = compare("classifier@1", merged[0], lora[0], 0.0, required=PROMPTS)
        assert agreement.failure(min_text=0.97, min_output=0.99) is None, agreement
        # While merged, nothing else may enter: the merged weights would mis-serve it.
        assert engine.serves_now(classifier)
        assert not engine.serves_now(None)
        assert not engine.serves_now(handle("summarizer"))
        with pytest.raises(AdapterLoadError, match="is merged into the engine"):
            engine.add_request("x", GenerationRequest([5, 6], None, 4, 0.0, None))
        with pytest.raises(AdapterLoadError, match="unmerge first"):
            engine.merge(handle("summarizer"))
    finally:
        engine.unmerge()
    assert engine.serves_now(None) and engine.serves_now(handle("summarizer"))


def test_a_deliberately_wrong_merge_fails_the_gate(engine: VllmEngine) -> None:
    # Files that changed since the LoRA path loaded them are refused, the engine left on LoRA.
    classifier = handle("classifier")
    changed = replace(classifier, path=str(ZOO / "summarizer"))
    weights = engine.weight_digests()
    with pytest.raises(AdapterLoadError, match="files changed"):
        engine.merge(changed)
    assert engine.merged_adapter is None and engine.weight_digests() == weights
    # The summarizer's weights merged under the classifier's name: the gate must refuse it.
    wrong = replace(changed, sha256=adapter_digest(ZOO / "summarizer"))
    requests = {
        row: greedy(GenerationRequest(p, classifier, 24, 0.0, None))
        for row, p in enumerate(prompts(9))
    }
    schemas = dict.fromkeys(requests, False)
    lora = run_probes(engine, requests, schemas)
    engine.merge(wrong)
    try:
        as_merged = {row: replace(request, adapter=wrong) for row, request in requests.items()}
        merged = run_probes(engine, as_merged, schemas)
    finally:
        engine.unmerge()
    agreement = compare("classifier@1", merged[0], lora[0], 0.0, required=PROMPTS)
    assert (agreement.failure(min_text=0.97, min_output=0.99) or "").startswith("identical text")


def test_an_engine_death_while_merged_comes_back_on_lora_with_nothing_merged(
    engine: VllmEngine,
) -> None:
    classifier = handle("classifier")
    weights = engine.weight_digests()
    lora = texts(answers(engine, classifier, 4))
    engine.merge(classifier)
    cores = [psutil.Process(pid) for pid in engine_core_pids()]
    for core in cores:
        os.kill(core.pid, signal.SIGKILL)
    psutil.wait_procs(cores, timeout=10)
    with pytest.raises(EngineDied):
        answers(engine, classifier, 4)

    engine.restart()

    assert engine.merged_adapter is None
    assert engine.serves_now(None) and engine.serves_now(handle("summarizer"))
    assert engine.weight_digests() == weights
    again = answers(engine, classifier, 4)
    assert {g.served_by for g in again} == {ServedBy.LORA}
    assert texts(again) == lora
    # And it merges again on the new engine.
    engine.merge(classifier)
    assert {g.served_by for g in answers(engine, classifier, 4)} == {ServedBy.MERGED}
    engine.unmerge()


def test_tier_switches_are_counted_and_timed(engine: VllmEngine) -> None:
    from prometheus_client import REGISTRY

    def count(direction: str) -> float:
        value = REGISTRY.get_sample_value(
            "lora_workers_tier_switches_total", {"direction": direction}
        )
        return value or 0.0

    merges, unmerges = count("merge"), count("unmerge")
    engine.merge(handle("summarizer"))
    engine.unmerge()
    assert (count("merge"), count("unmerge")) == (merges + 1, unmerges + 1)
    seconds = REGISTRY.get_sample_value(
        "lora_workers_tier_switch_seconds_count", {"direction": "merge"}
    )
    assert seconds is not None and seconds >= 1
