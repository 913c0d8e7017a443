"""Tenant fairness on real parts: a tenant flooding a topic does not starve another tenant's
jobs queued behind its flood (weighted fair admission into the engine)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.integration.harness import deploy, job_records, load_zoo_generators, produce

pytestmark = pytest.mark.integration

FLOOD, QUIET = 400, 20


def tenant_jobs(tenant: str, count: int, rng: random.Random) -> list[dict]:
    zoo = load_zoo_generators()
    return [
        {
            "job_id": f"{tenant}-{i:04d}",
            "task": "classify",
            "tenant": tenant,
            "input": zoo.make_message(rng)[0],
        }
        for i in range(count)
    ]


def test_a_flooding_tenant_does_not_starve_a_quiet_one(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    deployment = deploy(kafka_bootstrap, tmp_path)
    rng = random.Random(51)
    flood, quiet = tenant_jobs("flood", FLOOD, rng), tenant_jobs("quiet", QUIET, rng)
    # The flood first, on the same topic: in arrival order the quiet tenant is served last.
    produce(kafka_bootstrap, job_records(deployment, flood + quiet))
    log_path = tmp_path / "worker.log"
    code = deployment.run_worker(
        "--max-jobs",
        str(FLOOD + QUIET),
        "--idle-exit",
        "60",
        log_path=log_path,
        # A shallow engine, so admission decides the order.
        settings={"LORA_WORKERS_ADMISSION__ENGINE_DEPTH": "8"},
    )
    assert code == 0, log_path.read_text()[-3000:]
    results = [
        json.loads(m.value())
        for m in deployment.read([deployment.pipelines["classify"].result_topic])
    ]
    completed = {r["job_id"]: r["timings"]["completed_at_ms"] for r in results}
    assert len(completed) == FLOOD + QUIET
    order = sorted(completed, key=lambda job_id: (completed[job_id], job_id))
    quiet_ranks = sorted(order.index(job["job_id"]) for job in quiet)
    print(f"\nquiet tenant's jobs finished at ranks {quiet_ranks} of {len(order)}")
    # Turns alternate once the quiet jobs are read: they finish among the first fifth, not last.
    assert quiet_ranks[-1] < (FLOOD + QUIET) // 5, quiet_ranks
