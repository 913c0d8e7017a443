"""Benchmark: tenant fairness through the real pipeline, Kafka → worker → result topic.

    .venv/bin/python bench/fairness.py --capacity 140 [--seconds 20] [--policies switch_aware
        arrival]

One topic (the classify task's; its pipeline routes every tenant to the `classifier` adapter),
jobs carrying `"tenant": "tenant-a"` or `"tenant": "tenant-b"`:
1. B alone at r_B = 0.1 x capacity for `seconds`: B's publish → read_committed result p95.
2. A at 10 x r_B (about the capacity) and B at r_B, interleaved on the same topic, for
   `seconds`: B's p95 and A's p95.
The figure is B's p95 with A flooding ÷ B's p95 alone (the target: at most 2.0). Phase 2 runs
again on a second worker with `LORA_WORKERS_ADMISSION__POLICY=arrival` (plain arrival order, no
tenant fairness) for contrast. `capacity` is the pipeline's jobs/s (bench/pipeline.py;
bench/compare.py passes the one it just measured). The workers' `max_in_flight` is raised so the
whole backlog is admitted (fetching never pauses behind A's jobs).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from common import ZOO, percentile, zoo_inputs
from pipeline import RunningWorker, WorkerVariant, publish_steadily

from tests.broker import kafka_broker
from workers.logs import configure_logging

TASK = "classify"
TENANT_A, TENANT_B = "tenant-a", "tenant-b"
FLOOD_FACTOR = 10  # A's rate over B's
MAX_IN_FLIGHT = 100_000


@dataclass
class FairnessFigures:
    capacity: float  # jobs/s the rates derive from
    rate_b: float
    broker: str
    alone_b: list[float] = field(default_factory=list)  # B's latencies (ms), B alone
    # policy → (B's latencies, A's latencies) in ms, A flooding
    flooded: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    dead_letters: int = 0

    def ratio(self, policy: str) -> float:
        """B's p95 with A flooding over B's p95 alone."""
        return percentile(self.flooded[policy][0], 0.95) / percentile(self.alone_b, 0.95)


def tenant_jobs(count: int, tenant: str, tokens: int, seed: int, prefix: str) -> list[dict]:
    """Classify jobs of one tenant (no adapter named: the pipeline routes them)."""
    return [
        {
            "job_id": f"{prefix}{i}",
            "task": TASK,
            "input": text,
            "tenant": tenant,
            "params": {"max_tokens": tokens},
        }
        for i, (_, text) in enumerate(zoo_inputs(count, seed=seed))
    ]


def _schedule(a_jobs: list[dict], b_jobs: list[dict]) -> list[dict]:
    """B's jobs spread evenly among A's: one B job per FLOOD_FACTOR A jobs."""
    merged: list[dict] = []
    remaining_b = list(b_jobs)
    for i, job in enumerate(a_jobs):
        if i % FLOOD_FACTOR == 0 and remaining_b:
            merged.append(remaining_b.pop(0))
        merged.append(job)
    return merged + remaining_b


def _latencies(worker: RunningWorker, jobs: list[dict], rate: float) -> dict[str, float]:
    """Publish `jobs` steadily at `rate`; each job's publish → result latency in ms."""
    published = publish_steadily(worker.bootstrap, jobs, rate, worker.topic_of)
    worker.collector.wait_for(list(published), worker.process)
    return {
        job_id: (worker.collector.results[job_id][0] - at) * 1000
        for job_id, at in published.items()
        if job_id in worker.collector.results
    }


