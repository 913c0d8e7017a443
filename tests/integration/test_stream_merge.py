"""Merged turns in a live stream, on real parts: a Kafka worker with `merge.streaming` serves a
dominant adapter merged into the running engine's weights, in turns with the other adapters on
LoRA, every job answered once, by the tier its result names."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.harness import (
    assert_committed_to_the_end,
    deploy,
    job_records,
    load_zoo_generators,
    produce,
    wait_for_event,
)

pytestmark = pytest.mark.integration

DOMINANT, OTHERS = 1440, 48


def test_a_dominant_adapter_is_served_merged_in_turns_with_the_others(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    deployment = deploy(kafka_bootstrap, tmp_path)
    zoo = load_zoo_generators()
    rng = random.Random(77)
    dominant: list[dict] = []
    for i in range(DOMINANT):
        text, label, _topic = zoo.make_message(rng)
        job = {"job_id": f"d-{i}", "task": "classify", "input": text, "adapter": "classifier"}
        dominant.append({**job, "metadata": {"expected_label": label}})
    others: list[dict] = []
    for i in range(OTHERS):
        other = {"job_id": f"o-{i}", "task": "reply", "input": zoo.make_message(rng)[0]}
        if i % 3:  # two in three another adapter's, the rest the base model's
            other["adapter"] = "partner-tone"
        others.append(other)
    jobs = dominant + others
    produce(kafka_bootstrap, job_records(deployment, dominant))
    log_path = tmp_path / "worker.log"
    worker = deployment.start_worker(
        "--max-jobs",
        str(len(jobs)),
        "--idle-exit",
        "60",
        log_path=log_path,
        LORA_WORKERS_MERGE__STREAMING="true",
        LORA_WORKERS_MERGE__STREAMING_AFTER_S="0.2",
        LORA_WORKERS_MERGE__STREAMING_MIN_JOBS="32",
        LORA_WORKERS_MERGE__STREAMING_OTHERS_MAX_WAIT_MS="500",
        # A shallow engine, so the flood's merged turn outlasts the others' wait bound.
        LORA_WORKERS_ADMISSION__ENGINE_DEPTH="32",
    )
    try:
        # The others arrive while the flood is served merged: they wait, then get a turn.
        wait_for_event(worker, log_path, "merged_turn_started")
        produce(kafka_bootstrap, job_records(deployment, others))
        code = worker.wait(timeout=600)
    finally:
        deployment.kill_workers()
    log = log_path.read_text()
    assert code == 0, log[-3000:]
    assert_committed_to_the_end(deployment)
    topics = [deployment.pipelines[t].result_topic for t in ("classify", "reply")]
    results = {}
    counts: Counter[str] = Counter()
    for message in deployment.read(topics):
        result = json.loads(message.value())
        counts[result["job_id"]] += 1
        results[result["job_id"]] = result
    assert set(counts) == {j["job_id"] for j in jobs} and set(counts.values()) == {1}
    assert not deployment.read(deployment.dlq_topics)
    # The checked, merged classifier served most of its jobs; the others ran on LoRA only.
    assert "merge_checked" in log
    served = Counter(
        (r["adapter"]["name"], r["served_by"]) for r in results.values() if r["adapter"]
    )
    print(f"\nserved: {dict(served)}")
    assert served[("classifier", "merged")] >= DOMINANT // 2
    answered = [results[j["job_id"]] for j in others]
    assert {r["served_by"] for r in answered} <= {"lora", "base"}
    assert sum(r["served_by"] == "base" for r in answered) == sum(
        "adapter" not in j for j in others
    )
    # They waited their bound (0.5 s) and the engine's drain, not the flood's whole backlog.
    waited = max(r["timings"]["queue_ms"] for r in answered)
    assert waited < 3000, waited
    # Merged answers are right as often as LoRA's: the zoo's classifier knows its labels.
    merged = [j for j in dominant if results[j["job_id"]]["served_by"] == "merged"]
    right = sum(
        results[j["job_id"]]["output"]["label"] == j["metadata"]["expected_label"] for j in merged
    )
    assert right >= 0.95 * len(merged), (right, len(merged))
    # The engine went back to LoRA for the others at least once, and merged again after.
    assert log.count("merged_turn_started") >= 2, log[-3000:]
