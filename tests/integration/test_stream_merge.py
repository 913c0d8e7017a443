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
)

pytestmark = pytest.mark.integration

DOMINANT, OTHERS = 720, 48


def test_a_dominant_adapter_is_served_merged_in_turns_with_the_others(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    deployment = deploy(kafka_bootstrap, tmp_path)
    zoo = load_zoo_generators()
    rng = random.Random(77)
    jobs: list[dict] = []
    for i in range(DOMINANT + OTHERS):
        text, label, _topic = zoo.make_message(rng)
        if i % ((DOMINANT + OTHERS) // OTHERS) == 5:  # the others, spread through the stream
            other = {"job_id": f"o-{i}", "task": "reply", "input": text}
            if i % 3:  # two in three another adapter's, the rest the base model's
                other["adapter"] = "partner-tone"
            jobs.append(other)
        else:
            jobs.append(
                {
                    "job_id": f"d-{i}",
                    "task": "classify",
                    "input": text,
                    "adapter": "classifier",
                    "metadata": {"expected_label": label},
                }
            )
    produce(kafka_bootstrap, job_records(deployment, jobs))
    log_path = tmp_path / "worker.log"
    code = deployment.run_worker(
        "--max-jobs",
        str(len(jobs)),
        "--idle-exit",
        "60",
        log_path=log_path,
        settings={
            "LORA_WORKERS_MERGE__STREAMING": "true",
            "LORA_WORKERS_MERGE__STREAMING_AFTER_S": "0.2",
            "LORA_WORKERS_MERGE__STREAMING_MIN_JOBS": "32",
            "LORA_WORKERS_MERGE__STREAMING_OTHERS_MAX_WAIT_MS": "500",
            # A shallow engine, so the others keep waiting behind the flood's merged turns
            # (with a deep one, all of them enter before the first merge).
            "LORA_WORKERS_ADMISSION__ENGINE_DEPTH": "32",
        },
    )
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
    others = [results[j["job_id"]] for j in jobs if j["job_id"].startswith("o-")]
    assert {r["served_by"] for r in others} <= {"lora", "base"}
    assert sum(r["served_by"] == "base" for r in others) == sum(
        "adapter" not in j for j in jobs if j["job_id"].startswith("o-")
    )
    # Merged answers are right as often as LoRA's: the zoo's classifier knows its labels.
    merged = [j for j in jobs if results[j["job_id"]]["served_by"] == "merged"]
    right = sum(
        results[j["job_id"]]["output"]["label"] == j["metadata"]["expected_label"] for j in merged
    )
    assert right >= 0.95 * len(merged), (right, len(merged))
    # The engine went back to LoRA for the others at least once, and merged again after.
    assert log.count("merged_turn_started") >= 2, log[-3000:]