def _flood(worker: RunningWorker, figures: FairnessFigures, seconds: float, tokens: int) -> None:
    run = uuid.uuid4().hex[:6]
    count_b = max(1, round(figures.rate_b * seconds))
    b_jobs = tenant_jobs(count_b, TENANT_B, tokens, seed=21, prefix=f"fb-{run}-")
    a_jobs = tenant_jobs(count_b * FLOOD_FACTOR, TENANT_A, tokens, seed=22, prefix=f"fa-{run}-")
    ms = _latencies(worker, _schedule(a_jobs, b_jobs), figures.rate_b * (FLOOD_FACTOR + 1))
    figures.flooded[worker.variant.label] = (
        [ms[j["job_id"]] for j in b_jobs if j["job_id"] in ms],
        [ms[j["job_id"]] for j in a_jobs if j["job_id"] in ms],
    )


def measure_fairness(
    model: Path,
    adapters_dir: Path,
    capacity: float,
    seconds: float = 20.0,
    tokens: int = 32,
    policies: tuple[str, ...] = ("switch_aware", "arrival"),
) -> FairnessFigures:
    """Phase 1 (B alone) on the first policy's worker, phase 2 (A flooding) on each policy's
    worker in turn; workers run one at a time, on their own topics and groups."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-fairness-"))
    warm = zoo_inputs(16, seed=20)
    try:
        with kafka_broker(scratch / "kafka") as (bootstrap, broker):
            figures = FairnessFigures(capacity, capacity / FLOOD_FACTOR, broker)
            for n, policy in enumerate(policies):
                # "POLICY[:DEPTH[:DELIVERY]]": requests kept in the engine, delivery mode.
                name, depth, delivery = [*policy.split(":"), "", ""][:3]
                settings = {
                    "LORA_WORKERS_ADMISSION__POLICY": name,
                    "LORA_WORKERS_ADMISSION__MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
                }
                if depth:
                    settings["LORA_WORKERS_ADMISSION__ENGINE_DEPTH"] = depth
                if delivery:
                    settings["LORA_WORKERS_DELIVERY__MODE"] = delivery
                variant = WorkerVariant(policy, settings)
                worker = RunningWorker(bootstrap, scratch, model, adapters_dir, variant)
                try:
                    worker.warm_up(warm, tokens)
                    if n == 0:
                        count = max(1, round(figures.rate_b * seconds))
                        alone = tenant_jobs(count, TENANT_B, tokens, seed=21, prefix="alone-")
                        figures.alone_b = list(_latencies(worker, alone, figures.rate_b).values())
                    _flood(worker, figures, seconds, tokens)
                    figures.dead_letters += len(worker.collector.dead)
                except BaseException:
                    print(f"--- {policy} worker log ---\n{worker.log_tail()}")
                    raise
                finally:
                    worker.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return figures


def summary_lines(f: FairnessFigures) -> list[str]:
    alone = percentile(f.alone_b, 0.95)
    lines = [f"- B alone at {f.rate_b:.1f} jobs/s: p95 {alone:,.0f} ms ({len(f.alone_b)} jobs)"]
    for policy, (b_ms, a_ms) in f.flooded.items():
        lines.append(
            f"- {policy}, A at {f.rate_b * FLOOD_FACTOR:.0f} jobs/s + B: B p95 "
            f"{percentile(b_ms, 0.95):,.0f} ms ({f.ratio(policy):.2f}x alone), A p95 "
            f"{percentile(a_ms, 0.95):,.0f} ms ({len(b_ms)} + {len(a_ms)} jobs)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=float, required=True, help="pipeline jobs/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--policies", nargs="+", default=["switch_aware", "arrival"])
    parser.add_argument("--model", type=Path, default=ZOO / "tiny-llama")
    parser.add_argument("--adapters", type=Path, default=ZOO / "adapters")
    args = parser.parse_args()
    configure_logging("WARNING")
    figures = measure_fairness(
        args.model, args.adapters, args.capacity, args.seconds, args.tokens, tuple(args.policies)
    )
    print(f"\ncapacity {figures.capacity:.0f} jobs/s, {args.seconds:.0f} s per phase\n")
    print("\n".join(summary_lines(figures)))
    print(f"- dead letters: {figures.dead_letters}")


if __name__ == "__main__":
    main()
