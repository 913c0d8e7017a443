"""Three times more adapters than the engine's host cache holds: evictions and reloads happen,
and every result is still produced by the right weights (PEFT oracle). Real Kafka, real vLLM."""

from __future__ import annotations

import json
import random
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from tests.integration.harness import ROOT, deploy, job_record, produce
from tests.integration.oracle import PeftOracle
from workers.adapters.checks import adapter_digest
from workers.core.contracts import AdapterUpdate, AdapterVersionSpec

pytestmark = pytest.mark.integration

ZOO = ROOT / "models"
MAX_CPU_LORAS = 4
ADAPTERS = 3 * MAX_CPU_LORAS
SOURCES = {  # zoo weights -> (task, an input that task's adapter was trained on)
    "classifier": ("classify", "Hello, this is Ana. I have a question about my invoice."),
    "customer-tone": ("reply", "Hi, this is Ben. Please look into my login bug."),
    "partner-tone": ("reply", "Dear support, this is Uma. Something is wrong with the refund."),
    "summarizer": ("summarize", "Ana fixed the design today. The team moved the plan on Friday."),
}


def test_evictions_and_reloads_keep_every_result_correct(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    deployment = deploy(kafka_bootstrap, tmp_path)
    weights_of: dict[str, str] = {}
    updates = []
    for i in range(ADAPTERS):
        name, source = f"cached-{i:02d}", list(SOURCES)[i % len(SOURCES)]
        path = deployment.adapter_root / name
        shutil.copytree(ZOO / "adapters" / source, path)
        weights_of[name] = source
        update = AdapterUpdate(
            name=name,
            base_model="tiny-llama",
            versions=[AdapterVersionSpec(version="1", path=str(path), sha256=adapter_digest(path))],
        )
        updates.append(
            (deployment.updates_topic, name.encode(), update.model_dump_json().encode(), [])
        )
    produce(kafka_bootstrap, updates)

    rng = random.Random(5)
    jobs = []
    for n in range(10 * ADAPTERS):
        name = f"cached-{rng.randrange(ADAPTERS):02d}"
        task, text = SOURCES[weights_of[name]]
        jobs.append(
            {"job_id": f"c-{n:04d}", "task": task, "input": f"{text} Ref {n}.", "adapter": name}
        )
    produce(
        kafka_bootstrap, [job_record(deployment.pipelines[j["task"]].input_topic, j) for j in jobs]
    )

    log_path = tmp_path / "worker.log"
    exit_code = deployment.run_worker(
        "--max-jobs",
        str(len(jobs)),
        "--idle-exit",
        "90",
        log_path=log_path,
        settings={
            "LORA_WORKERS_ENGINE__MAX_CPU_LORAS": str(MAX_CPU_LORAS),
            "LORA_WORKERS_ENGINE__MAX_LORAS": "2",
            "LORA_WORKERS_ADMISSION__ENGINE_DEPTH": "16",
            "LORA_WORKERS_ADAPTERS__PREWARM": '["cached-00", "cached-01"]',
        },
    )
    log = log_path.read_text()
    assert exit_code == 0, log[-3000:]

    results = {}
    for message in deployment.read([p.result_topic for p in deployment.pipelines.values()]):
        result = json.loads(message.value())
        assert result["job_id"] not in results, "duplicate result"
        results[result["job_id"]] = result
    assert set(results) == {j["job_id"] for j in jobs}

    oracle = PeftOracle(ZOO / "tiny-llama", {s: ZOO / "adapters" / s for s in SOURCES})
    checked: dict[str, int] = defaultdict(int)
    for job in jobs:
        result = results[job["job_id"]]
        path = deployment.adapter_root / job["adapter"]
        assert result["adapter"] == {
            "name": job["adapter"],
            "version": "1",
            "sha256": adapter_digest(path),
        }
        if checked[job["adapter"]] < 2:
            pipeline = deployment.pipelines[job["task"]]
            want = oracle.generate(
                weights_of[job["adapter"]],
                pipeline.render_prompt(job["input"]),
                pipeline.sampling.max_tokens,
            )
            assert result["raw_output"] == want.text, job
            checked[job["adapter"]] += 1
    assert len(checked) == ADAPTERS

    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    events = [line for line in lines if "event" in line]
    (prewarmed,) = [e for e in events if e["event"] == "adapters_prewarmed"]
    # Engine names carry the files' sha256, so other files under one version never share caches.
    names = [name.split("#") for name in prewarmed["adapters"]]
    assert [name for name, _ in names] == ["cached-00@1", "cached-01@1"]
    assert all(len(digest) == 12 for _, digest in names)
    (stopped,) = [e for e in events if e["event"] == "worker_stopped"]
    cache = stopped["adapter_cache"]
    assert cache["evictions"] > 0, cache
    assert cache["loads"] > 0 and cache["misses"] == cache["loads"], cache
